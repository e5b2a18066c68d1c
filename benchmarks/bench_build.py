"""Time, peak memory and disk of building a patch store (issue 4's build budget).

    python benchmarks/bench_build.py --images 12000 --scales 3 --out runs/stores/bench-12000-p3
    python benchmarks/bench_build.py --scales 3,5,7,9,11,13,15,17 --out runs/stores/fmnist-60k   # all 60,000 images

Builds (or resumes) unconditional bbELS dictionaries of the first N Fashion-MNIST training images
(all 60,000 without --images) and prints one JSON line: seconds, the process's peak resident memory
in GiB (the data set alone included), bytes on disk, and per patch size the seconds and the peak
resident memory while it was built (Linux: the peak is reset after each scale through
/proc/self/clear_refs).
"""

import json
import resource
import sys
import time
from pathlib import Path

import click
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from patchdb.build import build_store  # noqa: E402
from patchdb.data import load_dataset  # noqa: E402
from patchdb.scales import parse_patch_sizes  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data"


@click.command()
@click.option("--images", type=click.IntRange(1), default=None, help="The first N training images (default: all).")
@click.option("--scales", default="3,5,7,9,11,13,15,17", show_default=True, help="Patch sizes to index.")
@click.option("--threads", type=click.IntRange(0), default=1, show_default=True, help="torch threads (0: torch's default).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=DEFAULT_DATA, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Store folder.")
def main(images, scales, threads, data_dir, out) -> None:
    """Build the store and print seconds, peak memory and size."""
    if threads:
        torch.set_num_threads(threads)
    dataset = load_dataset("fashion-mnist:train" if images is None else f"fashion-mnist:train:{images}", data_dir)
    loaded_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    per_scale, start = {}, time.perf_counter()
    reset_peak_memory()

    def record(patch_size, last=[start]):
        now = time.perf_counter()
        per_scale[patch_size] = {"seconds": round(now - last[0], 1), "peak_memory_gib": round(peak_memory_gib(), 2)}
        print(json.dumps({"patch_size": patch_size, **per_scale[patch_size]}), flush=True)
        last[0] = now
        reset_peak_memory()

    build_store(dataset, "bbels", parse_patch_sizes(scales), out, progress=False, callback=record)
    print(json.dumps({"per_scale": per_scale, "images": len(dataset), "scales": scales, "threads": torch.get_num_threads(),
                      "seconds": round(time.perf_counter() - start, 1),
                      "peak_memory_gib": max([round(loaded_gib, 2)] + [scale["peak_memory_gib"] for scale in per_scale.values()]),
                      "memory_after_loading_data_gib": round(loaded_gib, 2),
                      "bytes_on_disk": sum(path.stat().st_size for path in Path(out).iterdir())}))


def peak_memory_gib() -> float:
    """Peak resident memory of this process since the last reset_peak_memory (Linux), else since it started."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def reset_peak_memory() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


if __name__ == "__main__":
    main()
