"""Atomic output files: each is written under a temporary name beside its destination and renamed into place when
complete and on disk, so that a run stopped part-way (even by a power cut) never leaves a half-written file (only,
at worst, a stale temporary, whose name says which process wrote it). A write that fails (a full disk, a folder made
read-only) is a PatchdbError; it removes its temporary and leaves the file it would have replaced as it was."""

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from patchdb.errors import PatchdbError


@contextlib.contextmanager
def atomic_path(path: "str | os.PathLike") -> Iterator[Path]:
    """Yield a temporary path beside path; on success it is synced to disk and replaces path, on failure it is removed."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except PatchdbError:
        raise
    except Exception as error:
        failure = write_failure(path, error)
        if failure is None:
            raise
        raise failure from None
    finally:
        temporary.unlink(missing_ok=True)


def write_failure(path: Path, error: Exception) -> PatchdbError | None:
    """The PatchdbError saying that path could not be written, where error is a failed write: an OSError, or any error
    while the disk is full (numpy and torch report a full disk in their own words, without an errno); None otherwise.
    Called before the temporary is removed, so that the disk it filled is still full."""
    if isinstance(error, OSError) and error.errno is not None:
        code = error.errno
    elif shutil.disk_usage(path.parent).free == 0:
        code = errno.ENOSPC
    elif isinstance(error, OSError):
        return PatchdbError(f"cannot write {path} ({error}); choose another --out")
    else:
        return None
    fix = "free space on its disk or choose another --out" if code in (errno.ENOSPC, errno.EDQUOT) else "choose another --out"
    return PatchdbError(f"cannot write {path} ({os.strerror(code)}); {fix}")


def temporary_writer(path: "str | os.PathLike") -> int | None:
    """The process id in the name of a temporary file that atomic_path made (None for any other file)."""
    match = re.fullmatch(r"\..+\.(\d+)\.tmp", Path(path).name)
    return None if match is None else int(match[1])


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
