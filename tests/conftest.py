"""Shared small fixtures: tiny data sets quantised like real data, and noisy batches."""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from patchdb.data import Dataset, make_dataset
from patchdb.schedule import alpha_bar

TINY_LABELS = (0, 1, 2, 0, 1, 0)


def quantised_images(seed: int, num_images: int, side: int, channels: int = 1) -> torch.Tensor:
    """(N, C, side, side) float32 images on the uint8 grid x / 127.5 - 1, like preprocessed data.

    Each image is a random uint8 rectangle on a black (-1) background, so that (as in
    Fashion-MNIST) many background patches repeat and the dictionaries hold duplicates.
    """
    rng = np.random.default_rng(seed)
    pixels = np.zeros((num_images, channels, side, side), dtype=np.uint8)
    for image in pixels:
        top, left = rng.integers(0, side // 3, size=2)
        bottom, right = rng.integers(side - side // 3, side + 1, size=2)
        image[:, top:bottom, left:right] = rng.integers(1, 256, size=(channels, bottom - top, right - left))
    return torch.from_numpy(pixels).to(torch.float32) / 127.5 - 1.0


def tiny_dataset(labelled: bool = True, num_images: int = 6, side: int = 8, channels: int = 1, seed: int = 0) -> Dataset:
    """A data set of quantised random images; labels cycle through TINY_LABELS when labelled."""
    labels = torch.tensor([TINY_LABELS[i % len(TINY_LABELS)] for i in range(num_images)]) if labelled else None
    return make_dataset(quantised_images(seed, num_images, side, channels), labels, f"tiny-{seed}")


def noisy_batch(dataset: Dataset, t: float, seed: int, dtype=torch.float64) -> torch.Tensor:
    """(2, C, H, W): pure N(0, I) noise, and the forward-noised splice of two training images at t."""
    generator = torch.Generator().manual_seed(seed)
    images = dataset.images.to(dtype)
    shape = images.shape[1:]
    width = shape[-1]
    splice = images[0].clone()
    splice[..., width // 2:] = images[1][..., width // 2:]
    noise = torch.randn((2, *shape), generator=generator, dtype=dtype)
    signal = math.sqrt(alpha_bar(t)) * splice + math.sqrt(1 - alpha_bar(t)) * noise[1]
    return torch.stack([noise[0], signal])


def deny_reading(monkeypatch, *paths: Path) -> None:
    """Make paths unreadable for the rest of a test as os.access sees them (chmod alone cannot: root reads anything)."""
    denied = {Path(path).resolve() for path in paths}
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (not (mode & os.R_OK and Path(path).resolve() in denied)
                                                                and access(path, mode, **kw)))


@pytest.fixture(scope="session")
def labelled_dataset() -> Dataset:
    return tiny_dataset(labelled=True)


@pytest.fixture(scope="session")
def unlabelled_dataset() -> Dataset:
    return tiny_dataset(labelled=False, seed=1)


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's many tiny tensor operations on one thread.

    On a loaded 2-core machine torch's thread pool makes small operations 30-70x slower
    (measured: bbELS on 8x8 images 0.24 s per call with the default pool, 0.006 s with one thread).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
