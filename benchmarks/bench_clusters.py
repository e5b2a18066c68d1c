"""Cost per (pixel, visited patch) pair of the top-k backend's scorings of visited clusters (issue 4).

Synthetic clusters of random patches (in memory), every pixel visiting a few random clusters, so that
each cluster is visited by a chosen mean number of pixels; the compiled kernel (patchdb._clusters)
and the matrix products of runs of clusters ('runs') fold the same visits, timed in one run:

    python benchmarks/bench_clusters.py --patch-sizes 3,9,17 --pixels-per-cluster 4,40 --out benchmarks/results/clusters.json

Each figure is the best of --repeats calls.
"""

import json
import sys
import time
from pathlib import Path

import click
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from patchdb.engine import PatchDictionary, SoftmaxAccumulator  # noqa: E402
from patchdb.index import ClusteredDictionary, EntryClusters  # noqa: E402
from patchdb.topk import TopKBackend, _score_compiled  # noqa: E402


def synthetic(patch_size: int, clusters: int, cluster_size: int, seed: int = 0) -> ClusteredDictionary:
    """clusters x cluster_size random patches (pixel scale 0.3) in consecutive clusters; the bounds are unused here."""
    generator = torch.Generator().manual_seed(seed)
    dims, count = patch_size**2, clusters * cluster_size
    keys = 0.3 * torch.randn(count, dims, generator=generator)
    dictionary = PatchDictionary(keys, keys[:, dims // 2:dims // 2 + 1].contiguous(), keys.square().sum(dim=1),
                                 torch.zeros(count), torch.zeros(count, 3, dtype=torch.int64))
    bounds = EntryClusters(torch.arange(clusters + 1) * cluster_size, torch.zeros(clusters, dims), torch.zeros(clusters),
                           torch.zeros(clusters), torch.zeros(clusters, dtype=torch.int64))
    return ClusteredDictionary(dictionary, bounds)


@click.command()
@click.option("--patch-sizes", default="3,9,17", show_default=True, help="Patch sizes P to time.")
@click.option("--pixels-per-cluster", default="4,40", show_default=True, help="Mean pixels visiting each cluster.")
@click.option("--clusters", type=click.IntRange(1), default=200, show_default=True)
@click.option("--cluster-size", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--visits", type=click.IntRange(1), default=4, show_default=True, help="Clusters each pixel visits.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True,
              help="Time each scoring this many times and keep the best (the first call also builds the patch layout).")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True,
              help="torch threads (the compiled kernel's too).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write the results to this JSON file.")
def main(patch_sizes, pixels_per_cluster, clusters, cluster_size, visits, repeats, threads, out) -> None:
    """Print ns per (pixel, patch) pair of each scoring (wall-clock seconds over pairs, whatever the threads)."""
    torch.set_num_threads(threads)
    rows = []
    for patch_size in map(int, patch_sizes.split(",")):
        dictionary = synthetic(patch_size, clusters, cluster_size)
        for per_cluster in map(int, pixels_per_cluster.split(",")):
            pixels = max(1, per_cluster * clusters // visits)
            generator = torch.Generator().manual_seed(per_cluster)
            queries = 0.3 * torch.randn(pixels, patch_size**2, generator=generator)
            visit = torch.zeros(pixels, clusters, dtype=torch.bool)
            visit.scatter_(1, torch.rand(pixels, clusters, generator=generator).argsort(dim=1)[:, :visits], True)
            row = {"patch_size": patch_size, "pixels_per_cluster": per_cluster, "threads": threads,
                   "pairs": pixels * visits * cluster_size}
            for scoring in ("compiled", "runs"):
                seconds = []
                for _ in range(repeats):
                    accumulator = SoftmaxAccumulator(pixels, 1, torch.float32, torch.device("cpu"))
                    start = time.perf_counter()
                    if scoring == "compiled":
                        _score_compiled(accumulator, queries, dictionary, visit, 0.9)
                    else:
                        TopKBackend(scoring="runs")._score_runs(accumulator, queries, dictionary.entries,
                                                                dictionary.clusters, visit, 0.9)
                    seconds.append(time.perf_counter() - start)
                row[f"{scoring}_ns_per_pair"] = round(min(seconds) / row["pairs"] * 1e9, 2)
            rows.append(row)
            click.echo(row)
    if out is not None:
        out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
