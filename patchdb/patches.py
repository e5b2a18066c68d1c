"""Patches and patch dictionaries: what each machine lets a pixel compare its neighbourhood with.

A patch of side P (odd, half-width h = P // 2) centred at pixel (r, c) is the (C, P, P) block of an
image padded by h on every side, flattened in (channel, row, column) order to a vector of
D = C * P * P values. Its centre pixel sits at flat positions ``channel * P * P + h * P + h``.

A machine is a partition of the pixel grid into *dictionary groups*. Every pixel of a group uses
the same dictionary: the training patches centred at the group's ``key_pixels``, from every
training image; or, in a *same-location* group, each pixel uses only the training patches centred
at its own location. That one idea covers the patch machines:

- LS (zero padding): one same-location group of all pixels.
- ELS (circular padding): one group of all pixels; the dictionary holds patches at every location.
- boundary-broken ELS (zero padding): a pixel's boundary class is, per axis, "inside" or its
  distance to the border its patch crosses. Pixels whose patch is fully inside form one group
  whose dictionary holds every fully-inside patch; a pixel whose patch crosses one border shares
  its dictionary with the pixels at the same distance from that border (any position along it);
  a corner pixel (two borders) keeps only its own location. For P >= the image side it is LS.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patchdb.data import IMAGE_SIZE
from patchdb.errors import PatchdbError

PATCH_MACHINES = ("ls", "els", "bbels")


@dataclass(frozen=True)
class DictionaryGroup:
    """Pixels that share one patch dictionary (or, same_location, one rule for their dictionaries).

    query_pixels: (Q,) int64 flat indices r * W + c of the pixels whose score uses this dictionary.
    key_pixels: (K,) int64 flat indices of the centres of the dictionary's patches in each training
        image; for a same-location group, equal to query_pixels, and pixel query_pixels[i] uses only
        the patches centred at key_pixels[i].
    boundary_class: a name for the dictionary, e.g. 'interior', 'top=2', 'corners', 'same location'.
    """

    query_pixels: torch.Tensor
    key_pixels: torch.Tensor
    boundary_class: str
    same_location: bool = False


def padding_mode(machine: str) -> str:
    """'circular' for ELS, 'zeros' for LS and boundary-broken ELS."""
    return "circular" if machine == "els" else "zeros"


def dictionary_groups(machine: str, patch_size: int, height: int, width: int) -> list[DictionaryGroup]:
    """Partition an (height, width) grid into the dictionary groups of a patch machine at patch_size."""
    if machine not in PATCH_MACHINES:
        raise ValueError(f"not a patch machine: {machine!r}")
    all_pixels = torch.arange(height * width)
    if machine == "els":
        return [DictionaryGroup(all_pixels, all_pixels, "all locations")]
    if machine == "ls" or patch_size >= min(height, width):
        return [DictionaryGroup(all_pixels, all_pixels, "same location", same_location=True)]
    half = patch_size // 2
    groups, corners = [], []
    for row_class, rows in _axis_classes(height, half, ("top", "bottom")):
        for col_class, cols in _axis_classes(width, half, ("left", "right")):
            pixels = (rows[:, None] * width + cols[None, :]).reshape(-1)
            if row_class is not None and col_class is not None:
                corners.append(pixels)
            else:
                groups.append(DictionaryGroup(pixels, pixels, row_class or col_class or "interior"))
    if corners:
        corner_pixels = torch.cat(corners)
        groups.append(DictionaryGroup(corner_pixels, corner_pixels, "corners", same_location=True))
    return groups


def _axis_classes(size: int, half: int, sides: tuple[str, str]):
    """Per-axis boundary classes: (None, inside coordinates), then ('top=d', [d]) for each crossing distance."""
    yield None, torch.arange(half, size - half)
    for distance in range(half):
        yield f"{sides[0]}={distance}", torch.tensor([distance])
        yield f"{sides[1]}={distance}", torch.tensor([size - 1 - distance])


def centre_indices(channels: int, patch_size: int) -> torch.Tensor:
    """(C,) positions of the centre pixel's channels inside a flattened (C, P, P) patch."""
    half = patch_size // 2
    return torch.arange(channels) * patch_size * patch_size + half * patch_size + half


def extract_patches(images: torch.Tensor, patch_size: int, padding: str, pixels: torch.Tensor) -> torch.Tensor:
    """Patches of images (N, C, H, W) centred at flat pixel indices pixels (M,): (N, M, C * P * P).

    padding: 'zeros' (pixels beyond the border read 0) or 'circular' (they wrap around).
    """
    return gather_patches(patch_windows(images, patch_size, padding), pixels)


def largest_patch_size(padding: str, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> int:
    """The largest patch size that check_patch_size lets through on height x width images with padding: circular
    patches may wrap once around the image; zero-padded ones hold the whole image at every pixel from 2 * side - 1 on,
    and a larger one would only add zeros to every patch."""
    return 2 * min(height, width) + 1 if padding == "circular" else 2 * max(height, width) - 1


MAX_PATCH_SIZE = largest_patch_size("circular")
"""The largest patch size that check_patch_size lets through on the IMAGE_SIZE x IMAGE_SIZE images every data set is
loaded as (circular padding; zero padding stops at 2 * IMAGE_SIZE - 1)."""


def check_patch_size(patch_size: int, padding: str, height: int, width: int) -> None:
    """PatchdbError where patches of patch_size cannot be cut from height x width images with padding."""
    largest = largest_patch_size(padding, height, width)
    if patch_size <= largest:
        return
    if padding == "circular":
        raise PatchdbError(f"patch size {patch_size} wraps more than once around a {height}x{width} image; "
                           f"circular patches can be at most {largest} wide")
    raise PatchdbError(f"patch size {patch_size} is larger than a {height}x{width} image's patches can usefully be "
                       f"(at {largest} each holds the whole image); use at most that")


def check_patch_sizes(sizes, machine: str, image_shape: tuple[int, ...] = (1, IMAGE_SIZE, IMAGE_SIZE)) -> None:
    """check_patch_size for each of sizes with machine's padding on images of image_shape (C, H, W): before any work,
    rather than at the first step that uses a size. The default shape is the one every data set is loaded at
    (patchdb.data.load_dataset), so that sizes can be checked before the data loads."""
    for size in sorted(set(sizes)):
        check_patch_size(size, padding_mode(machine), *image_shape[1:])


def patch_windows(images: torch.Tensor, patch_size: int, padding: str) -> torch.Tensor:
    """Every patch of images (N, C, H, W) as a strided view (N, C, H, W, P, P); nothing is copied but the padding."""
    return padded_images(images, patch_size, padding).unfold(2, patch_size, 1).unfold(3, patch_size, 1)


def window_sums(values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Sums over every patch_size x patch_size window of values (N, H + P - 1, W + P - 1, ...) along dims 1 and 2:
    (N, H, W, ...). Direct sums along the rows, then the columns, which keep the precision that differences of
    running sums would lose."""
    return values.unfold(1, patch_size, 1).sum(-1).unfold(2, patch_size, 1).sum(-1)


def padded_images(images: torch.Tensor, patch_size: int, padding: str) -> torch.Tensor:
    """images (N, C, H, W) padded by P // 2 on every side, with zeros or circularly: (N, C, H + P - 1, W + P - 1)."""
    half = patch_size // 2
    height, width = images.shape[-2:]
    if padding == "circular":
        if half > min(height, width):
            raise ValueError(f"circular patches of size {patch_size} wrap more than once around a {height}x{width} image")
        return F.pad(images, (half, half, half, half), mode="circular")
    return F.pad(images, (half, half, half, half))


MAX_SLICED_BOXES = 64
"""gather_patches copies pixels that form at most this many rectangles by slicing; others go through indexing."""


def gather_patches(windows: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Copy the patches centred at flat pixel indices pixels (M,) out of a patch_windows view: (N, M, D).

    Pixels that form a few rectangles, each listed row by row (a dictionary group's rectangle), are copied a
    rectangle at a time by slicing, faster than indexing every pixel. bbELS's corner pixels are listed in no such
    order (one box per pixel): up to MAX_SLICED_BOXES of them are sliced one by one, more go through indexing.
    """
    num_images, channels, _, width, size, _ = windows.shape
    pixels = pixels.to(windows.device)
    boxes = pixel_boxes(pixels, width)
    if len(boxes) > MAX_SLICED_BOXES:
        selected = windows[:, :, pixels // width, pixels % width].permute(0, 2, 1, 3, 4)  # (N, M, C, P, P)
        return selected.reshape(num_images, pixels.shape[0], -1)
    patches = torch.empty(num_images, pixels.shape[0], channels, size, size, dtype=windows.dtype, device=windows.device)
    start = 0
    for row, column, height, length in boxes:
        box = patches[:, start:start + height * length].view(num_images, height, length, channels, size, size)
        box.copy_(windows[:, :, row:row + height, column:column + length].permute(0, 2, 3, 1, 4, 5))
        start += height * length
    return patches.reshape(num_images, pixels.shape[0], -1)


def pixel_boxes(pixels: torch.Tensor, width: int) -> list[tuple[int, int, int, int]]:
    """(first row, first column, rows, columns) of the rectangles that pixels (M,) list row by row, in order."""
    if pixels.numel() == 0:
        return []
    breaks = (pixels.diff() != 1) | (pixels[1:] % width == 0)
    starts = [0] + (torch.nonzero(breaks).squeeze(1) + 1).tolist()
    boxes = []
    for start, stop in zip(starts, starts[1:] + [pixels.shape[0]]):
        row, column = divmod(int(pixels[start]), width)
        if boxes and boxes[-1][1] == column and boxes[-1][3] == stop - start and boxes[-1][0] + boxes[-1][2] == row:
            boxes[-1] = (boxes[-1][0], column, boxes[-1][2] + 1, stop - start)  # the next row of the same rectangle
        else:
            boxes.append((row, column, 1, stop - start))
    return boxes


REGION_TILE = 8
"""same_location_regions groups same-location pixels into tiles of REGION_TILE x REGION_TILE pixels."""
REGION_MAX_WASTE = 2.5
"""Regions replace copied patches where each tile's region holds at most this many times the pixels of one
patch (P >= 13 for 8 x 8 tiles): there one product against the region costs little more than the patches'."""


def region_tiles(pixels: torch.Tensor, patch_size: int, width: int) -> list[tuple[torch.Tensor, int, int, int, int]] | None:
    """How same_location_regions keeps the patches of same-location pixels (M,) of a grid width pixels wide: per tile
    of REGION_TILE x REGION_TILE pixels, (members (T,) int64 positions in pixels, top, left, height, side) of the
    region of the padded image that holds their patches; None when some region holds more than REGION_MAX_WASTE
    patches' worth of pixels (then the patches are copied)."""
    rows, columns = pixels // width, pixels % width
    tile_of = (rows // REGION_TILE) * (width // REGION_TILE + 1) + columns // REGION_TILE
    tiles = []
    for tile in tile_of.unique().tolist():
        members = torch.nonzero(tile_of == tile).squeeze(1)
        top, left = int(rows[members].min()), int(columns[members].min())
        height = int(rows[members].max()) - top + patch_size
        side = int(columns[members].max()) - left + patch_size
        if height * side > REGION_MAX_WASTE * patch_size**2:
            return None
        tiles.append((members, top, left, height, side))
    return tiles


def same_location_regions(images: torch.Tensor, pixels: torch.Tensor, patch_size: int, padding: str
                          ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, int, int]]] | None:
    """The patches of same-location pixels (M,) in images (N, C, H, W) as regions, or None where that saves little.

    The pixels are split into tiles (region_tiles); all patches centred in a tile lie in one region of
    the padded image (the pixels' bounding box grown by P - 1), so instead of M patches per image it
    keeps the tiles' regions: regions (N, A), every tile's region flattened in (channel, row, column)
    order and concatenated; embedding (M, D) int64, the position in A of each element of pixel m's
    patch; tiles, per tile (members (T,) int64 positions in pixels, first, stop) its slice of A.
    """
    width, device = images.shape[-1], images.device
    pixels = pixels.to(device)
    layout = region_tiles(pixels, patch_size, width)
    if layout is None:
        return None
    num_images, channels = images.shape[:2]
    rows, columns = pixels // width, pixels % width
    offsets = torch.arange(patch_size, device=device)
    tiles, length = [], 0
    embedding = torch.empty(len(pixels), channels * patch_size**2, dtype=torch.int64, device=device)
    for members, top, left, height, side in layout:
        channel = torch.arange(channels, device=device)[:, None, None] * height * side
        within = channel + offsets[None, :, None] * side + offsets[None, None, :]  # (C, P, P) relative to the patch's corner
        corner = (rows[members] - top) * side + columns[members] - left
        embedding[members] = length + corner[:, None] + within.reshape(1, -1)
        tiles.append((members, length, length + channels * height * side))
        length += channels * height * side
    regions = images.new_empty(num_images, length)
    for start in range(0, num_images, REGION_IMAGES):
        padded = padded_images(images[start:start + REGION_IMAGES], patch_size, padding)
        for (_, top, left, height, side), (_, first, stop) in zip(layout, tiles):
            target = regions[start:start + REGION_IMAGES, first:stop].view(padded.shape[0], channels, height, side)
            target.copy_(padded[:, :, top:top + height, left:left + side])
    return regions, embedding, tiles


REGION_IMAGES = 1024
"""same_location_regions pads this many training images at a time and copies their regions straight into place:
temporaries of a few MiB, which the allocator reuses (padding all 60,000 images at once, then copying each region
and concatenating them, faulted in some 1.4 GB of fresh memory per scale)."""


def extracted_bytes_per_image(group: DictionaryGroup, patch_size: int, channels: int, width: int, element_size: int) -> int:
    """Bytes that each training image adds to group's extracted dictionary (patchdb.engine.PatchDictionary.nbytes, before
    merging duplicates): its patches at the group's key pixels (or, for a same-location group kept as regions,
    same_location_regions, its regions), and per entry its value, squared norm, multiplicity and source (three int64)."""
    entry_bytes = (channels + 2) * element_size + 3 * 8
    tiles = region_tiles(group.key_pixels, patch_size, width) if group.same_location else None
    if tiles is None:
        key_elements = len(group.key_pixels) * channels * patch_size**2
    else:
        key_elements = sum(height * side for _, _, _, height, side in tiles) * channels
    return key_elements * element_size + len(group.key_pixels) * entry_bytes


def gather_sources(windows: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """Copy the patches at sources (n, 3) int64 (image, centre row, centre column) out of a patch_windows view: (n, D).

    Every patch is one element of a view of the windows' storage with one (C, P, P) patch per storage
    position, so the copy is an index_select of whole patches: about twice as fast as indexing the
    windows (pixel by pixel) where the sources are scattered over many images.
    """
    num_images, channels, height, width, size, _ = windows.shape
    image_stride, channel_stride, row_stride, column_stride, patch_row_stride, patch_column_stride = windows.stride()
    last_start = (num_images - 1) * image_stride + (height - 1) * row_stride + (width - 1) * column_stride
    by_start = windows.as_strided((last_start + 1, channels, size, size),
                                  (1, channel_stride, patch_row_stride, patch_column_stride), windows.storage_offset())
    starts = sources[:, 0] * image_stride + sources[:, 1] * row_stride + sources[:, 2] * column_stride
    return by_start.index_select(0, starts).reshape(sources.shape[0], channels * size * size)
