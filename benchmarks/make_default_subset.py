"""Regenerate patchdb/resources/fashion-mnist-1000.npz, the embedded default data set.

It holds the first PER_CLASS images of each class of the Fashion-MNIST training set, in file order:
``images`` uint8 (N, 28, 28), ``labels`` uint8 (N,), ``source_indices`` int64 (N,), the images'
positions in train-images-idx3-ubyte. The source files are checked against the sha256 table of
patchdb.fetch first.

    PYTHONPATH=. python benchmarks/make_default_subset.py [--data-dir ../shared/data/fashion-mnist]

(from the repository root; PYTHONPATH is not needed once patchdb is installed).
"""

import os
import tempfile
from pathlib import Path

import click
import numpy as np

from patchdb.data import DEFAULT_RESOURCE, read_idx
from patchdb.fetch import SOURCES, verify_sha256

REPO_ROOT = Path(__file__).resolve().parents[1]


@click.command(context_settings={"show_default": True})
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=REPO_ROOT.parent / "shared" / "data" / "fashion-mnist",
              help="Folder with train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz.")
@click.option("--per-class", type=click.IntRange(min=1), default=100, help="Images kept per class.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              default=REPO_ROOT / "patchdb" / "resources" / DEFAULT_RESOURCE, help="The .npz to write.")
def main(data_dir: Path, per_class: int, output: Path) -> None:
    """Write the first PER_CLASS Fashion-MNIST training images of each class to OUTPUT."""
    expected = {remote.name: remote.payload_sha256 for remote in SOURCES["fashion-mnist"]}
    paths = {kind: data_dir / f"train-{kind}-idx{dims}-ubyte.gz" for kind, dims in (("images", 3), ("labels", 1))}
    for path in paths.values():
        verify_sha256(path, expected[path.name])
    images, labels = read_idx(paths["images"]), read_idx(paths["labels"])
    source_indices = np.sort(np.concatenate(
        [np.flatnonzero(labels == label)[:per_class] for label in np.unique(labels)]))
    handle, temporary = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez_compressed(file, images=images[source_indices], labels=labels[source_indices],
                                source_indices=source_indices.astype(np.int64))
        os.chmod(temporary, 0o644)
        os.replace(temporary, output)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    click.echo(f"wrote {len(source_indices)} images ({per_class} per class) to {output}")


if __name__ == "__main__":
    main()
