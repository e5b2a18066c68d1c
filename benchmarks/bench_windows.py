"""Time one machine call of the sliding-window kernel per instruction set and patch size.

bbELS on the first N Fashion-MNIST training images, one noisy training image at the paper's t for
each patch size, every task of the call (no provenance unless --provenance), one thread:

    python benchmarks/bench_windows.py --images 1000 --sizes 3,9,17

Prints, per instruction set that this processor runs, the best of --repeats seconds of each call and
its nanoseconds per logit: the instruction sets' ratios tell what a machine without AVX-512 would see.
"""

import json
import math
import sys
import time
from pathlib import Path

import click
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from patchdb import windows  # noqa: E402
from patchdb.data import load_dataset  # noqa: E402
from patchdb.patches import dictionary_groups, padded_images  # noqa: E402
from patchdb.schedule import alpha_bar  # noqa: E402
from patchdb.windows import LaneImages, WindowState, window_tasks  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data"
TIME_OF_SIZE = {3: 0.05, 5: 0.1, 7: 0.2, 9: 0.4, 11: 0.5, 13: 0.65, 15: 0.8, 17: 0.95}
"""The t at which the paper's Fashion-MNIST ResNet schedule uses each patch size (one of its steps)."""


@click.command()
@click.option("--images", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--sizes", default="3,9,17", show_default=True, help="Comma list of patch sizes (odd, 3..17).")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True)
@click.option("--provenance/--no-provenance", default=False, show_default=True, help="Also track each pixel's dominant entry.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=DEFAULT_DATA, show_default=True)
def main(images, sizes, repeats, provenance, data_dir) -> None:
    """Print one JSON line per instruction set."""
    if not windows.compiled():
        raise click.ClickException("patchdb._windows is not compiled: reinstall patchdb with a C compiler (pip install -e .)")
    dataset = load_dataset(f"fashion-mnist:train:{images}", data_dir)
    height, width = dataset.images.shape[2:]
    for isa in windows.VECTOR_BYTES:
        calls = {}
        for size in (int(item) for item in sizes.split(",")):
            t = TIME_OF_SIZE[size]
            noise = torch.randn(1, *dataset.images.shape[1:], generator=torch.Generator().manual_seed(0))
            x = math.sqrt(alpha_bar(t)) * dataset.images[:1] + math.sqrt(1 - alpha_bar(t)) * noise
            tasks = window_tasks(dictionary_groups("bbels", size, height, width), width)
            lanes = LaneImages.from_images(dataset.images, size, "zeros", isa)
            queries = padded_images(x, size, "zeros").contiguous()
            best = math.inf
            for _ in range(repeats):
                state = WindowState.empty(1, x.shape[1], height, width, x.dtype, lanes.images.shape[-1])
                start = time.perf_counter()
                state.fold(queries, lanes, tasks, alpha_bar(t), size, 0, provenance)
                best = min(best, time.perf_counter() - start)
            logits = int(((tasks[:, 1] - tasks[:, 0]) * (tasks[:, 3] - tasks[:, 2])).sum()) * images
            calls[size] = {"t": t, "seconds": round(best, 4), "ns_per_logit": round(best / logits * 1e9, 3)}
        print(json.dumps({"isa": isa, "images": images, "provenance": provenance, "calls": calls}), flush=True)


if __name__ == "__main__":
    main()
