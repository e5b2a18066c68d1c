"""Training images for the machines: readers, named data sets, data set specs and the paper's preprocessing.

Every data set ends up as a :class:`Dataset`: float32 images of shape (N, C, 32, 32) with pixels in
[-1, 1] (the paper's bilinear resize to 32x32, antialiased where it shrinks, then x / 127.5 - 1), optional
int64 class labels, the spec it came from and a sha256 fingerprint of its contents.

A spec is one of

- ``None`` or ``"default[:LIMIT]"``: 1,000 real Fashion-MNIST training images (the first 100 of each
  class, in file order) shipped inside the package;
- ``NAME[:SPLIT][:LIMIT]`` with NAME in :data:`NAMED_DATASETS`, SPLIT ``train`` (default) or ``test``,
  LIMIT a positive count of images taken from the start of the split;
- ``file:PATH[:LIMIT]`` with PATH an ``.npz`` file, an IDX images file (labels file found beside it)
  or an image folder (one sub-folder per class).

Named data sets are looked for in ``data_dir``, then ``$PATCHDB_DATA``, then the folder that
``patchdb fetch-data`` writes to by default, then where systems install them (Debian's package
``dataset-fashion-mnist`` puts Fashion-MNIST in /usr/share/datasets/fashion-mnist).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import io
import os
import pickle
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from patchdb.errors import PatchdbError, user_path

IMAGE_SIZE = 32
"""Side in pixels of every preprocessed image, as in the paper."""

NAMED_DATASETS = ("mnist", "fashion-mnist", "cifar10", "celeba")
SPLITS = ("train", "test")
DEFAULT_SPEC = "default"
DEFAULT_RESOURCE = "fashion-mnist-1000.npz"
DATA_ENV_VAR = "PATCHDB_DATA"
SYSTEM_DATA_DIRS = (Path("/usr/share/datasets"), Path("/usr/local/share/datasets"))
"""Roots where operating-system packages install data sets, searched last."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FOLDER_CHUNK = 1024
"""Images of an image folder resized per chunk, so a large folder (CelebA) never sits in memory at full size."""
FOLDER_PROGRESS_MIN = 2000
"""Image folders with at least this many files show a progress bar while they are read."""

_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"

# Sub-folders of a data root that may hold each named set; "" is the root itself.
_FOLDER_NAMES = {
    "mnist": ("mnist", "mnist-10k", ""),
    "fashion-mnist": ("fashion-mnist", ""),
    "cifar10": ("cifar10", "cifar-10-batches-py", ""),
    "celeba": ("celeba",),
}
# IDX file-name stems per (name, split): the standard names, and for MNIST the 10,000-digit subset
# of ../shared/data, which counts as a training split.
_IDX_STEMS = {
    ("mnist", "train"): ("train", "mnist-10k"),
    ("mnist", "test"): ("t10k",),
    ("fashion-mnist", "train"): ("train",),
    ("fashion-mnist", "test"): ("t10k",),
}
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_CIFAR_SIDE = 32


@dataclass(frozen=True, eq=False)
class Dataset:
    """Preprocessed training images.

    images: (N, C, H, W) float32 in [-1, 1], H = W = IMAGE_SIZE.
    labels: (N,) int64 class indices, or None for unlabelled data.
    name: the spec the data set was loaded from (e.g. "fashion-mnist:train:1000", "default").
    fingerprint: sha256 hex of the images (little-endian float32, C order) followed by the labels
        (little-endian int64) when there are labels; see :func:`fingerprint_of`.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    name: str
    fingerprint: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.float32 or self.images.ndim != 4:
            raise ValueError(f"images must be a (N, C, H, W) float32 tensor, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels is not None and (self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]):
            raise ValueError(f"labels must be a ({self.images.shape[0]},) int64 tensor, "
                             f"got {self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int | None:
        """1 + the largest label, or None for unlabelled data."""
        return None if self.labels is None else int(self.labels.max()) + 1

    @property
    def classes(self) -> torch.Tensor | None:
        """(K,) int64 the labels that occur, ascending (what a class-conditional sample draws from), or None."""
        return None if self.labels is None else torch.unique(self.labels)

    def indices_of_label(self, label: int) -> torch.Tensor:
        """(M,) int64 indices of the images of class ``label``, in data set order."""
        if self.labels is None:
            raise PatchdbError(
                f"data set {self.name!r} has no labels, so it cannot be restricted to class {label}; "
                "use a labelled data set (e.g. fashion-mnist) or drop the class")
        indices = torch.nonzero(self.labels == label).flatten()
        if indices.numel() == 0:
            present = ", ".join(str(value) for value in torch.unique(self.labels).tolist())
            raise PatchdbError(f"data set {self.name!r} has no images of class {label}; its classes are {present}")
        return indices

    def with_label(self, label: int) -> Dataset:
        """The images of class ``label`` only; the name gets ":label=L"."""
        indices = self.indices_of_label(label)
        return make_dataset(self.images[indices], self.labels[indices], f"{self.name}:label={label}")


def label_groups(labels: torch.Tensor | None, batch: int, device: "torch.device | str" = "cpu"
                 ) -> list[tuple[int | None, torch.Tensor]]:
    """A batch's samples by class: (label, member indices (n,) int64 on device) for each label of labels (B,), or one
    group (None, all B) without labels. Class-conditional models score each group against its class's images."""
    if labels is None:
        return [(None, torch.arange(batch, device=device))]
    labels = labels.to(device)
    return [(int(label), torch.nonzero(labels == label).squeeze(1)) for label in torch.unique(labels)]


def fingerprint_of(images: torch.Tensor, labels: torch.Tensor | None) -> str:
    """sha256 hex of (N, C, H, W) float32 images and optional (N,) int64 labels."""
    digest = hashlib.sha256(images.detach().cpu().contiguous().numpy().astype("<f4", copy=False).tobytes())
    if labels is not None:
        digest.update(labels.detach().cpu().contiguous().numpy().astype("<i8", copy=False).tobytes())
    return digest.hexdigest()


def make_dataset(images: torch.Tensor, labels: torch.Tensor | None, name: str) -> Dataset:
    """A :class:`Dataset` of preprocessed tensors, with its fingerprint computed."""
    images = images.contiguous()
    labels = None if labels is None else labels.contiguous()
    return Dataset(images, labels, name, fingerprint_of(images, labels))


# ---------------------------------------------------------------- preprocessing


def preprocess(images: np.ndarray) -> torch.Tensor:
    """The paper's preprocessing: (N, C, 32, 32) float32 in [-1, 1].

    uint8 input, (N, H, W) or (N, H, W, C) with C in {1, 3}: bilinear resize to 32x32, then x / 127.5 - 1.
    uint16 input, same shapes: first rounded to 8 bits from 0..65535 (as 16-bit image files are), then as uint8.
    Float input, (N, C, H, W) already in [-1, 1]: passed through, resized only if not 32x32.

    The resize (align_corners=False) leaves 32x32 arrays as they are; it is antialiased (each output pixel
    averages the input pixels it covers) where a side shrinks, e.g. CelebA's 178x218, and plain bilinear where
    both sides grow (28x28 MNIST). A non-square image is stretched to 32x32 (nothing is cropped), so its
    aspect ratio changes: crop such images beforehand to keep it.
    """
    _check_image_array(images, "the images")
    return _to_tensor(images)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """preprocess() of an array that passed _check_image_array."""
    if images.dtype == np.uint16:
        images = _eight_bit(images)
    if images.dtype == np.uint8:
        pixels = torch.from_numpy(np.ascontiguousarray(images))
        pixels = pixels.unsqueeze(1) if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)
        resized = _resize(pixels.to(torch.float32))
        # Interpolation weights sum to 1 only up to rounding; the clamp keeps the range exact.
        return (resized / 127.5 - 1.0).clamp_(-1.0, 1.0).contiguous()
    return _resize(torch.from_numpy(np.array(images, dtype=np.float32))).clamp_(-1.0, 1.0).contiguous()


def _resize(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float32 -> (N, C, 32, 32): bilinear, antialiased where H or W exceeds 32 (see preprocess)."""
    if images.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE):
        return images
    shrinks = max(images.shape[-2:]) > IMAGE_SIZE
    return F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=shrinks)


def _eight_bit(pixels: np.ndarray) -> np.ndarray:
    """16-bit pixels (any integer array, 0..65535) as uint8, rounded from 0..65535 to 0..255 (values outside clipped)."""
    return np.round(np.asarray(pixels, dtype=np.float32) * (255 / 65535)).clip(0, 255).astype(np.uint8)


def _check_image_array(images: np.ndarray, source: str) -> None:
    """Raise PatchdbError unless ``images`` is uint8 or uint16 (N,H,W)/(N,H,W,C) or float (N,C,H,W) in [-1, 1]."""
    if images.dtype in (np.uint8, np.uint16):
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
            raise PatchdbError(f"{source}: wrong shape {images.shape} for {images.dtype} images; "
                               "expected (N, H, W) or (N, H, W, C) with C = 1 or 3")
    elif np.issubdtype(images.dtype, np.floating):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise PatchdbError(
                f"{source}: wrong shape {images.shape} for float images; expected (N, C, H, W) with C = 1 or 3")
        if not np.isfinite(images).all():
            raise PatchdbError(f"{source}: float images contain NaN or infinite values")
        if images.size and (images.min() < -1.0 or images.max() > 1.0):
            raise PatchdbError(
                f"{source}: float images must lie in [-1, 1], found values in [{images.min():g}, {images.max():g}]; "
                "store uint8 pixels (0-255) or scale the floats as x / 127.5 - 1")
    else:
        raise PatchdbError(f"{source}: unsupported pixel type {images.dtype}; "
                           "use uint8 (0-255), uint16 (0-65535) or float32 in [-1, 1]")
    if images.shape[0] == 0 or min(images.shape[1:]) == 0:
        raise PatchdbError(f"{source}: holds no images (shape {images.shape})")


def _check_labels(labels: np.ndarray, num_images: int, source: str) -> np.ndarray:
    """Labels as (N,) int64, or PatchdbError naming ``source``."""
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise PatchdbError(f"{source}: labels must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}")
    if labels.shape[0] != num_images:
        raise PatchdbError(f"{source}: {labels.shape[0]} labels for {num_images} images; the counts must match")
    if labels.size and labels.min() < 0:
        raise PatchdbError(f"{source}: labels must be class indices >= 0, found {labels.min()}")
    if labels.size and labels.max() >= MAX_CLASSES:  # compared in the labels' own dtype: uint64 values would wrap in int64
        raise PatchdbError(f"{source}: labels must be class indices below {MAX_CLASSES}, found {labels.max()}; "
                           "number the classes 0, 1, 2, ...")
    return labels.astype(np.int64)


MAX_CLASSES = 2**16
"""Labels are class indices below this (a conditional network holds an embedding row per index up to the largest)."""


# ---------------------------------------------------------------- readers


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array of an IDX file (the MNIST format), gzip-compressed or raw, in native byte order."""
    path = Path(path)
    raw = _read_bytes(path)
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise PatchdbError(f"{path}: corrupt or truncated gzip data ({error}); download the file again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise PatchdbError(
            f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'none'}; "
            "expected 00 00, a type code and the number of dimensions)")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise PatchdbError(f"{path}: truncated IDX file: the header needs {header_size} bytes, the file has {len(raw)}")
    shape = tuple(int(size) for size in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data_size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header_size
    if found < data_size:
        raise PatchdbError(f"{path}: truncated IDX file: shape {shape} needs {data_size} bytes of data, found {found}")
    if found > data_size:
        raise PatchdbError(f"{path}: corrupt IDX file: {found - data_size} bytes follow the {shape} data")
    array = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def read_cifar10(path: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 python batches: uint8 images (N, 32, 32, 3) and int64 labels (N,).

    ``path`` is the extracted ``cifar-10-batches-py`` folder, a folder containing it, or the
    ``cifar-10-python.tar.gz`` archive. The train split is data_batch_1 ... data_batch_5 in order.
    """
    path = Path(path)
    if split not in _CIFAR_BATCHES:
        raise PatchdbError(f"unknown CIFAR-10 split {split!r}; use one of {', '.join(SPLITS)}")
    batches = [_cifar_batch(source, raw) for source, raw in _cifar_batch_sources(path, split)]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    return images, labels


def _cifar_batch_sources(path: Path, split: str) -> Iterator[tuple[str, bytes]]:
    """(batch file name, its bytes) for each batch of ``split``."""
    names = _CIFAR_BATCHES[split]
    if path.is_dir():
        folder = path / _CIFAR_FOLDER if (path / _CIFAR_FOLDER).is_dir() else path
        for name in names:
            yield str(folder / name), _read_bytes(folder / name)
        return
    _check_file(path)
    try:
        with tarfile.open(path, "r:*") as archive:
            members = {Path(member.name).name: member for member in archive.getmembers() if member.isfile()}
            for name in names:
                if name not in members:
                    raise PatchdbError(f"{path}: the archive has no {name}; is it cifar-10-python.tar.gz?")
                yield f"{path}:{members[name].name}", archive.extractfile(members[name]).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise PatchdbError(f"{path}: corrupt or truncated archive ({error}); download cifar-10-python.tar.gz again") from None


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-10 batches hold (dicts, lists, bytes, numpy arrays), never code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR-10 batch")
        return super().find_class(module, name)


def _cifar_batch(source: str, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as error:  # a damaged pickle raises anything from EOFError to ValueError
        raise PatchdbError(f"{source}: not a readable CIFAR-10 python batch ({type(error).__name__}: {error})") from None
    if not isinstance(batch, dict):
        raise PatchdbError(f"{source}: not a CIFAR-10 python batch (no dict inside)")
    batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise PatchdbError(f"{source}: not a CIFAR-10 python batch (needs keys 'data' and 'labels', has {sorted(batch)})")
    data = np.asarray(batch["data"])
    pixels_per_image = 3 * _CIFAR_SIDE * _CIFAR_SIDE
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels_per_image:
        raise PatchdbError(f"{source}: wrong shape: 'data' must be uint8 (N, {pixels_per_image}), got {data.dtype} {data.shape}")
    labels = _check_labels(np.asarray(batch["labels"]), data.shape[0], source)
    # Each row holds the red, then green, then blue plane, each row-major.
    images = data.reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _image_folder_files(folder: Path) -> list[tuple[Path, int]]:
    """(image file, class index) in reading order."""
    if not folder.is_dir():
        raise PatchdbError(f"{folder}: image folder not found" if not folder.exists() else f"{folder}: not a folder")
    class_folders = sorted(entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    loose = [entry.name for entry in folder.iterdir() if entry.suffix.lower() in IMAGE_SUFFIXES and entry.is_file()]
    if class_folders and loose:
        raise PatchdbError(f"{folder}: holds images ({', '.join(sorted(loose)[:3])}, ...) beside its class sub-folders, which "
                           "would be left out; move them into a class sub-folder")
    if not class_folders:
        class_folders = [folder]
    nested = [entry for class_folder in class_folders if class_folder != folder for entry in class_folder.iterdir()
              if entry.is_dir() and not entry.name.startswith(".")]
    if nested:
        raise PatchdbError(f"{nested[0]}: a folder inside a class folder, whose images would be left out; lay the data out "
                           "as FOLDER/CLASS/IMAGE, one level of class sub-folders")
    files = [
        (file, label)
        for label, class_folder in enumerate(class_folders)
        for file in sorted(class_folder.iterdir())
        if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file()
    ]
    if not files:
        raise PatchdbError(
            f"{folder}: empty folder: no images ({', '.join(IMAGE_SUFFIXES)}) in it or in its sub-folders; "
            "lay it out as FOLDER/CLASS/IMAGE, one sub-folder per class")
    return files


def _is_sixteen_bit(mode: str) -> bool:
    """Whether a Pillow mode holds 16-bit grey pixels: I;16, I;16B, I;16L, I;16N (any byte order)."""
    return mode.startswith("I;16")


def _is_grey(image) -> bool:
    """Whether a Pillow image is grey: modes 1, L, LA, I and the 16-bit modes, or a palette image ("P") whose pixels
    all use grey palette entries (red = green = blue)."""
    if image.mode == "P":
        colours = np.asarray(image.convert("RGB"))
        return bool((colours == colours[:, :, :1]).all())
    return image.mode in ("1", "L", "LA", "I") or _is_sixteen_bit(image.mode)


def _grey_pixels(image) -> np.ndarray:
    """A grey image's (_is_grey) pixels as uint8 (H, W); 16-bit images rescaled from 0..65535 (Pillow's own conversion
    to 8 bits clips them at 255, turning most pixels white)."""
    if _is_sixteen_bit(image.mode) or (image.mode == "I" and np.asarray(image).max() > 255):
        return _eight_bit(np.asarray(image))
    return np.asarray(image.convert("L"), dtype=np.uint8)


def _iter_image_folder(folder: Path, limit: int | None) -> Iterator[tuple[np.ndarray, int]]:
    """(uint8 (H, W, C) image, class index) for each image of an image folder, in reading order."""
    files = _image_folder_files(folder)[:limit]
    first_file, first_shape, grey = None, None, None
    for file, label in tqdm(files, desc=f"reading {folder.name}", unit="image", disable=len(files) < FOLDER_PROGRESS_MIN):
        try:
            with Image.open(file) as image:
                if image.mode == "F":  # Pillow's conversion to 8 bits truncates them: [0, 1] became all black
                    raise PatchdbError(f"{file}: an image of floating-point pixels, which have no fixed range; save the "
                                       "images as 8- or 16-bit")
                is_grey = _is_grey(image)
                if grey is None:
                    grey = is_grey
                elif is_grey != grey:
                    raise PatchdbError(
                        f"{file}: image folder mixes grey and colour images ({file.name} is {image.mode}, "
                        f"{first_file.name} is {'grey' if grey else 'colour'}); convert them to one kind")
                pixels = _grey_pixels(image) if grey else np.asarray(image.convert("RGB"), dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as error:
            raise PatchdbError(f"{file}: not a readable image ({error})") from None
        pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
        if first_shape is None:
            first_file, first_shape = file, pixels.shape
        elif pixels.shape != first_shape:
            raise PatchdbError(
                f"{file}: wrong shape: all images of a folder must have one size; this one is "
                f"{pixels.shape[1]}x{pixels.shape[0]}, {first_file.name} is {first_shape[1]}x{first_shape[0]}")
        yield pixels, label


def read_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """``images`` (uint8 or uint16 (N,H,W) or (N,H,W,C), or float (N,C,H,W) in [-1,1]) and optional ``labels`` (N,) int64
    of an .npz, as stored (preprocess scales uint16 from 0..65535)."""
    path = Path(path)
    _check_file(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            if "images" not in keys:
                raise PatchdbError(f"{path}: no 'images' array in the .npz (it has {keys or 'nothing'}); "
                                   "save it with np.savez(path, images=..., labels=...)")
            images = archive["images"]
            labels = archive["labels"] if "labels" in keys else None
    except ValueError as error:
        raise PatchdbError(f"{path}: {numpy_load_problem(path, error, '.npz')}; save numeric arrays with "
                           "np.savez(path, images=..., labels=...)") from None
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as error:
        raise PatchdbError(f"{path}: not a readable .npz file ({error})") from None
    _check_image_array(images, str(path))
    if labels is not None:
        labels = _check_labels(labels, images.shape[0], str(path))
    return images, labels


def numpy_load_problem(path: Path, error: ValueError, kind: str) -> str:
    """Why np.load(path, allow_pickle=False) raised error, in words, for a file meant to be a kind ('.npz' or '.npy')
    of numeric arrays. numpy's own message advises loading untrusted pickles, and it takes any file that is neither an
    archive nor an array for a pickle."""
    if "allow_pickle" not in str(error):
        return f"not a readable {kind} file ({error})"
    with path.open("rb") as file:
        head = file.read(6)
    if head.startswith((b"PK", b"\x93NUMPY", b"\x80")):  # an archive or array of objects, or a pickle itself
        return "holds Python objects (pickled), which patchdb does not load"
    return f"is not an {kind} file (it starts with neither the .npz (zip) nor the .npy header)"


def _check_file(path: Path) -> None:
    """PatchdbError unless ``path`` is an existing file."""
    if not path.exists():
        raise PatchdbError(f"{path}: file not found")
    if not path.is_file():
        raise PatchdbError(f"{path}: not a file")


def _read_bytes(path: Path) -> bytes:
    _check_file(path)
    try:
        return path.read_bytes()
    except OSError as error:
        raise PatchdbError(f"{path}: cannot read the file ({error.strerror})") from None


# ---------------------------------------------------------------- specs and lookup


def load_dataset(spec: str | None = None, data_dir: str | os.PathLike | None = None) -> Dataset:
    """The preprocessed data set a spec names (see the module docstring for the grammar)."""
    spec = DEFAULT_SPEC if spec is None else spec.strip()
    if is_default_spec(spec):
        _, _, limit_text = spec.partition(":")
        return _load_default(spec, _parse_limit(limit_text, spec) if limit_text else None)
    file_spec = _file_spec(spec)
    if file_spec is not None:
        return _load_path(*file_spec, spec)
    name, split, limit = _parse_named_spec(spec)
    roots = data_roots(data_dir)
    for root, _ in roots:
        for folder in _candidate_folders(name, root):
            source = _source_in_folder(name, split, folder)
            if source is not None:
                return _load_named_source(name, split, source, limit, spec)
    raise PatchdbError(_not_found_message(name, split, roots))


def data_roots(data_dir: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """(root folder, where it comes from) in lookup order: data_dir, $PATCHDB_DATA, user cache, system."""
    roots = []
    if data_dir is not None:
        roots.append((user_path(data_dir, "--data-dir"), "--data-dir"))
    if os.environ.get(DATA_ENV_VAR):
        roots.append((user_path(os.environ[DATA_ENV_VAR], f"${DATA_ENV_VAR}"), f"${DATA_ENV_VAR}"))
    roots.append((user_cache_data_dir(), "patchdb's cache"))
    roots.extend((root, "system") for root in SYSTEM_DATA_DIRS)
    return roots


def user_cache_data_dir() -> Path:
    """Folder for downloaded data sets: $XDG_CACHE_HOME/patchdb/data, by default ~/.cache/patchdb/data."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "patchdb" / "data"


def _parse_named_spec(spec: str) -> tuple[str, str, int | None]:
    parts = spec.split(":")
    name = parts[0].lower()
    if name not in NAMED_DATASETS:
        raise PatchdbError(
            f"unknown data set {parts[0]!r} in spec {spec!r}; use one of {', '.join(NAMED_DATASETS)} "
            f"as NAME[:SPLIT][:LIMIT], default[:LIMIT], or file:PATH[:LIMIT]")
    if len(parts) > 3:
        raise PatchdbError(f"bad data set spec {spec!r}: too many ':' parts; "
                           "use NAME[:SPLIT][:LIMIT], e.g. fashion-mnist:train:1000")
    split, limit = "train", None
    if len(parts) == 3:
        split, limit = parts[1], _parse_limit(parts[2], spec)
    elif len(parts) == 2 and not parts[1].lstrip("+-").isdigit():
        split = parts[1]
    elif len(parts) == 2:
        limit = _parse_limit(parts[1], spec)
    if split not in SPLITS:
        raise PatchdbError(f"bad split {split!r} in spec {spec!r}; use one of {', '.join(SPLITS)} (or a LIMIT count)")
    return name, split, limit


def _parse_limit(text: str, spec: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise PatchdbError(f"bad LIMIT {text!r} in spec {spec!r}: it must be a positive whole number of images")
    return int(text)


def is_default_spec(spec: str | None) -> bool:
    """Whether spec names the embedded default data set (None, default or default:LIMIT)."""
    return spec is None or spec.strip().split(":")[0] == DEFAULT_SPEC


def spec_file(spec: str | None) -> Path | None:
    """The PATH of a file:PATH[:LIMIT] spec (None for other specs); PatchdbError where it does not exist."""
    parsed = _file_spec(spec)
    return None if parsed is None else parsed[0]


def portable_spec(spec: str | None) -> str | None:
    """spec as it reads from any working directory: a file: spec with its path made absolute; others unchanged."""
    parsed = _file_spec(spec)
    if parsed is None:
        return spec
    path, limit = parsed
    return f"file:{path.resolve()}" + ("" if limit is None else f":{limit}")


def _file_spec(spec: str | None) -> tuple[Path, int | None] | None:
    """PATH and LIMIT of a file:PATH[:LIMIT] spec (_parse_file_spec), None for other specs."""
    if spec is None or not spec.strip().startswith("file:"):
        return None
    return _parse_file_spec(spec.strip()[len("file:"):])


def _parse_file_spec(rest: str) -> tuple[Path, int | None]:
    """PATH and LIMIT of ``file:PATH[:LIMIT]``; a path that exists as written wins over a LIMIT reading."""
    if not rest:
        raise PatchdbError("empty path in spec 'file:'; use file:PATH[:LIMIT]")
    path = user_path(rest, "spec file:")
    head, colon, tail = rest.rpartition(":")
    if path.exists():
        return path, None
    head_path = user_path(head, "spec file:")
    if colon and head_path.exists():
        return head_path, _parse_limit(tail, f"file:{rest}")
    missing = head_path if colon and tail.isdigit() else path
    raise PatchdbError(f"{missing}: file not found (spec file:{rest})")


def _candidate_folders(name: str, root: Path) -> list[Path]:
    """Where name may lie under root: its sub-folders, and root itself unless root is named after another data set
    (MNIST and Fashion-MNIST files have the same names, so a fashion-mnist folder would pass for MNIST)."""
    others = {folder for other, folders in _FOLDER_NAMES.items() if other != name for folder in folders if folder}
    return [root / sub if sub else root for sub in _FOLDER_NAMES[name] if sub or root.name.lower() not in others]


def _source_in_folder(name: str, split: str, folder: Path) -> Path | None:
    """The file or folder holding ``name``'s ``split`` in ``folder``, or None."""
    if not folder.is_dir():
        return None
    if name in ("mnist", "fashion-mnist"):
        for stem in _IDX_STEMS[(name, split)]:
            for suffix in (".gz", ""):
                candidate = folder / f"{stem}-images-idx3-ubyte{suffix}"
                if candidate.is_file():
                    return candidate
        return None
    if name == "cifar10":
        for batches in (folder, folder / _CIFAR_FOLDER):
            if (batches / _CIFAR_BATCHES[split][0]).is_file():
                return batches
        return folder / _CIFAR_ARCHIVE if (folder / _CIFAR_ARCHIVE).is_file() else None
    return folder


def _load_named_source(name: str, split: str, source: Path, limit: int | None, spec: str) -> Dataset:
    if name in ("mnist", "fashion-mnist"):
        return _load_idx(source, limit, spec, labels_required=True)
    if name == "cifar10":
        images, labels = read_cifar10(source, split)
        return _finish(images, labels, limit, spec, str(source))
    if split != "train":
        raise PatchdbError(f"{source}: an image folder has only one split; use {name} or {name}:train")
    return _load_image_folder(source, limit, spec)


def _load_path(path: Path, limit: int | None, spec: str) -> Dataset:
    if path.is_dir():
        return _load_image_folder(path, limit, spec)
    if path.suffix.lower() == ".npz":
        images, labels = read_npz(path)
        return _finish(images, labels, limit, spec, str(path))
    return _load_idx(path, limit, spec)


def _load_idx(images_path: Path, limit: int | None, spec: str, labels_required: bool = False) -> Dataset:
    """An IDX images file and, when one lies beside it, its labels file. With labels_required (a named data set, which
    comes with its labels) a missing labels file is a PatchdbError naming it; a file: spec loads the images alone."""
    images = read_idx(images_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise PatchdbError(
            f"{images_path}: wrong shape for an IDX images file: expected uint8 (N, H, W), got {images.dtype} {images.shape}")
    labels_path = _labels_beside(images_path)
    if labels_path is None and labels_required:
        raise PatchdbError(
            f"{images_path.with_name(_labels_name(images_path))}: file not found: data set {spec!r} has its images "
            f"({images_path.name}) but not their labels file; download it again (patchdb fetch-data writes both), "
            f"or load the images without labels as file:{images_path}")
    labels = None
    if labels_path is not None:
        labels = _check_labels(read_idx(labels_path), images.shape[0], str(labels_path))
    return _finish(images, labels, limit, spec, str(images_path))


def _labels_name(images_path: Path) -> str:
    """The name of the IDX labels file that goes with ``images_path`` (``...-images-idx3-...`` -> ``...-labels-idx1-...``)."""
    return images_path.name.replace("images", "labels").replace("idx3", "idx1")


def _labels_beside(images_path: Path) -> Path | None:
    """The IDX labels file named like ``images_path`` (_labels_name, with or without .gz), or None."""
    labels_name = _labels_name(images_path)
    if labels_name == images_path.name:
        return None
    stem = labels_name.removesuffix(".gz")
    for candidate in (images_path.with_name(stem + ".gz"), images_path.with_name(stem)):
        if candidate.is_file():
            return candidate
    return None


def _load_image_folder(folder: Path, limit: int | None, spec: str) -> Dataset:
    """An image folder, resized chunk by chunk."""
    images, labels, chunk = [], [], []
    for pixels, label in _iter_image_folder(folder, limit):
        chunk.append(pixels)
        labels.append(label)
        if len(chunk) == FOLDER_CHUNK:
            images.append(preprocess(np.stack(chunk)))
            chunk = []
    if chunk:
        images.append(preprocess(np.stack(chunk)))
    if limit is not None and len(labels) < limit:
        raise _limit_error(limit, len(labels), str(folder))
    return make_dataset(torch.cat(images), torch.tensor(labels, dtype=torch.int64), spec)


def _finish(images: np.ndarray, labels: np.ndarray | None, limit: int | None, spec: str, source: str) -> Dataset:
    """Apply LIMIT, preprocess, wrap."""
    if limit is not None:
        if limit > images.shape[0]:
            raise _limit_error(limit, images.shape[0], source)
        images = images[:limit]
        labels = None if labels is None else labels[:limit]
    _check_image_array(images, source)
    tensor_labels = None if labels is None else torch.from_numpy(np.ascontiguousarray(labels))
    return make_dataset(_to_tensor(images), tensor_labels, spec)


def _limit_error(limit: int, available: int, source: str) -> PatchdbError:
    return PatchdbError(f"bad LIMIT {limit}: {source} holds only {available} images; use a LIMIT of at most {available}")


def _load_default(spec: str, limit: int | None) -> Dataset:
    resource = importlib.resources.files("patchdb") / "resources" / DEFAULT_RESOURCE
    try:
        with resource.open("rb") as file:
            with np.load(file, allow_pickle=False) as archive:
                images, labels = archive["images"], archive["labels"]
    except (KeyError, ValueError, zipfile.BadZipFile, OSError, EOFError, zlib.error) as error:
        # numpy's own message about pickled data would advise loading it unsafely
        problem = "not an .npz of numeric arrays" if "allow_pickle" in str(error) else error
        raise PatchdbError(
            f"the installed patchdb package is damaged: its default data set patchdb/resources/{DEFAULT_RESOURCE} is "
            f"missing or unreadable ({problem}); reinstall patchdb or regenerate it with benchmarks/make_default_subset.py"
        ) from None
    return _finish(images, _check_labels(labels, images.shape[0], DEFAULT_RESOURCE), limit, spec, DEFAULT_RESOURCE)


def _not_found_message(name: str, split: str, roots: list[tuple[Path, str]]) -> str:
    if name in ("mnist", "fashion-mnist"):
        wanted = " or ".join(f"{stem}-images-idx3-ubyte[.gz]" for stem in _IDX_STEMS[(name, split)])
        wanted += " (labels file beside it)"
    elif name == "cifar10":
        wanted = f"{_CIFAR_FOLDER}/ ({', '.join(_CIFAR_BATCHES[split])}) or {_CIFAR_ARCHIVE}"
    else:
        wanted = "an image folder (one sub-folder per class)"
    lines = [f"data set {name!r} ({split} split) not found: looked for {wanted} in"]
    for root, origin in roots:
        state = "" if root.is_dir() else "  (does not exist)"
        folders = ", ".join(str(folder) for folder in _candidate_folders(name, root))
        lines.append(f"  - {folders}  [{origin}]{state}")
    if not os.environ.get(DATA_ENV_VAR):
        lines.append(f"  (${DATA_ENV_VAR} is not set)")
    lines.append("To get it:")
    if name == "fashion-mnist":
        lines.append("  - on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist "
                     "(installs /usr/share/datasets/fashion-mnist)")
    lines.append(f"  - patchdb fetch-data {name} --data-dir DIR"
                 + ("  (prints how to download it by hand)" if name == "celeba" else ""))
    lines.append(f"  - then pass --data-dir DIR or set {DATA_ENV_VAR}=DIR, with the files in DIR/{name}/")
    lines.append("  - or name no data set to use the embedded default (1,000 Fashion-MNIST training images)")
    return "\n".join(lines)
