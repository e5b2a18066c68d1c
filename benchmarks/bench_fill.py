"""Time of filling a stored dictionary's whole patch layout (PatchLayout.prepare: each entry's patch start, squared norm
and log2 multiplicity, read where its patch lies in the training images) on 1..T threads (issue 4):

    python benchmarks/bench_fill.py --store runs/stores/bbels-first60000-c1024 --patch-size 9 --threads 1,2 \
        --out benchmarks/results/fill-60k-p9.json

Each repeat loads the dictionary anew (fresh pages, as a run's first step at a patch size sees them) and then fills it
once more (warm pages: the layout marked empty again); the figures are the best and the median of --repeats.
"""

import json
import statistics
import sys
import time
from pathlib import Path

import click
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from patchdb.data import load_dataset  # noqa: E402
from patchdb.patches import dictionary_groups  # noqa: E402
from patchdb.store import PatchStore  # noqa: E402


def interior_layout(store: PatchStore, images: torch.Tensor, patch_size: int):
    """The gathered interior dictionary's patch layout at patch_size, nothing filled yet."""
    groups = dictionary_groups(store.settings.machine, patch_size, *images.shape[2:])
    loaded = store.dictionaries(patch_size, None, groups, images, memory_budget=0)
    return loaded[[group.boundary_class for group in groups].index("interior")]


@click.command()
@click.option("--store", "store_path", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="An unconditional store built by patchdb build-index.")
@click.option("--patch-size", type=click.IntRange(3), default=9, show_default=True)
@click.option("--threads", default="1,2", show_default=True, help="torch thread counts, comma-separated.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=REPO.parent / "shared" / "data", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Write the results to this JSON file.")
def main(store_path, patch_size, threads, repeats, data_dir, out) -> None:
    """Time PatchLayout.prepare over every cluster of the interior dictionary, fresh and warm, per thread count."""
    store = PatchStore(store_path)
    images = load_dataset(store.settings.dataset, data_dir).images.float()
    results = []
    for count in [int(part) for part in threads.split(",")]:
        torch.set_num_threads(count)
        seconds = {"fresh": [], "warm": []}
        for _ in range(repeats):
            dictionary = interior_layout(store, images, patch_size)
            layout, clusters = dictionary.patch_layout, torch.arange(len(dictionary.clusters))
            for pages in ("fresh", "warm"):
                layout.ready.zero_()
                start = time.perf_counter()
                layout.prepare(clusters)
                seconds[pages].append(time.perf_counter() - start)
        row = {"threads": count, "entries": int(dictionary.clusters.offsets[-1]),
               **{f"{pages}_seconds": {"best": round(min(times), 3), "median": round(statistics.median(times), 3)}
                  for pages, times in seconds.items()}}
        print(row)
        results.append(row)
    if out is not None:
        out.write_text(json.dumps({"store": str(store_path), "patch_size": patch_size, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
