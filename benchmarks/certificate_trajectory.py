"""Check the top-k certificate along exact trajectories at one patch size: at the last steps, where the posterior is
sharpest and the logits span thousands of nats, every certified pixel must lie within tol times the pixel range of
the exact posterior mean.

    PATCHDB_DATA=../shared/data python benchmarks/certificate_trajectory.py --images 1000 --patch-size 11 \
        --store /tmp/cert/store --out benchmarks/results/certificate-trajectory.json

The trajectories are the exact bbELS machine's (float32, the given patch size at every step); at each of the last
--last steps the same noisy images are scored by both backends (top-k with --fallback none, so that the pixels not
certified are truncated and only the certificate decides). The store is built first where --store is absent.
"""

import json
import sys
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from patchdb.build import build_store  # noqa: E402
from patchdb.data import load_dataset  # noqa: E402
from patchdb.engine import ExactBackend  # noqa: E402
from patchdb.generate import seeded_inputs  # noqa: E402
from patchdb.machines import make_machine  # noqa: E402
from patchdb.sampler import sample_ddim  # noqa: E402
from patchdb.schedule import machine_steps  # noqa: E402
from patchdb.store import PatchStore  # noqa: E402
from patchdb.topk import PATHS, TopKBackend  # noqa: E402


@click.command()
@click.option("--images", type=click.IntRange(min=1), default=1000, show_default=True,
              help="The first N Fashion-MNIST training images (unconditional).")
@click.option("--patch-size", type=click.IntRange(min=1), default=11, show_default=True)
@click.option("--steps", type=click.IntRange(min=2), default=20, show_default=True)
@click.option("--last", type=click.IntRange(min=1), default=4, show_default=True, help="Steps checked, from the end.")
@click.option("--seeds", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--tol", type=click.FloatRange(min=0, max=1, max_open=True), default=1e-2, show_default=True)
@click.option("--store", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="A bbELS store of these images holding --patch-size (built there where absent).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the results as JSON.")
def main(images, patch_size, steps, last, seeds, tol, store, out):
    """Per checked step: the fraction of pixels certified and how many of them lie beyond tol x range."""
    dataset = load_dataset(f"fashion-mnist:train:{images}")
    if not store.exists():
        build_store(dataset, "bbels", [patch_size], store)
    exact = make_machine("bbels", dataset, backend=ExactBackend())
    topk = make_machine("bbels", dataset, store=PatchStore(store), backend=TopKBackend(tol=tol, fallback="none"))
    states = []
    noise, _ = seeded_inputs(0, seeds, tuple(dataset.images.shape[1:]), None)
    sample_ddim(exact, noise, machine_steps(steps), steps, [patch_size] * steps,
                callback=lambda step: states.append((step["x"].clone(), step["t"])))
    bound = tol * float(dataset.images.max() - dataset.images.min())
    results = []
    for x, t in states[-last:]:
        expected = exact.posterior(x, t, patch_size=patch_size, provenance=False).mean
        got = topk.posterior(x, t, patch_size=patch_size, provenance=False)
        certified = got.path == PATHS.index("certified")
        error = (got.mean - expected).abs()[:, 0][certified]
        results.append({"t": t, "certified_fraction": float(certified.float().mean()),
                        "violations": int((error > bound).sum()),
                        "max_error_on_certified": float(error.max()) if error.numel() else 0.0})
        print(f"t = {t:.3f}: certified {results[-1]['certified_fraction']:.3f}, {results[-1]['violations']} beyond "
              f"tol x range ({bound:g}), largest error {results[-1]['max_error_on_certified']:.2e}")
    if out is not None:
        out.write_text(json.dumps({"images": images, "patch_size": patch_size, "steps": steps, "seeds": seeds,
                                   "tol": tol, "results": results}, indent=2))


if __name__ == "__main__":
    main()
