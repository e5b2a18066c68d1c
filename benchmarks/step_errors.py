"""Per-step error of top-k settings against the exact backend, along the exact trajectory.

    python benchmarks/step_errors.py --label 0 --seeds 6,16 --store runs/stores-v2/bbels-class0-c1024 \
        --setting topk=auto,estimate_error=10 --setting topk=16384,estimate_error=10 \
        --setting topk=auto,estimate_error=10,estimate_samples=16384 --setting topk=auto,estimate_error=0.02

Workload: boundary-broken ELS, the paper's Fashion-MNIST ResNet scales, 20 steps, the training images of
one class (class-conditional store), the given seeds of bench_topk.py's 20-seed batch. The exact machine
drives the sampler; at every step each setting's posterior mean is computed from the same noisy images
and compared with the exact one. One line per step: t, P, and per setting (RMS error over pixels,
largest error, fraction of pixels off by more than 0.1), in pixel units.
"""

import sys
from pathlib import Path

import click
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_topk import PAPER_SCALES, parse_setting  # noqa: E402
from patchdb.data import load_dataset  # noqa: E402
from patchdb.generate import seeded_inputs  # noqa: E402
from patchdb.machines import make_machine  # noqa: E402
from patchdb.sampler import sample_ddim  # noqa: E402
from patchdb.scales import parse_scales  # noqa: E402
from patchdb.schedule import machine_steps  # noqa: E402
from patchdb.store import PatchStore  # noqa: E402
from patchdb.topk import TopKBackend  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data"


@click.command()
@click.option("--label", type=click.IntRange(0, 9), default=0, show_default=True,
              help="The class whose training images are used.")
@click.option("--seeds", default="6,16", show_default=True, help="Comma-separated seeds of the 20-seed batch.")
@click.option("--store", "store_path", type=click.Path(path_type=Path, exists=True, file_okay=False), required=True)
@click.option("--setting", "settings", multiple=True, required=True, help="TopKBackend options, as bench_topk.py takes them.")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=DEFAULT_DATA, show_default=True)
def main(label, seeds, store_path, settings, threads, data_dir):
    """Print each step's errors of every setting against exact."""
    torch.set_num_threads(threads)
    dataset = load_dataset("fashion-mnist:train", data_dir)
    scales = parse_scales(PAPER_SCALES, 20)
    picked = [int(seed) for seed in seeds.split(",")]
    noise, _ = seeded_inputs(0, 20, tuple(dataset.images.shape[1:]))
    labels = torch.full((len(picked),), label)
    exact = make_machine("bbels", dataset)
    indexed = make_machine("bbels", dataset, store=PatchStore(store_path))  # one machine: the dictionaries load once
    backends = [TopKBackend(**parse_setting(setting)) for setting in settings]

    def compared(x, t, labels=None, patch_size=None):
        reference = exact.posterior(x, t, labels, patch_size)
        row = [t, patch_size]
        for backend in backends:
            indexed.backend = backend
            error = (indexed.posterior(x, t, labels, patch_size).mean - reference.mean).abs()
            row.append((round(float(error.square().mean().sqrt()), 4), round(float(error.max()), 3),
                        round(float((error > 0.1).double().mean()), 4)))
        print(row, flush=True)
        return reference.score(x, t)

    sample_ddim(compared, noise[picked], machine_steps(20), 20, scales, labels=labels, disable=True)


if __name__ == "__main__":
    main()
