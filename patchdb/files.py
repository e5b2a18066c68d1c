"""Atomic output files: each is written under a temporary name beside its destination and renamed into place when
complete, so that a run stopped part-way never leaves a half-written file (only, at worst, a stale temporary)."""

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def atomic_path(path: "str | os.PathLike") -> Iterator[Path]:
    """Yield a temporary path beside path; on success it replaces path, on failure it is removed."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json(path: "str | os.PathLike", content, indent: int = 1) -> None:
    """content as JSON text at path, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(content, indent=indent) + "\n")


def save_npy(path: "str | os.PathLike", array: np.ndarray) -> None:
    """array as an .npy file at path, atomically."""
    with atomic_path(path) as temporary, temporary.open("wb") as file:
        np.save(file, array)


def save_npz(path: "str | os.PathLike", arrays: dict[str, np.ndarray]) -> None:
    """arrays as an (uncompressed) .npz archive at path, atomically."""
    with atomic_path(path) as temporary, temporary.open("wb") as file:
        np.savez(file, **arrays)


def save_figure(figure, path: "str | os.PathLike", dpi: int = 100) -> None:
    """A matplotlib figure as a PNG at path, atomically."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi)
