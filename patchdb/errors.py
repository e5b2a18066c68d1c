"""The one exception type that the command line shows as a message rather than a traceback, and the output folders
whose creation raises it."""

from pathlib import Path


class PatchdbError(Exception):
    """A problem with the user's input or files; the message names the problem and the fix."""


def output_folder(path: "str | Path", option: str = "--out") -> Path:
    """path as a Path, created with its parents if need be; a PatchdbError naming option where it cannot be."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PatchdbError(f"cannot create the output folder {folder} ({error.strerror}); choose another {option}") from None
    return folder
