"""Download the named data sets from their own sites into a data folder (``patchdb fetch-data``).

Nothing else in patchdb depends on this module: the loaders in patchdb.data only read files.
Every file is downloaded to a temporary name beside its destination, synced to disk, checked, then renamed (as
patchdb.files.atomic_path writes), so that a stopped fetch (even by a power cut) never leaves a half-written file; the
data set's folder is locked while its files are fetched.

Checks. For Fashion-MNIST we hold sha256 values computed here from Debian's copy of the files
(../shared/data/fashion-mnist). Debian recompressed the archives (their gzip bytes differ from the
project's: the md5 values that the Fashion-MNIST project publishes do not match Debian's .gz files),
so the sha256 is taken over the decompressed IDX payload, which gzip metadata does not change.
For MNIST and CIFAR-10 no copy was available where this table was written, so no hash is listed;
those downloads are checked by reading them (IDX header, counts and shapes; CIFAR-10 batches).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from patchdb.data import DATA_ENV_VAR, GZIP_MAGIC, NAMED_DATASETS, read_cifar10, read_idx, user_cache_data_dir
from patchdb.errors import PatchdbError, output_folder, user_path
from patchdb.files import folder_lock

FETCHABLE = NAMED_DATASETS
DOWNLOAD_TIMEOUT_S = 60
CHUNK_BYTES = 1 << 20

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
MNIST_URLS = ("https://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/"

CELEBA_INSTRUCTIONS = """\
CelebA cannot be downloaded automatically: its authors distribute it through Google Drive, which
needs a browser. To install it by hand:
  1. open https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html and download img_align_celeba.zip
     (under "Align&Cropped Images");
  2. unzip it into {folder}, so that the images lie in {folder}/img_align_celeba/000001.jpg, ...
     (each sub-folder of {folder} is read as one class; CelebA is used unconditionally);
  3. use --data-dir {root} or set {env}={root}."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a data set: where to get it and how to check it.

    payload_sha256: sha256 of the file's content after gunzip (of the raw bytes if not gzip),
        or None where no copy was available to compute it.
    check_format: reads the downloaded file and raises PatchdbError if it is not what it should be.
    """

    name: str
    urls: tuple[str, ...]
    payload_sha256: str | None
    check_format: Callable[[Path], None]


def _idx_shape_check(shape: tuple[int, ...]) -> Callable[[Path], None]:
    def check(path: Path) -> None:
        found = read_idx(path).shape
        if found != shape:
            raise PatchdbError(f"{path}: wrong shape {found}, expected {shape}; the download is not the expected file")
    return check


def _check_cifar10_archive(path: Path) -> None:
    for split, count in (("train", 50_000), ("test", 10_000)):
        images, _ = read_cifar10(path, split)
        if images.shape != (count, 32, 32, 3):
            raise PatchdbError(f"{path}: the {split} split has shape {images.shape}, expected ({count}, 32, 32, 3)")


def _mnist_like(urls: tuple[str, ...], sha256: dict[str, str | None]) -> tuple[RemoteFile, ...]:
    shapes = {"train-images-idx3-ubyte.gz": (60_000, 28, 28), "train-labels-idx1-ubyte.gz": (60_000,),
              "t10k-images-idx3-ubyte.gz": (10_000, 28, 28), "t10k-labels-idx1-ubyte.gz": (10_000,)}
    return tuple(RemoteFile(name, tuple(url + name for url in urls), sha256[name], _idx_shape_check(shape))
                 for name, shape in shapes.items())


SOURCES: dict[str, tuple[RemoteFile, ...]] = {
    "fashion-mnist": _mnist_like((FASHION_MNIST_URL,), {
        "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    }),
    "mnist": _mnist_like(MNIST_URLS, dict.fromkeys(
        ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))),
    "cifar10": (RemoteFile("cifar-10-python.tar.gz", (CIFAR10_URL + "cifar-10-python.tar.gz",), None, _check_cifar10_archive),),
}
"""Files of each downloadable data set, saved under DATA_DIR/NAME/."""


def default_fetch_dir() -> Path:
    """Where fetch-data writes by default: $PATCHDB_DATA if set, else $XDG_CACHE_HOME/patchdb/data (by default
    ~/.cache/patchdb/data)."""
    return user_path(os.environ[DATA_ENV_VAR], f"${DATA_ENV_VAR}") if os.environ.get(DATA_ENV_VAR) else user_cache_data_dir()


def payload_sha256(path: str | os.PathLike) -> str:
    """sha256 hex of a file's content, gunzipped first if it is gzip-compressed."""
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == GZIP_MAGIC
        digest = hashlib.sha256()
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as stream:
            while chunk := stream.read(CHUNK_BYTES):
                digest.update(chunk)
    except FileNotFoundError:
        raise PatchdbError(f"{path}: file not found") from None
    except (OSError, EOFError) as error:
        raise PatchdbError(f"{path}: cannot read the file to check it ({error}); it is corrupt or truncated") from None
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raise PatchdbError unless payload_sha256(path) equals ``expected``."""
    found = payload_sha256(path)
    if found != expected.lower():
        raise PatchdbError(
            f"{path}: checksum mismatch: sha256 of the content is {found}, expected {expected}; "
            "the download is corrupt or the file changed at its source; delete it and fetch again")


def verify_remote_file(remote: RemoteFile, path: Path) -> None:
    """Check a downloaded file: its payload hash where known, and its format."""
    if remote.payload_sha256 is not None:
        verify_sha256(path, remote.payload_sha256)
    remote.check_format(path)


def download_file(remote: RemoteFile, folder: Path, progress: bool = True) -> Path:
    """Download ``remote`` into ``folder`` (first URL that answers), sync it to disk, check it, then rename it into place."""
    output_folder(folder, "--data-dir")
    destination = folder / remote.name
    failures = []
    for url in remote.urls:
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{remote.name}.", suffix=".part")
        try:
            with os.fdopen(handle, "wb") as out:
                _copy_url(url, out, remote.name, progress)
                out.flush()
                os.fsync(out.fileno())  # on disk before the rename, or a power cut could leave an empty file in place
            verify_remote_file(remote, Path(temporary))
            os.chmod(temporary, 0o644)  # mkstemp creates files readable by their owner only
            os.replace(temporary, destination)
            return destination
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError, PatchdbError) as error:
            failures.append(f"{url}: {getattr(error, 'reason', error)}")
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    raise PatchdbError(
        f"could not download {remote.name}:\n  " + "\n  ".join(failures)
        + f"\nCheck the internet connection, or download the file by hand into {folder}")


def _copy_url(url: str, out, label: str, progress: bool) -> None:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=not progress) as bar:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                bar.update(len(chunk))


def fetch_dataset(name: str, data_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Download data set ``name`` into DATA_DIR/NAME/ (files already there and valid are kept), which is locked meanwhile
    (patchdb.files.folder_lock) so that two fetches never download the same files at once; return that folder."""
    folder = user_path(data_dir, "--data-dir") / name
    if name == "celeba":
        raise PatchdbError(CELEBA_INSTRUCTIONS.format(folder=folder, root=user_path(data_dir, "--data-dir"), env=DATA_ENV_VAR))
    if name not in SOURCES:
        raise PatchdbError(f"unknown data set {name!r}; fetch-data knows {', '.join(FETCHABLE)}")
    with folder_lock(folder, option="--data-dir"):
        for remote in SOURCES[name]:
            destination = folder / remote.name
            if destination.is_file() and _is_valid(remote, destination):
                continue
            download_file(remote, folder, progress)
    return folder


def _is_valid(remote: RemoteFile, path: Path) -> bool:
    try:
        verify_remote_file(remote, path)
    except PatchdbError:
        return False
    return True
