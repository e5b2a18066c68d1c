"""The one exception type that the command line shows as a message rather than a traceback, and the user's paths and
output folders whose checks raise it."""

import os
from pathlib import Path

WRITE_PROBE = "write-probe"
"""The name of the empty file (.write-probe.PID.tmp) that output_folder creates and removes to prove a folder writable."""


class PatchdbError(Exception):
    """A problem with the user's input or files; the message names the problem and the fix."""


def user_path(text: "str | os.PathLike", what: str) -> Path:
    """text as a Path with ~ and ~user expanded; a PatchdbError naming what (the option or variable) where it cannot be."""
    try:
        return Path(text).expanduser()
    except RuntimeError as error:  # ~user of no such user, or no home directory
        raise PatchdbError(f"{what} {str(text)!r}: {str(error).rstrip('.')}; "
                           "give a path without ~, or with an existing user's") from None


def output_folder(path: "str | os.PathLike", option: str = "--out") -> Path:
    """path as a Path (~ expanded, patchdb.errors.user_path), created with its parents if need be and proved writable by
    creating and removing a file in it; a PatchdbError naming option where it cannot be, raised before any work goes into
    the outputs."""
    if not str(path).strip():
        raise PatchdbError(f"{option} is empty; give a folder")
    folder = user_path(path, option)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PatchdbError(f"cannot create the output folder {folder} ({error.strerror}); choose another {option}") from None
    probe = folder / f".{WRITE_PROBE}.{os.getpid()}.tmp"  # named like patchdb.files' temporaries, which builds clear away
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600))
        probe.unlink()
    except OSError as error:
        raise PatchdbError(f"cannot write in the output folder {folder} ({error.strerror}); "
                           f"choose another {option}, or make it writable") from None
    return folder


def check_readable(path: Path) -> None:
    """A PatchdbError where the file at path exists but this user may not read it: the readers' own errors would
    call it damaged and advise rebuilding it."""
    if path.exists() and not os.access(path, os.R_OK):
        raise PatchdbError(f"cannot read {path}: permission denied; ask its owner for read access, or work on a copy")
