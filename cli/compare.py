"""``patchdb compare``: seed-by-seed agreement of a trained network with the analytic machines."""

import click

from cli.options import (DEVICE, OUTPUT_FOLDER, SAMPLE_COUNTS, SEEDS, STEPS, ScaleSpec, confirm_if_interactive,
                         gib_to_bytes, machine_data_options, network_options, warn_if_unfinished)
from patchdb.comparison import COMPARE_FILE, compare_model, statistic_text
from patchdb.machines import MACHINES
from patchdb.scales import SCALE_SPEC_HELP, check_scale_spec


@click.command("compare")
@network_options
@click.option("--machine", type=click.Choice(MACHINES), default="bbels", help="The machine compared with the network.")
@click.option("--scales", "scale_spec", type=ScaleSpec(), default=None,
              show_default="calibrated:RUN_DIR (calibrated first if missing; none for is|es)",
              help=f"Scale schedule: {SCALE_SPEC_HELP}.")
@click.option("--steps", "num_steps", type=STEPS, default=20, help="Sampling steps n.")
@click.option("--num", type=SAMPLE_COUNTS, default=100, help="Number of seeds (samples).")
@click.option("--seed", type=SEEDS, default=0, help="Sample k uses noise (and label) from seed + k.")
@click.option("--batch-size", type=click.IntRange(min=1), default=10, help="Samples generated together.")
@click.option("--single-step", is_flag=True, help="Also compare scores on the same noised held-out images at each t.")
@click.option("--test-dataset", default=None, show_default="the data set's test split",
              help="Held-out images for --single-step.")
@machine_data_options
@click.option("--device", type=DEVICE, default="cpu", help="torch device.")
@click.option("--out", "out_dir", type=OUTPUT_FOLDER, required=True,
              help="Output folder: compare.json, outputs.npz, scatter.png, pairs.png[, single_step.png].")
def compare(model, dataset_spec, padding, conditional, train_missing, machine, scale_spec, num_steps, num, seed,
            batch_size, single_step, test_dataset, data_dir, memory_gb, device, out_dir) -> None:
    """Run the network and the machine (plus the IS machine and a Gaussian baseline) from the same seeds; report r, R^2, MSE."""
    check_scale_spec(machine, scale_spec)  # before the network is found (or trained)
    if test_dataset is not None and not single_step:
        raise click.UsageError("--test-dataset is read only with --single-step: add --single-step, or drop --test-dataset")
    report = compare_model(model, out_dir, dataset_spec=dataset_spec, padding=padding, conditional=conditional,
                           train_missing=train_missing, machine=machine, scale_spec=scale_spec, num_steps=num_steps,
                           data_dir=data_dir, device=device, memory_budget=gib_to_bytes(memory_gb),
                           confirm=confirm_if_interactive(), announce=lambda text: click.echo(text, err=True),
                           on_run=warn_if_unfinished, num=num, seed=seed, batch_size=batch_size,
                           test_dataset=test_dataset, single_step=single_step)
    summary = report["summary"]
    for name, values in summary.items():
        r = values["pearson_r"]
        click.echo(f"{name:>9}: median r {statistic_text(r['median'])} (quartiles {statistic_text(r['q1'])} to "
                   f"{statistic_text(r['q3'])}), median R^2 {statistic_text(values['r_squared']['median'])}, "
                   f"median MSE {statistic_text(values['mse']['median'], 4)}"
                   + (f" ({r['undefined']} seeds of constant images have no r)" if r["undefined"] else ""))
    fraction = report.get(f"fraction_{machine}_beats_is")
    if fraction is not None:
        click.echo(f"{machine} beats IS on {100 * fraction:.0f}% of seeds -> {out_dir / COMPARE_FILE}")
