"""Compare two runs' samples saved by bench_exact.py --save (same seeds, checked by their noise): per-sample Pearson r
and the largest pixel difference, one JSON line; the first min(batch) samples of each are compared.

    python benchmarks/compare_samples.py runs/bench/gpu-exact-1000-8-fused.pt runs/bench/exact-1000-8-windows.pt
"""

import json
import sys
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from patchdb.comparison import image_statistics  # noqa: E402


@click.command()
@click.argument("first", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("second", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def main(first: Path, second: Path) -> None:
    """Print r per sample, its minimum and median, the largest pixel difference, and each run's seconds and device."""
    runs = [torch.load(path) for path in (first, second)]
    count = min(run["samples"].shape[0] for run in runs)
    if not torch.equal(runs[0]["noise"][:count], runs[1]["noise"][:count]):
        raise click.ClickException("the two runs start from different noise: they are not the same seeds")
    samples = [run["samples"][:count].double() for run in runs]
    r = image_statistics(samples[0], samples[1])["pearson_r"]
    print(json.dumps({"samples": count, "pearson_r": r.tolist(), "min_r": float(r.min()), "median_r": float(r.median()),
                      "max_abs_difference": float((samples[0] - samples[1]).abs().max()),
                      "seconds": [run["seconds"] for run in runs], "devices": [run["device"] for run in runs]}))


if __name__ == "__main__":
    main()
