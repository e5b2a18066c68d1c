"""``patchdb calibrate``: fit a machine's locality-scale schedule to a trained network."""

import click

from cli.options import (DEVICE, SAMPLE_COUNTS, SEEDS, SIZE_LIST_HELP, STEPS, UserPath, confirm_if_interactive,
                         gib_to_bytes, machine_data_options, network_options, warn_if_unfinished)
from patchdb.calibration import DEFAULT_SEED, METRICS, calibrate_run, largest_candidate_warning
from patchdb.patches import PATCH_MACHINES
from patchdb.scales import parse_size_list


@click.command("calibrate")
@network_options
@click.option("--machine", type=click.Choice(PATCH_MACHINES), default="bbels",
              help="Patch machine whose scale is calibrated (IS and ES have none).")
@click.option("--candidates", default=None, show_default="3,5,...,19 for a ResNet, 3,5,...,27 for a UNet",
              help=f"Candidate patch sizes: {SIZE_LIST_HELP}.")
@click.option("--samples", type=SAMPLE_COUNTS, default=10, help="Reverse trajectories (noise seeds) to follow.")
@click.option("--metric", type=click.Choice(METRICS), default="cos", help="Score agreement: cosine similarity or L2 distance.")
@click.option("--steps", "num_steps", type=STEPS, default=20, help="Sampling steps n.")
@click.option("--seed", type=SEEDS, default=DEFAULT_SEED,
              help="Sample k's noise (and label) come from seed + k; the default stays clear of compare's seeds.")
@machine_data_options
@click.option("--device", type=DEVICE, default="cpu", help="torch device for the network and the machine.")
@click.option("--out", type=UserPath(dir_okay=False), default=None,
              show_default="RUN_DIR/scales.json (the cache folder's for resnet|unet)",
              help="Where the schedule's JSON goes (the same name with .png beside it).")
def calibrate(model, dataset_spec, padding, conditional, train_missing, machine, candidates, samples, metric, num_steps,
              seed, data_dir, memory_gb, device, out) -> None:
    """Follow the network's reverse trajectories; per step keep the machine patch size whose score best matches it.

    Entry i of the schedule is the patch size at t = i/n (what `--scales calibrated:RUN_DIR` reads, and what compare
    reads by default).
    """
    path, result = calibrate_run(model, machine=machine, samples=samples,
                                 candidates=None if candidates is None else parse_size_list(candidates, "candidates"),
                                 metric=metric, num_steps=num_steps, seed=seed, data_dir=data_dir, device=device,
                                 out=out, memory_budget=gib_to_bytes(memory_gb), dataset_spec=dataset_spec,
                                 padding=padding, conditional=conditional, train_missing=train_missing,
                                 confirm=confirm_if_interactive(), on_run=warn_if_unfinished)
    click.echo(f"scales {result['scales']} (entry i at t = i/{num_steps}) -> {path}")
    warning = largest_candidate_warning(result, num_steps, machine)
    if warning is not None:
        click.echo(f"warning: {warning}", err=True)

