"""Atomic output files, and output folders locked while a command writes to them.

Each file is written under a temporary name beside its destination and renamed into place when complete and on disk,
so that a run stopped part-way (even by a power cut) never leaves a half-written file (only, at worst, a stale
temporary, whose name says which process wrote it). A write that fails (a full disk, a folder made read-only) is a
PatchdbError; it removes its temporary and leaves the file it would have replaced as it was. A command holds its
output folder's lock (folder_lock) from before its work until its last file, so that two commands never mix their
files in one folder."""

import contextlib
import errno
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from patchdb.errors import PatchdbError, output_folder, user_path

try:
    import fcntl
except ImportError:  # not POSIX (Windows): output folders go unlocked
    fcntl = None

LOCK_FILE = ".patchdb.lock"
"""The lock file in a folder that a command is writing to: it holds the command's process id, and is removed when the
command ends (a killed command leaves it behind, unlocked, and the next command takes it)."""


@contextlib.contextmanager
def atomic_path(path: "str | os.PathLike") -> Iterator[Path]:
    """Yield a temporary path beside path; on success it is synced to disk and replaces path, on failure it is removed.
    A folder at path is a PatchdbError before anything is written (check_output_file)."""
    path = Path(path)
    check_output_file(path)
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
        raise failure from error
    finally:
        temporary.unlink(missing_ok=True)


def check_output_file(path: Path, option: str = "--out") -> None:
    """A PatchdbError where a folder lies at path, where a command writes (or removes) a file: it could neither
    replace nor remove it. The message names option as the one to change."""
    if path.is_dir() and not path.is_symlink():  # a link is replaced or removed itself, whatever it points to
        raise PatchdbError(f"{path} is a folder, where this command writes its file {path.name}; choose another {option}, "
                           "or move that folder away")


def write_failure(path: Path, error: Exception) -> PatchdbError | None:
    """The PatchdbError saying that path could not be written, where error is a failed write: an OSError, an error raised
    while handling one (torch's RuntimeError around a Python file's), or any error while the disk is full (numpy reports
    a full disk in its own words, without an errno); None otherwise. Called before the temporary is removed, so that
    the disk it filled is still full."""
    cause = next((link for link in _error_chain(error) if isinstance(link, OSError) and link.errno is not None), None)
    if cause is not None:
        code = cause.errno
    elif isinstance(error, (OSError, RuntimeError)) and shutil.disk_usage(path.parent).free == 0:
        code = errno.ENOSPC
    elif isinstance(error, OSError):
        return PatchdbError(f"cannot write {path} ({error}); choose another --out")
    else:
        return None
    fix = "free space on its disk or choose another --out" if code in (errno.ENOSPC, errno.EDQUOT) else "choose another --out"
    return PatchdbError(f"cannot write {path} ({os.strerror(code)}); {fix}")


def _error_chain(error: BaseException) -> Iterator[BaseException]:
    """error, then the errors it was raised from or while handling (not those it suppressed: raise ... from None)."""
    while error is not None:
        yield error
        error = error.__cause__ if error.__cause__ is not None or error.__suppress_context__ else error.__context__


@contextlib.contextmanager
def folder_lock(folder: "str | os.PathLike", file: str | None = None, option: str = "--out",
                outputs: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield the output folder folder (~ expanded, created and proved writable by patchdb.errors.output_folder) locked
    for this process: a non-blocking exclusive flock on its LOCK_FILE, held until the block ends; with file, the lock
    of that one file in it (.FILE.lock), for a command that writes one file into a folder that another may hold (a
    schedule into a run folder in training). A folder (or file) that another command holds is a PatchdbError at once,
    naming that command's process id; so is a folder in it named as one of outputs, the files that the command writes
    or removes there (check_output_file), before any work. The errors name option as the one to change. Where the block
    fails, the folders that this call created and that are still empty are removed: a command refused for its other
    arguments leaves no empty output folder behind."""
    created = _missing_folders(folder, option)
    try:
        with _locked(output_folder(folder, option), file, option) as locked:
            for name in outputs:
                check_output_file(locked / name, option)
            yield locked
    except BaseException:
        for path in created:  # innermost first; the first that is not empty keeps its parents
            try:
                path.rmdir()
            except OSError:
                break
        raise


def _missing_folders(folder: "str | os.PathLike", option: str) -> list[Path]:
    """folder (~ expanded) and those of its parents that do not exist, innermost first: what creating it creates."""
    if not str(folder).strip():
        return []  # output_folder's own error
    folder, missing = Path(os.path.abspath(user_path(folder, option))), []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


@contextlib.contextmanager
def _locked(folder: Path, file: str | None, option: str) -> Iterator[Path]:
    """folder_lock's lock of folder (or of file in it), which exists."""
    if fcntl is None:
        yield folder
        return
    path = folder / (LOCK_FILE if file is None else f".{file}.lock")
    target = folder if file is None else folder / file
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError as error:  # another user's lock file: take it if no command holds it
            if not _removed_unheld(path, target, option):
                raise PatchdbError(f"cannot lock {folder} ({error.strerror}: {path}); remove {path} if no command is "
                                   f"writing there, or choose another {option}") from None
            continue
        except OSError as error:
            raise PatchdbError(f"cannot lock {folder} ({error.strerror}: {path}); choose another {option}") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            refusal = _held_error(descriptor, target, option)
            os.close(descriptor)
            raise refusal from None
        except OSError as error:  # a file system without locks (ENOLCK on some network mounts)
            os.close(descriptor)
            path.unlink(missing_ok=True)
            raise PatchdbError(f"cannot lock {target} ({error.strerror}); choose another {option}") from None
        if _same_file(descriptor, path):
            break
        os.close(descriptor)  # its holder removed the file between the open and the lock: lock the new one
    try:
        try:
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
        except OSError as error:  # a full disk lets the empty probe file through, not this
            raise write_failure(path, error) from error
        yield folder
    finally:
        path.unlink(missing_ok=True)  # while still locked, so that no one locks the removed file unawares
        os.close(descriptor)


def _removed_unheld(path: Path, target: Path, option: str) -> bool:
    """Whether the lock file at path, which this user may not open for writing, held no lock and is now removed (another
    user's killed command left it); False where it cannot be removed; a PatchdbError naming its holder where it is held."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True  # its holder removed it meanwhile
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink(missing_ok=True)  # while locked, as its holders remove it
    except BlockingIOError:
        raise _held_error(descriptor, target, option) from None
    except OSError:  # no locks on this file system, or a folder whose sticky bit keeps other users' files
        return False
    finally:
        os.close(descriptor)
    return True


def _held_error(descriptor: int, target: Path, option: str) -> PatchdbError:
    """The PatchdbError refusing target, whose lock file (open at descriptor) another command holds: it names that
    command's process id."""
    return PatchdbError(f"another patchdb command is writing to {target} (pid {_holder(descriptor)}); wait for it or "
                        f"choose another {option}")


def _holder(descriptor: int) -> str:
    """The process id in a held lock file open at descriptor. Its holder writes it just after taking the lock, so an
    empty file is read again for up to 0.1 s before the id is 'unknown'."""
    for _ in range(10):
        text = _written_pid(descriptor)
        if text:
            return text
        time.sleep(0.01)
    return "unknown"


def _written_pid(descriptor: int) -> str:
    """The text of the lock file open at descriptor: its holder's process id, or '' before the holder wrote it."""
    return os.pread(descriptor, 32, 0).decode(errors="replace").strip()


def lock_holder(folder: "str | os.PathLike") -> str | None:
    """The process id of the command that holds folder's lock (folder_lock), or None where no command holds it."""
    if fcntl is None:
        return None
    try:
        descriptor = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        written = _written_pid(descriptor)
        if not (written.isdigit() and process_alive(int(written))):
            return None  # a lock file left by a killed command, or one not yet locked: probing it could refuse its locker
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released at the close: only a probe
    except BlockingIOError:
        return written
    except OSError:  # a file system without locks
        return None
    finally:
        os.close(descriptor)
    return None


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs (perhaps another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_file(descriptor: int, path: Path) -> bool:
    """Whether the open file descriptor is the file at path (not one that was removed from there)."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (found.st_dev, found.st_ino) == (opened.st_dev, opened.st_ino)


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


def save_figure(figure, path: "str | os.PathLike", dpi: int = 100, software: str | None = None) -> None:
    """A matplotlib figure as a PNG at path, atomically; software: the PNG's Software text (matplotlib's otherwise),
    which figure_software reads back."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi, metadata=None if software is None else {"Software": software})


def figure_software(path: "str | os.PathLike") -> str | None:
    """The Software text of the PNG at path (None where it has none or is not a readable PNG)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.info.get("Software")
    except (OSError, UnidentifiedImageError):
        return None
