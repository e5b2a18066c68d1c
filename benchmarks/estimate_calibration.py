"""Whether the estimator's reported standard error covers its actual error, one step at a time.

    python benchmarks/estimate_calibration.py --label 3 --queries 20
    python benchmarks/estimate_calibration.py --dataset fashion-mnist:train --label 0 --queries 20

Workload: boundary-broken ELS on the training images of one class of a data set (by default the embedded
default data, 1,000 Fashion-MNIST images, about 100 per class; with --dataset, say, the 6,000 of a class of
Fashion-MNIST's training set), a store of those images built in a temporary folder, the top-k backend at its
defaults. For each (patch size, t), forward-noised training images
are denoised by the exact and the top-k backend; per setting one line: the fraction of pixels
estimated, the largest reported standard error of an accepted estimate, and, over the estimated
pixels, the largest actual error, its 99th percentile and the pixels off by more than three times
that largest reported error and by more than ROUNDING (which an honest error bar would make rare), in pixel
units.
"""

import json
import sys
import tempfile
from pathlib import Path

import click
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_topk import parse_setting  # noqa: E402
from patchdb.build import build_store  # noqa: E402
from patchdb.data import load_dataset, make_dataset  # noqa: E402
from patchdb.machines import make_machine  # noqa: E402
from patchdb.schedule import alpha_bar  # noqa: E402
from patchdb.store import PatchStore  # noqa: E402
from patchdb.topk import PATHS, TopKBackend  # noqa: E402

STEPS = ((3, 0.05), (3, 0.15), (5, 0.3), (9, 0.5), (13, 0.7))
"""(patch size, t) pairs along the paper's schedule of scales: late steps are sharp, early ones broad."""
ROUNDING = 1e-3
"""Errors below this are float32 rounding, not the estimator's, however small the reported error."""


@click.command()
@click.option("--label", type=click.IntRange(0, 9), default=3, show_default=True, help="The class whose images are used.")
@click.option("--dataset", "spec", default=None, help="A data spec (patchdb.data.load_dataset); default: the embedded data.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Where --dataset's files are looked for first.")
@click.option("--queries", type=click.IntRange(1), default=20, show_default=True, help="Noisy images per step.")
@click.option("--setting", "settings", multiple=True, default=("defaults",), show_default=True,
              help="TopKBackend options, as bench_topk.py takes them, or 'defaults' (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the noisy images and the estimator.")
def main(spec, data_dir, label, queries, settings, seed):
    """Print one JSON line per (setting, patch size, t)."""
    torch.set_num_threads(1)
    source = load_dataset(spec, data_dir)
    dataset = make_dataset(source.images[source.indices_of_label(label)].clone(), None, f"{source.name}-class{label}")
    generator = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as folder:
        build_store(dataset, "bbels", sorted({size for size, _ in STEPS}), folder, progress=False)
        store = PatchStore(folder)
        exact = make_machine("bbels", dataset)
        for patch_size, t in STEPS:
            level = alpha_bar(t)
            images = dataset.images[generator.integers(len(dataset), size=queries)].double()
            noise = torch.from_numpy(generator.standard_normal(images.shape))
            x = (level ** 0.5 * images + (1 - level) ** 0.5 * noise).float()
            reference = exact.posterior(x, t, patch_size=patch_size).mean
            for setting in settings:
                indexed = make_machine("bbels", dataset, store=store,
                                       backend=TopKBackend(seed=seed, **({} if setting == "defaults"
                                                                         else parse_setting(setting))))
                posterior = indexed.posterior(x, t, patch_size=patch_size)
                reported = (indexed.take_report()["estimate_standard_error"] or {}).get("max")
                estimated = posterior.path == PATHS.index("estimated")
                error = (posterior.mean - reference).abs().amax(dim=1)[estimated]
                row = {"setting": setting, "patch_size": patch_size, "t": t,
                       "estimated": round(float(estimated.double().mean()), 3), "reported_max": reported}
                if error.numel():
                    row.update(actual_max=round(float(error.max()), 4), actual_p99=round(float(error.quantile(0.99)), 4),
                               beyond_3x=None if reported is None else int((error > max(3 * reported, ROUNDING)).sum()),
                               pixels=error.numel())
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
