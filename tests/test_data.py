"""Readers, spec parsing, lookup order, preprocessing, fingerprints and download checks of patchdb.data / patchdb.fetch."""

import gzip
import hashlib
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import patchdb.data as data
from cli.main import main
from patchdb.data import (
    IMAGE_SIZE,
    load_dataset,
    preprocess,
    read_cifar10,
    read_idx,
    read_npz,
)
from patchdb.errors import PatchdbError
from patchdb.fetch import SOURCES, RemoteFile, download_file, payload_sha256, verify_sha256
from patchdb.files import folder_lock

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "fashion-mnist").is_dir() or not (SHARED_DATA / "mnist-10k").is_dir(),
    reason="../shared/data is not present")

_IDX_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, _IDX_TYPE_CODES[array.dtype], array.ndim])
    header += np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def random_uint8(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def write_mnist_like(folder: Path, num_images: int, label: int, stem: str = "train") -> np.ndarray:
    """An IDX image + labels pair in ``folder`` whose labels are all ``label``; returns the images."""
    folder.mkdir(parents=True, exist_ok=True)
    images = random_uint8(np.random.default_rng(label), (num_images, 28, 28))
    write_idx(folder / f"{stem}-images-idx3-ubyte.gz", images)
    write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", np.full(num_images, label, dtype=np.uint8))
    return images


@pytest.fixture
def isolated_roots(monkeypatch, tmp_path):
    """No $PATCHDB_DATA, an empty user cache and no system folders, so only what a test sets up is found."""
    monkeypatch.delenv(data.DATA_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", ())


# ---------------------------------------------------------------- readers


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trips_gzip_and_raw(tmp_path, compress):
    images = random_uint8(np.random.default_rng(0), (5, 7, 6))
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    assert np.array_equal(read_idx(write_idx(tmp_path / "images", images, compress)), images)
    assert np.array_equal(read_idx(write_idx(tmp_path / "labels", labels, compress)), labels)
    wide = np.array([[1, -2], [70000, 3]], dtype=np.int32)
    assert np.array_equal(read_idx(write_idx(tmp_path / "wide", wide, compress)), wide)


def test_read_idx_rejects_bad_magic_truncation_and_missing_file(tmp_path):
    good = idx_bytes(random_uint8(np.random.default_rng(1), (4, 5, 5)))
    (tmp_path / "magic").write_bytes(b"\x01\x02" + good[2:])
    with pytest.raises(PatchdbError, match="magic"):
        read_idx(tmp_path / "magic")
    (tmp_path / "short").write_bytes(good[:-10])
    with pytest.raises(PatchdbError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "short.gz").write_bytes(gzip.compress(good)[:-12])
    with pytest.raises(PatchdbError, match="truncated"):
        read_idx(tmp_path / "short.gz")
    with pytest.raises(PatchdbError, match="not found"):
        read_idx(tmp_path / "absent.gz")


def _cifar_batch(rng: np.random.Generator, count: int, first_label: int) -> tuple[dict, np.ndarray, list[int]]:
    images = random_uint8(rng, (count, 32, 32, 3))
    labels = [(first_label + index) % 10 for index in range(count)]
    rows = images.transpose(0, 3, 1, 2).reshape(count, -1)  # red plane, green plane, blue plane
    return {b"batch_label": b"batch", b"data": rows, b"labels": labels}, images, labels


def write_cifar10(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A tiny cifar-10-batches-py folder; returns the expected (images, labels) per split."""
    rng = np.random.default_rng(2)
    folder.mkdir(parents=True)
    expected = {}
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        all_images, all_labels = [], []
        for index, name in enumerate(names):
            batch, images, labels = _cifar_batch(rng, 2 + index % 2, index)
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
            all_images.append(images)
            all_labels += labels
        expected[split] = (np.concatenate(all_images), np.array(all_labels))
    return expected


@pytest.mark.parametrize("as_archive", [False, True])
def test_read_cifar10_folder_and_archive(tmp_path, as_archive):
    folder = tmp_path / "cifar-10-batches-py"
    expected = write_cifar10(folder)
    source = tmp_path
    if as_archive:
        source = tmp_path / "cifar-10-python.tar.gz"
        with tarfile.open(source, "w:gz") as archive:
            archive.add(folder, arcname="cifar-10-batches-py")
    for split in ("train", "test"):
        images, labels = read_cifar10(source, split)
        assert images.shape == (len(expected[split][1]), 32, 32, 3) and images.dtype == np.uint8
        assert np.array_equal(images, expected[split][0])
        assert np.array_equal(labels, expected[split][1])


def test_read_cifar10_rejects_missing_batch_and_foreign_pickle(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(PatchdbError, match="data_batch_3.*not found"):
        read_cifar10(tmp_path, "train")
    (folder / "test_batch").write_bytes(pickle.dumps({"data": Path("x")}))
    with pytest.raises(PatchdbError, match="test_batch.*not a readable CIFAR-10"):
        read_cifar10(folder, "test")


def load_folder(folder: Path, limit: int | None = None):
    """An image folder through the public loader (32x32 images are not resized, so pixels map to x / 127.5 - 1)."""
    return load_dataset(f"file:{folder}" + ("" if limit is None else f":{limit}"))


def test_image_folder_one_subfolder_per_class(tmp_path):
    rng = np.random.default_rng(3)
    written = {}
    for class_name in ("cats", "dogs"):
        (tmp_path / class_name).mkdir()
        for index in range(2):
            pixels = random_uint8(rng, (32, 32, 3))
            Image.fromarray(pixels).save(tmp_path / class_name / f"{index}.png")
            written[(class_name, index)] = pixels
    dataset = load_folder(tmp_path)
    assert dataset.images.shape == (4, 3, 32, 32) and dataset.labels.tolist() == [0, 0, 1, 1]
    assert torch.equal(dataset.images[3], preprocess(written[("dogs", 1)][None])[0])
    assert torch.equal(load_folder(tmp_path, limit=3).images, dataset.images[:3])


def test_image_folder_grey_keeps_one_channel_and_rejects_bad_folders(tmp_path):
    grey = tmp_path / "grey" / "only"
    grey.mkdir(parents=True)
    Image.fromarray(np.full((32, 32), 204, dtype=np.uint8)).save(grey / "a.png")
    dataset = load_folder(tmp_path / "grey")
    assert dataset.images.shape == (1, 1, 32, 32) and dataset.labels.tolist() == [0]
    assert torch.all(dataset.images == 204 / 127.5 - 1)
    (tmp_path / "empty" / "class").mkdir(parents=True)
    with pytest.raises(PatchdbError, match="empty folder"):
        load_folder(tmp_path / "empty")
    Image.fromarray(np.zeros((6, 5), dtype=np.uint8)).save(grey / "b.png")
    with pytest.raises(PatchdbError, match="b.png.*one size"):
        load_folder(tmp_path / "grey")


def sixteen_bit_gradient() -> np.ndarray:
    return np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)


@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("I;16B", ".tif"), ("I;16L", ".tif")])
def test_sixteen_bit_grey_images_are_grey_and_rescaled_not_clipped(tmp_path, mode, suffix):
    folder = tmp_path / "deep" / "class"
    folder.mkdir(parents=True)
    gradient = sixteen_bit_gradient()
    byte_order = ">u2" if mode.endswith("B") else "<u2"
    Image.frombytes(mode, (32, 32), gradient.astype(byte_order).tobytes()).save(folder / f"a{suffix}")
    with Image.open(folder / f"a{suffix}") as image:
        assert image.mode == ("I;16" if mode == "I;16L" else mode)  # Pillow reads little-endian TIFFs as I;16
    dataset = load_folder(tmp_path / "deep")
    assert dataset.images.shape == (1, 1, 32, 32)
    assert torch.equal(dataset.images[0, 0], torch.from_numpy(np.round(gradient / 257).astype(np.float32)) / 127.5 - 1)


def test_palette_images_with_a_grey_palette_load_as_one_channel(tmp_path):
    pixels = random_uint8(np.random.default_rng(11), (32, 32))
    for kind, palette in (("grey", np.repeat(np.arange(256, dtype=np.uint8), 3)),
                          ("colour", np.stack([np.arange(256), np.arange(256)[::-1], np.full(256, 7)], 1).astype(np.uint8))):
        (tmp_path / kind / "class").mkdir(parents=True)
        image = Image.fromarray(pixels, mode="L").convert("P")
        image.putpalette(palette.flatten().tolist())
        image.save(tmp_path / kind / "class" / "a.png")
    grey = load_folder(tmp_path / "grey")
    assert grey.images.shape == (1, 1, 32, 32) and torch.equal(grey.images, preprocess(pixels[None]))
    assert load_folder(tmp_path / "colour").images.shape == (1, 3, 32, 32)


def test_floating_point_images_are_refused_not_truncated_to_black(tmp_path):
    folder = tmp_path / "float" / "class"
    folder.mkdir(parents=True)
    Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4), mode="F").save(folder / "a.tif")
    with pytest.raises(PatchdbError, match="floating-point pixels"):
        load_folder(tmp_path / "float")


def test_uint16_npz_is_scaled_from_65535_like_a_sixteen_bit_image_file(tmp_path):
    gradient = sixteen_bit_gradient()
    np.savez(tmp_path / "deep.npz", images=gradient[None], labels=np.array([0]))
    (tmp_path / "deep" / "class").mkdir(parents=True)
    Image.fromarray(gradient).save(tmp_path / "deep" / "class" / "a.png")
    from_npz = load_dataset(f"file:{tmp_path / 'deep.npz'}")
    assert from_npz.images.shape == (1, 1, 32, 32) and from_npz.images.min() == -1 and from_npz.images.max() == 1
    assert from_npz.fingerprint == load_folder(tmp_path / "deep").fingerprint


@pytest.mark.parametrize("labels, message", [(np.array([2**63, 1], np.uint64), "below 65536, found 9223372036854775808"),
                                             (np.array([0, 2**40]), "below 65536"), (np.array([-1, 0]), ">= 0")])
def test_labels_that_are_not_class_indices_are_refused(tmp_path, labels, message):
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 8, 8), np.uint8), labels=labels)
    with pytest.raises(PatchdbError, match=message):
        read_npz(tmp_path / "bad.npz")


def test_read_npz_uint8_and_float(tmp_path):
    rng = np.random.default_rng(4)
    images = random_uint8(rng, (3, 10, 10, 3))
    np.savez(tmp_path / "u8.npz", images=images, labels=np.array([2, 0, 1]))
    read_images, read_labels = read_npz(tmp_path / "u8.npz")
    assert np.array_equal(read_images, images) and read_labels.dtype == np.int64 and read_labels.tolist() == [2, 0, 1]
    floats = rng.uniform(-1, 1, size=(2, 1, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "f32.npz", images=floats)
    read_images, read_labels = read_npz(tmp_path / "f32.npz")
    assert np.array_equal(read_images, floats) and read_labels is None


@pytest.mark.parametrize("arrays, problem", [
    ({"images": np.full((2, 1, 32, 32), np.nan, dtype=np.float32)}, "NaN"),
    ({"images": np.full((2, 1, 32, 32), 3.0, dtype=np.float32)}, r"\[-1, 1\]"),
    ({"images": np.zeros((2, 32), dtype=np.uint8)}, "wrong shape"),
    ({"images": np.zeros((2, 1, 32, 32), dtype=np.float32)[:, 0]}, "wrong shape"),
    ({"images": np.zeros((2, 8, 8), dtype=np.uint8), "labels": np.array([1, 2, 3])}, "3 labels for 2 images"),
    ({"pictures": np.zeros((2, 8, 8), dtype=np.uint8)}, "no 'images'"),
])
def test_read_npz_rejects_bad_contents(tmp_path, arrays, problem):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(PatchdbError, match=problem) as error:
        read_npz(path)
    assert str(path) in str(error.value)


# ---------------------------------------------------------------- preprocessing and fingerprints


def test_preprocess_scales_uint8_and_leaves_32x32_unresized():
    images = random_uint8(np.random.default_rng(5), (2, 32, 32, 3))
    images[0, 0, 0] = [0, 255, 0]
    out = preprocess(images)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert out[0, 0, 0, 0] == -1 and out[0, 1, 0, 0] == 1
    floats = np.random.default_rng(6).uniform(-1, 1, size=(2, 1, 32, 32)).astype(np.float32)
    assert torch.equal(preprocess(floats), torch.from_numpy(floats))


def test_preprocess_resizes_bilinearly_to_32():
    images = random_uint8(np.random.default_rng(7), (3, 28, 28))
    out = preprocess(images)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(images).float()[:, None], size=(32, 32), mode="bilinear", align_corners=False) / 127.5 - 1
    assert out.shape == (3, 1, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.allclose(out, expected, atol=1e-6)
    flat = preprocess(np.full((1, 28, 28), 255, dtype=np.uint8))
    assert torch.allclose(flat, torch.ones_like(flat))


@pytest.mark.parametrize("shape", [(96, 96), (112, 80), (96, 28)])
def test_shrinking_is_antialiased_so_fine_detail_does_not_alias(shape):
    # a one-pixel checkerboard shrunk 3x: plain bilinear samples single pixels and keeps a full-contrast checkerboard
    rows, cols = np.indices(shape)
    checkerboard = ((rows + cols) % 2 * 255).astype(np.uint8)[None]
    out = preprocess(checkerboard)
    assert out.shape == (1, 1, 32, 32) and out.abs().max() < 0.25, out.abs().max()


def test_fingerprint_is_stable_and_sees_one_pixel(tmp_path):
    images = random_uint8(np.random.default_rng(8), (4, 28, 28))
    np.savez(tmp_path / "a.npz", images=images, labels=np.arange(4))
    images[2, 13, 7] ^= 1
    np.savez(tmp_path / "b.npz", images=images, labels=np.arange(4))
    first = load_dataset(f"file:{tmp_path / 'a.npz'}")
    assert first.fingerprint == load_dataset(f"file:{tmp_path / 'a.npz'}").fingerprint
    assert first.fingerprint != load_dataset(f"file:{tmp_path / 'b.npz'}").fingerprint
    assert first.fingerprint == hashlib.sha256(
        first.images.numpy().tobytes() + first.labels.numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------- specs, lookup and the default subset


def test_default_subset_is_100_per_class():
    dataset = load_dataset()
    assert dataset.images.shape == (1000, 1, 32, 32) and dataset.name == "default"
    assert torch.bincount(dataset.labels).tolist() == [100] * 10
    assert dataset.images.min() == -1 and dataset.images.max() == 1
    assert load_dataset("default").fingerprint == dataset.fingerprint
    assert torch.equal(load_dataset("default:30").images, dataset.images[:30])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickled"])
def test_a_damaged_default_resource_says_to_reinstall(tmp_path, monkeypatch, damage):
    import importlib.resources
    resource = importlib.resources.files("patchdb") / "resources" / data.DEFAULT_RESOURCE
    (tmp_path / "resources").mkdir()
    damaged = tmp_path / "resources" / data.DEFAULT_RESOURCE
    if damage == "truncated":
        damaged.write_bytes(resource.read_bytes()[:5000])
    elif damage == "garbage":
        damaged.write_bytes(b"not an npz at all" * 10)
    else:
        np.savez(damaged, images=np.array([None], dtype=object), labels=np.array([None], dtype=object))
    monkeypatch.setattr(importlib.resources, "files", lambda package: tmp_path)
    with pytest.raises(PatchdbError, match="installed patchdb package is damaged: .*; reinstall patchdb"):
        load_dataset()


@needs_shared_data
def test_default_subset_is_first_100_per_class_of_shared_fashion_mnist():
    images = read_idx(SHARED_DATA / "fashion-mnist" / "train-images-idx3-ubyte.gz")
    labels = read_idx(SHARED_DATA / "fashion-mnist" / "train-labels-idx1-ubyte.gz")
    chosen = np.sort(np.concatenate([np.flatnonzero(labels == label)[:100] for label in range(10)]))
    default = load_dataset()
    assert torch.equal(default.images, preprocess(images[chosen]))
    assert default.labels.tolist() == labels[chosen].tolist()


@needs_shared_data
def test_shared_data_loads_with_the_right_shapes(isolated_roots):
    train = load_dataset("fashion-mnist:train:1000", SHARED_DATA)
    assert train.images.shape == (1000, 1, 32, 32) and train.name == "fashion-mnist:train:1000"
    assert -1 <= train.images.min() < 0 < train.images.max() <= 1 and train.num_classes == 10
    assert load_dataset("fashion-mnist:test", SHARED_DATA).images.shape == (10000, 1, 32, 32)
    digits = load_dataset("mnist", SHARED_DATA)
    assert digits.images.shape == (10000, 1, 32, 32) and sorted(torch.unique(digits.labels).tolist()) == list(range(10))


def test_lookup_order_data_dir_then_env(tmp_path, monkeypatch, isolated_roots):
    write_mnist_like(tmp_path / "given" / "fashion-mnist", 3, label=1)
    write_mnist_like(tmp_path / "env", 4, label=2)  # files directly in the root are accepted too
    monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path / "env"))
    assert load_dataset("fashion-mnist", tmp_path / "given").labels.tolist() == [1] * 3
    assert load_dataset("fashion-mnist").labels.tolist() == [2] * 4
    assert load_dataset("fashion-mnist", tmp_path / "nothing-here").labels.tolist() == [2] * 4


def test_a_root_named_after_the_other_idx_data_set_is_not_taken_for_this_one(tmp_path, isolated_roots):
    # MNIST and Fashion-MNIST files share their names: --data-dir .../fashion-mnist once loaded it as mnist
    write_mnist_like(tmp_path / "fashion-mnist", 3, label=1)
    write_mnist_like(tmp_path / "mnist", 2, label=5)
    with pytest.raises(PatchdbError, match="not found"):
        load_dataset("mnist", tmp_path / "fashion-mnist")
    assert load_dataset("mnist", tmp_path / "mnist").labels.tolist() == [5, 5]  # a root named after its own set is searched
    assert load_dataset("fashion-mnist", tmp_path / "fashion-mnist").labels.tolist() == [1] * 3


def test_mnist_subset_layout_counts_as_train(tmp_path, isolated_roots):
    write_mnist_like(tmp_path / "mnist-10k", 5, label=7, stem="mnist-10k")
    assert load_dataset("mnist:train:2", tmp_path).labels.tolist() == [7, 7]
    with pytest.raises(PatchdbError, match="not found"):
        load_dataset("mnist:test", tmp_path)


def test_named_cifar10_and_celeba_from_a_root(tmp_path, isolated_roots):
    expected = write_cifar10(tmp_path / "cifar10" / "cifar-10-batches-py")
    cifar = load_dataset("cifar10:test", tmp_path)
    assert cifar.images.shape == (len(expected["test"][1]), 3, 32, 32)
    assert cifar.labels.tolist() == expected["test"][1].tolist()
    faces = tmp_path / "celeba" / "img_align_celeba"
    faces.mkdir(parents=True)
    for index in range(3):
        Image.fromarray(random_uint8(np.random.default_rng(index), (40, 36, 3))).save(faces / f"{index:06d}.jpg")
    celeba = load_dataset("celeba:2", tmp_path)
    assert celeba.images.shape == (2, 3, 32, 32) and celeba.labels.tolist() == [0, 0]


def test_file_spec_reads_idx_with_labels_beside_it_and_image_folders(tmp_path):
    images = write_mnist_like(tmp_path, 6, label=4, stem="t10k")
    dataset = load_dataset(f"file:{tmp_path / 't10k-images-idx3-ubyte.gz'}:5")
    assert torch.equal(dataset.images, preprocess(images[:5])) and dataset.labels.tolist() == [4] * 5
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    assert load_dataset(f"file:{tmp_path / 't10k-images-idx3-ubyte.gz'}").labels is None
    (tmp_path / "pics" / "a").mkdir(parents=True)
    Image.fromarray(random_uint8(np.random.default_rng(9), (32, 32, 3))).save(tmp_path / "pics" / "a" / "x.png")
    assert load_dataset(f"file:{tmp_path / 'pics'}").images.shape == (1, 3, 32, 32)


def test_a_named_data_set_missing_its_labels_file_names_it(tmp_path, isolated_roots):
    write_mnist_like(tmp_path / "fashion-mnist", 12, label=3)
    (tmp_path / "fashion-mnist" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(PatchdbError) as error:
        load_dataset("fashion-mnist:train:10", tmp_path)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'fashion-mnist' / 'train-labels-idx1-ubyte.gz'}: file not found")
    images = tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    assert f"file:{images}" in message and "\n" not in message
    assert load_dataset(f"file:{images}:10").labels is None  # the images alone, as the message offers


def test_not_found_lists_every_place_and_how_to_get_it(tmp_path, monkeypatch, isolated_roots):
    monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path / "env"))
    with pytest.raises(PatchdbError) as error:
        load_dataset("fashion-mnist", tmp_path / "given")
    message = str(error.value)
    for place in (tmp_path / "given" / "fashion-mnist", tmp_path / "env" / "fashion-mnist", tmp_path / "cache"):
        assert str(place) in message
    assert "apt-get install dataset-fashion-mnist" in message and "patchdb fetch-data fashion-mnist" in message
    assert "--data-dir" in message and "PATCHDB_DATA" in message


@pytest.mark.parametrize("spec, problem", [
    ("imagenet", "unknown data set"),
    ("fashion-mnist:train:0", "bad LIMIT"),
    ("fashion-mnist:-3", "bad LIMIT"),
    ("fashion-mnist:train:many", "bad LIMIT"),
    ("fashion-mnist:validation", "bad split"),
    ("fashion-mnist:train:5:6", "too many"),
])
def test_bad_specs_are_rejected(spec, problem):
    with pytest.raises(PatchdbError, match=problem):
        load_dataset(spec)


def test_file_spec_errors_name_the_problem(tmp_path):
    np.savez(tmp_path / "small.npz", images=np.zeros((3, 8, 8), dtype=np.uint8))
    with pytest.raises(PatchdbError, match="holds only 3 images"):
        load_dataset(f"file:{tmp_path / 'small.npz'}:4")
    with pytest.raises(PatchdbError, match="bad LIMIT"):
        load_dataset(f"file:{tmp_path / 'small.npz'}:x")
    with pytest.raises(PatchdbError, match="missing.npz: file not found"):
        load_dataset(f"file:{tmp_path / 'missing.npz'}:4")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(PatchdbError, match="notes.txt.*magic"):
        load_dataset(f"file:{tmp_path / 'notes.txt'}")


def test_with_label_and_indices_of_label(tmp_path):
    np.savez(tmp_path / "l.npz", images=random_uint8(np.random.default_rng(10), (5, 32, 32)), labels=[0, 2, 0, 2, 2])
    dataset = load_dataset(f"file:{tmp_path / 'l.npz'}")
    assert dataset.num_classes == 3
    assert dataset.indices_of_label(2).tolist() == [1, 3, 4]
    twos = dataset.with_label(2)
    assert twos.name == f"{dataset.name}:label=2" and torch.equal(twos.images, dataset.images[[1, 3, 4]])
    assert twos.fingerprint != dataset.fingerprint
    with pytest.raises(PatchdbError, match="no images of class 1"):
        dataset.with_label(1)
    np.savez(tmp_path / "u.npz", images=np.zeros((2, 32, 32), dtype=np.uint8))
    with pytest.raises(PatchdbError, match="no labels"):
        load_dataset(f"file:{tmp_path / 'u.npz'}").with_label(0)


# ---------------------------------------------------------------- downloads (checksums only: no internet here)


def test_checksum_hashes_the_payload_and_rejects_a_wrong_hash(tmp_path):
    payload = b"patchdb payload " * 1000
    (tmp_path / "raw").write_bytes(payload)
    (tmp_path / "packed.gz").write_bytes(gzip.compress(payload, mtime=123))
    right = hashlib.sha256(payload).hexdigest()
    verify_sha256(tmp_path / "raw", right)
    verify_sha256(tmp_path / "packed.gz", right.upper())
    with pytest.raises(PatchdbError, match="checksum mismatch"):
        verify_sha256(tmp_path / "packed.gz", hashlib.sha256(payload + b"!").hexdigest())


@needs_shared_data
def test_fashion_mnist_table_matches_the_shared_files():
    for remote in SOURCES["fashion-mnist"]:
        assert payload_sha256(SHARED_DATA / "fashion-mnist" / remote.name) == remote.payload_sha256


def test_download_checks_before_renaming_into_place(tmp_path):
    labels = np.array([1, 2, 3], dtype=np.uint8)
    source = write_idx(tmp_path / "served.gz", labels)
    right = payload_sha256(source)
    folder = tmp_path / "data"
    wrong = RemoteFile("labels.gz", (source.as_uri(),), "0" * 64, lambda path: None)
    with pytest.raises(PatchdbError, match="checksum mismatch"):
        download_file(wrong, folder, progress=False)
    assert list(folder.iterdir()) == []
    good = RemoteFile("labels.gz", ((tmp_path / "absent.gz").as_uri(), source.as_uri()), right, read_idx)
    saved = download_file(good, folder, progress=False)
    assert saved == folder / "labels.gz" and np.array_equal(read_idx(saved), labels)
    assert [path.name for path in folder.iterdir()] == ["labels.gz"]


def test_a_download_is_synced_to_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    source = write_idx(tmp_path / "served.gz", np.array([1, 2], dtype=np.uint8))
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_size)),
                                                 fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda old, new: (events.append(("replace", Path(new).name)), replace(old, new)))
    download_file(RemoteFile("labels.gz", (source.as_uri(),), payload_sha256(source), read_idx), tmp_path / "data",
                  progress=False)
    assert events == [("fsync", source.stat().st_size), ("replace", "labels.gz")]


def test_fetch_data_locks_its_folder_and_leaves_only_the_checked_files(tmp_path, monkeypatch):
    source = write_idx(tmp_path / "served.gz", np.array([4, 5], dtype=np.uint8))
    served = (RemoteFile("labels.gz", (source.as_uri(),), payload_sha256(source), read_idx),)
    monkeypatch.setitem(SOURCES, "mnist", served)
    data_dir = tmp_path / "data"
    with folder_lock(data_dir / "mnist", option="--data-dir"):  # another fetch of the same data set, as the lock sees it
        result = CliRunner().invoke(main, ["fetch-data", "mnist", "--data-dir", str(data_dir), "--no-progress"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert (f"another patchdb command is writing to {data_dir / 'mnist'} (pid {os.getpid()}); wait for it or choose "
            "another --data-dir") in result.output
    assert not list((data_dir / "mnist").iterdir())  # refused before any download
    result = CliRunner().invoke(main, ["fetch-data", "mnist", "--data-dir", str(data_dir), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert [path.name for path in (data_dir / "mnist").iterdir()] == ["labels.gz"]  # the lock gone with the command


def test_fetch_data_command_explains_celeba(tmp_path):
    result = CliRunner().invoke(main, ["fetch-data", "celeba", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)  # a message, not a traceback
    assert "Google Drive" in result.output and str(tmp_path / "celeba" / "img_align_celeba") in result.output


def test_a_home_folder_that_cannot_be_found_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATCHDB_DATA", "~no-such-user-here/data")
    with pytest.raises(PatchdbError, match=r"\$PATCHDB_DATA '~no-such-user-here/data': .*give a path without ~"):
        data.data_roots()


def test_images_beside_class_folders_and_pickled_archives_are_refused(tmp_path):
    (tmp_path / "mixed" / "a").mkdir(parents=True)
    for path in (tmp_path / "mixed" / "a" / "x.png", tmp_path / "mixed" / "loose.png"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    with pytest.raises(PatchdbError, match="loose.png.*beside its class sub-folders"):
        load_folder(tmp_path / "mixed")
    (tmp_path / "mixed" / "loose.png").unlink()
    (tmp_path / "mixed" / "a" / "deeper").mkdir()
    with pytest.raises(PatchdbError, match="deeper: a folder inside a class folder"):
        load_folder(tmp_path / "mixed")
    np.savez(tmp_path / "objects.npz", images=np.array([None, 1], dtype=object))
    with pytest.raises(PatchdbError, match="holds Python objects"):
        read_npz(tmp_path / "objects.npz")
    (tmp_path / "text.npz").write_text("abc\n")  # numpy takes any file of neither format for a pickle
    with pytest.raises(PatchdbError, match=r"text.npz: is not an .npz file \(it starts with neither"):
        read_npz(tmp_path / "text.npz")


def test_an_empty_output_folder_name_is_refused():
    from patchdb.errors import output_folder
    with pytest.raises(PatchdbError, match="--out is empty"):
        output_folder("")
