"""A direct float64 transcription of the paper's machine equations, for testing the fast engine.

Loops over pixels and dictionary entries, with no tricks: each machine's score at pixel x is

    M_t[phi](x) = -(1/beta) * sum_{k in dictionary(x)} W_k (phi(x) - sqrt(alpha_bar) k(0)),
    W_k = N(phi_Omega_x | sqrt(alpha_bar) k, beta I) / sum_k' N(phi_Omega_x | sqrt(alpha_bar) k', beta I).

Dictionaries are written out independently of patchdb.patches, from the paper's words. Only the
noise schedule alpha_bar(t) is shared with the library (it is tested on its own).
"""

import math

import numpy as np

from patchdb.schedule import alpha_bar as schedule_alpha_bar


def patch(image: np.ndarray, row: int, col: int, size: int, circular: bool) -> np.ndarray:
    """The (C, size, size) neighbourhood of (row, col); outside pixels are 0 or wrap around."""
    channels, height, width = image.shape
    half = size // 2
    out = np.zeros((channels, size, size))
    for a in range(-half, half + 1):
        for b in range(-half, half + 1):
            r, c = row + a, col + b
            if circular:
                out[:, a + half, b + half] = image[:, r % height, c % width]
            elif 0 <= r < height and 0 <= c < width:
                out[:, a + half, b + half] = image[:, r, c]
    return out


def location_class(row: int, col: int, size: int, height: int, width: int):
    """Which borders a patch at (row, col) crosses and at what distance (paper App., 'Adding borders')."""
    half = size // 2
    vertical = ("top", row) if row < half else ("bottom", height - 1 - row) if row > height - 1 - half else None
    horizontal = ("left", col) if col < half else ("right", width - 1 - col) if col > width - 1 - half else None
    return vertical, horizontal


def dictionary_locations(machine: str, row: int, col: int, size: int, height: int, width: int) -> list[tuple[int, int]]:
    """Centres (r, c) of the training patches in the dictionary of pixel (row, col)."""
    everywhere = [(r, c) for r in range(height) for c in range(width)]
    if machine == "els":
        return everywhere
    if machine == "ls" or size >= min(height, width):
        return [(row, col)]
    mine = location_class(row, col, size, height, width)
    if mine[0] is not None and mine[1] is not None:
        return [(row, col)]
    return [(r, c) for r, c in everywhere if location_class(r, c, size, height, width) == mine]


def squared_distance(a: np.ndarray, b: np.ndarray) -> float:
    difference = (a - b).ravel()
    return float(difference @ difference)


def posterior_weights(query: np.ndarray, keys: list[np.ndarray], abar: float) -> np.ndarray:
    """Normalised weights N(query | sqrt(abar) k, (1 - abar) I) over the keys."""
    logw = np.array([-squared_distance(query, math.sqrt(abar) * k) / (2 * (1 - abar)) for k in keys])
    logw -= logw.max()
    w = np.exp(logw)
    return w / w.sum()


def training_patches(train: np.ndarray, size: int, circular: bool) -> dict[tuple[int, int, int], np.ndarray]:
    """Every training patch, by (training image, centre row, centre column)."""
    _, _, height, width = train.shape
    return {(n, r, c): patch(image, r, c, size, circular)
            for n, image in enumerate(train) for r in range(height) for c in range(width)}


def pixel_dictionary(machine: str, patches: dict, row: int, col: int, size: int, num_images: int,
                     height: int, width: int) -> list[tuple[tuple[int, int, int], np.ndarray]]:
    """[(source (image, row, col), patch)] of the dictionary of pixel (row, col)."""
    return [((n, r, c), patches[(n, r, c)]) for n in range(num_images)
            for r, c in dictionary_locations(machine, row, col, size, height, width)]


def patch_machine_posterior(machine: str, x: np.ndarray, t: float, train: np.ndarray, size: int, patches: dict | None = None):
    """LS / ELS / bbELS at one noisy image x (C, H, W) against train (N, C, H, W).

    patches: training_patches(train, size, machine == 'els'), when already at hand.
    Returns (mean (C, H, W) posterior mean of the centre pixels, weights) where weights[(row, col)]
    is a list of (source, weight) over the pixel's dictionary.
    """
    abar = schedule_alpha_bar(t)
    channels, height, width = x.shape
    circular = machine == "els"
    if patches is None:
        patches = training_patches(train, size, circular)
    mean = np.zeros_like(x)
    weights = {}
    for row in range(height):
        for col in range(width):
            query = patch(x, row, col, size, circular)
            entries = pixel_dictionary(machine, patches, row, col, size, len(train), height, width)
            w = posterior_weights(query, [k for _, k in entries], abar)
            mean[:, row, col] = sum(wk * k[:, size // 2, size // 2] for wk, (_, k) in zip(w, entries))
            weights[(row, col)] = [(source, wk) for (source, _), wk in zip(entries, w)]
    return mean, weights


def patch_machine_score(machine: str, x: np.ndarray, t: float, train: np.ndarray, size: int) -> np.ndarray:
    """Score (C, H, W) of LS / ELS / bbELS at one noisy image x (C, H, W) against train (N, C, H, W)."""
    abar = schedule_alpha_bar(t)
    mean, _ = patch_machine_posterior(machine, x, t, train, size)
    return -(x - math.sqrt(abar) * mean) / (1 - abar)


def ideal_score(x: np.ndarray, t: float, train: np.ndarray, translations: bool = False) -> np.ndarray:
    """IS score of x (C, H, W); with translations, the ES score (dictionary = all circular shifts)."""
    abar = schedule_alpha_bar(t)
    images = list(train)
    if translations:
        height, width = x.shape[1:]
        images = [np.roll(image, (a, b), axis=(1, 2)) for image in train for a in range(height) for b in range(width)]
    weights = posterior_weights(x, images, abar)
    mean = sum(w * image for w, image in zip(weights, images))
    return -(x - math.sqrt(abar) * mean) / (1 - abar)


def nearest_patch(machine: str, image: np.ndarray, patches: dict, size: int, row: int, col: int):
    """(source (image, row, col), squared distance) of the L2-nearest dictionary patch to image's patch at (row, col).

    patches: training_patches(train, size, machine == 'els').
    """
    channels, height, width = image.shape
    num_images = 1 + max(n for n, _, _ in patches)
    query = patch(image, row, col, size, machine == "els")
    entries = pixel_dictionary(machine, patches, row, col, size, num_images, height, width)
    distance, source = min((squared_distance(query, k), source) for source, k in entries)
    return source, distance
