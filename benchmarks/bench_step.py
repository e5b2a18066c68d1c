"""Time one machine call (one sampling step) of boundary-broken ELS, exact or top-k, with or without the
same-location regions, optionally under cProfile.

    python benchmarks/bench_step.py --images 60000 --seeds 2 --patch-size 17 --t 0.9 \
        --store runs/stores/fmnist-60k --regions --no-regions

Workload: the first N Fashion-MNIST training images, unconditional, seeds 0..S-1 of pure noise as the
noisy batch. Each --regions / --no-regions value is timed in its own fresh machine (so each pays its own
dictionary loading), in the order given; --no-regions copies every same-location patch
(patchdb.patches.REGION_MAX_WASTE set to 0), --regions keeps the library's rule.
"""

import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

import click
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import patchdb.patches  # noqa: E402
from patchdb.data import load_dataset  # noqa: E402
from patchdb.generate import seeded_inputs  # noqa: E402
from patchdb.machines import make_machine  # noqa: E402
from patchdb.store import PatchStore  # noqa: E402
from patchdb.topk import TopKBackend  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data"


@click.command()
@click.option("--images", type=click.IntRange(1), default=60000, show_default=True, help="The first N training images.")
@click.option("--seeds", type=click.IntRange(1), default=2, show_default=True, help="Noisy images in the batch.")
@click.option("--patch-size", type=click.IntRange(1), default=17, show_default=True)
@click.option("--t", "t", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True)
@click.option("--store", "store_path", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="A store of these images: time the top-k backend's default; without it, the exact backend.")
@click.option("--regions/--no-regions", "region_settings", multiple=True, default=[True], show_default=True,
              help="Score same-location pixels from their tiles' regions (the library's rule) or copy every patch; repeatable.")
@click.option("--profile", is_flag=True, help="Print the 12 functions of largest own time of each call.")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=DEFAULT_DATA, show_default=True)
def main(images, seeds, patch_size, t, store_path, region_settings, profile, threads, data_dir):
    """Seconds of one bbELS machine call per region setting, as JSON lines."""
    torch.set_num_threads(threads)
    dataset = load_dataset(f"fashion-mnist:train:{images}", data_dir)
    noise, _ = seeded_inputs(0, seeds, tuple(dataset.images.shape[1:]))
    library_waste = patchdb.patches.REGION_MAX_WASTE
    for regions in region_settings:
        patchdb.patches.REGION_MAX_WASTE = library_waste if regions else 0.0
        options = {} if store_path is None else {"store": PatchStore(store_path), "backend": TopKBackend()}
        machine = make_machine("bbels", dataset, **options)
        profiler = cProfile.Profile() if profile else None
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        posterior = machine.posterior(noise, t, None, patch_size)
        if profiler:
            profiler.disable()
        seconds = time.perf_counter() - start
        report = machine.take_report()
        print(json.dumps({"backend": "exact" if store_path is None else "topk", "regions": regions, "images": images,
                          "seeds": seeds, "patch_size": patch_size, "t": t, "seconds": round(seconds, 2),
                          "backend_seconds": None if report is None else {k: round(v, 2) for k, v in report["seconds"].items()},
                          "mean_checksum": float(posterior.mean.double().sum())}), flush=True)
        if profiler:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
    patchdb.patches.REGION_MAX_WASTE = library_waste


if __name__ == "__main__":
    main()
