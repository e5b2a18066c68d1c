"""Figures of samples and of their patch-mosaic provenance.

Functions build a ``matplotlib.figure.Figure`` drawn by the Agg canvas (no pyplot, no global
backend switch) and return it; the caller saves it (``patchdb.files.save_figure``, atomically). Images are
(N, C, H, W) arrays with pixels in [-1, 1], C = 1 (grey) or 3 (RGB).
"""

import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

MAX_GRID_IMAGES = 64
"""grid.png shows at most this many samples (the first ones)."""

MAX_PROVENANCE_ROWS = 8
"""provenance.png shows at most this many samples (the first ones), one per row."""

PANEL_INCHES = 1.3
TITLE_INCHES = 0.22
MARGIN_INCHES = 0.05

OTHER_SOURCES_COLOUR = (0.82, 0.82, 0.82)
"""Colour of pixels whose training image ranks below the palette's length."""


def source_palette() -> list[tuple[float, float, float]]:
    """20 categorical colours, the 10 strong ones of tab20 first, then their light partners."""
    from matplotlib import colormaps

    tab20 = [to_rgb(colour) for colour in colormaps["tab20"].colors]
    return tab20[0::2] + tab20[1::2]


def display_image(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) pixels in [0, 1] of one (C, H, W) image in [-1, 1] (values outside are clipped)."""
    pixels = np.clip((np.asarray(image, dtype=np.float64) + 1.0) / 2.0, 0.0, 1.0)
    return pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels, 0, -1)


def image_grid_figure(images: np.ndarray, titles: list[str] | None = None) -> Figure:
    """A near-square grid of the first MAX_GRID_IMAGES of images (N, C, H, W), with optional titles (N,)."""
    count = min(len(images), MAX_GRID_IMAGES)
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    figure, axes = _panel_figure(rows, columns, TITLE_INCHES if titles else 0.0)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < count:
            _show(axis, images[index])
            if titles:
                axis.set_title(titles[index], fontsize=7)
    return figure


def source_ranking(image_index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training images of a provenance map (H, W) int, by the number of pixels they give, most first.

    Returns (images (K,), pixel counts (K,), rank map (H, W) with each pixel's image's rank).
    """
    images, inverse, counts = np.unique(image_index, return_inverse=True, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    rank_of = np.empty_like(order)
    rank_of[order] = np.arange(len(order))
    return images[order], counts[order], rank_of[inverse.reshape(image_index.shape)]


def provenance_figure(samples: np.ndarray, source: np.ndarray, training_images: np.ndarray, top: int = 3) -> Figure:
    """One row per sample (the first MAX_PROVENANCE_ROWS): sample | source map | top training images.

    samples: (N, C, H, W); source: (N, H, W, 3) int (training image, row, column) per pixel;
    training_images: (M, C, H', W') indexed by source[..., 0]. The source map colours each pixel
    by its training image (the 20 images giving most pixels get palette colours, the rest grey);
    each of the top images that give most pixels is drawn with the centres of the patches taken
    from it outlined in its colour.
    """
    palette = np.array(source_palette())
    rows = min(len(samples), MAX_PROVENANCE_ROWS)
    columns = 2 + top
    figure, axes = _panel_figure(rows, columns, TITLE_INCHES)
    for row in range(rows):
        image_index = source[row, ..., 0]
        images, counts, ranks = source_ranking(image_index)
        colours = np.where((ranks < len(palette))[..., None], palette[np.minimum(ranks, len(palette) - 1)],
                           OTHER_SOURCES_COLOUR)
        for axis in axes[row]:
            axis.axis("off")
        _show(axes[row, 0], samples[row])
        axes[row, 0].set_title(f"sample {row}", fontsize=7)
        axes[row, 1].imshow(colours, interpolation="nearest")
        axes[row, 1].set_title(f"{len(images)} source images", fontsize=7)
        for rank, (image, count) in enumerate(zip(images[:top], counts[:top])):
            axis = axes[row, 2 + rank]
            _show(axis, training_images[image])
            centres = np.unique(source[row][image_index == image][:, 1:], axis=0)
            axis.scatter(centres[:, 1], centres[:, 0], s=9, marker="s", facecolors="none",
                         edgecolors=[palette[rank]], linewidths=0.6)
            axis.set_title(f"#{image}: {count} px", fontsize=7, color=palette[rank])
    return figure


def _panel_figure(rows: int, columns: int, title_inches: float) -> tuple[Figure, np.ndarray]:
    """A figure on an Agg canvas with a (rows, columns) array of square panels, each with room for a title above.

    The layout is computed here, not by tight_layout, which costs about a second per figure.
    """
    cell_width, cell_height = PANEL_INCHES + MARGIN_INCHES, PANEL_INCHES + title_inches + MARGIN_INCHES
    width, height = columns * cell_width + MARGIN_INCHES, rows * cell_height + MARGIN_INCHES
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False, gridspec_kw={
        "left": MARGIN_INCHES / width, "right": 1 - MARGIN_INCHES / width,
        "bottom": MARGIN_INCHES / height, "top": 1 - (MARGIN_INCHES + title_inches) / height,
        "wspace": MARGIN_INCHES / PANEL_INCHES, "hspace": (MARGIN_INCHES + title_inches) / PANEL_INCHES})
    return figure, axes


def _show(axis, image: np.ndarray) -> None:
    axis.imshow(display_image(image), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
