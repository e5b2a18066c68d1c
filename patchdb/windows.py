"""The exact patch posterior from sliding-window correlations: the exact backend's CPU method.

A patch machine's logit for pixel i and the training patch of image n centred at u is, in bits,

    l = c1 <q_i, k_{n,u}> - c2 ||k_{n,u}||^2,   c1 = sqrt(alpha_bar) / beta * log2(e),
                                                 c2 = alpha_bar / (2 beta) * log2(e)

(patchdb.engine, up to a constant per pixel). Write u = i + s. With X the padded noisy image and
Y_n the padded training image, <q_i, k_{n,i+s}> = sum over the P x P window at i of
Z_s[p] = X[p] Y_n[p + s]: for one shift s, one product image filtered by a box gives the inner
products of every pixel with its partner at i + s, at O(1) per (pixel, patch) pair where a matrix
product of patches costs O(P^2). Every dictionary entry's logit is computed and folded into a
streaming softmax; a weight counts as 0 only below 2^-96 of its pixel's largest (at most 1e-22 of
the posterior for ten million entries; the products method's rule is e^-60), so this is the exact
posterior, and no patch is ever copied (the dictionaries are the images themselves).

The machines' dictionaries (patchdb.patches.dictionary_groups) become tasks: a rectangle of query
pixels and one shift. A group whose query and key pixels are rectangles A and U contributes, for
every shift s, the pixels A ∩ (U - s); a same-location group (LS, bbELS corners) the shift 0 only.

The compiled kernel (patchdb/_windows.c) vectorises over a lane group of training images at a time,
as many as one vector register holds (lanes(dtype): 16 float32 with AVX-512, 8 with AVX); threads
fold disjoint lane groups into states of their own, merged here.
"""

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from patchdb.patches import DictionaryGroup, padded_images, pixel_boxes, window_sums

try:
    from patchdb import _windows
except ImportError:  # the extension was not compiled (no C compiler when installing): the matrix-product method is used
    _windows = None

VECTOR_BYTES = {} if _windows is None else dict(_windows.isas())
"""The kernel's instruction sets that this processor runs, best first, and their vector widths in bytes."""
LOG2_E = 1.0 / math.log(2.0)  # as patchdb.engine.LOG2_E: engine imports this module, not the other way
LAYOUT_CHUNK_BYTES = 8 * 1024**2
"""LaneImages.from_images computes the patches' norms this many bytes of laid-out images at a time."""


def compiled() -> bool:
    """Whether the kernel patchdb._windows was compiled when patchdb was installed."""
    return _windows is not None


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel can score on device in dtype (compiled, CPU, float32 or float64)."""
    return compiled() and device.type == "cpu" and dtype in (torch.float32, torch.float64)


def best_isa() -> str:
    """The fastest instruction set of the kernel on this processor."""
    return next(iter(VECTOR_BYTES))


def lanes(dtype: torch.dtype, isa: str | None = None) -> int:
    """Training images per lane group: values of dtype in one vector of isa (default: best_isa())."""
    return VECTOR_BYTES[isa or best_isa()] // torch.empty((), dtype=dtype).element_size()


@dataclass
class LaneImages:
    """Training images laid out for the kernel of instruction set isa at one patch size.

    images: (G, H + P - 1, W + P - 1, C, L) the padded images, image n = g * L + lane, L = lanes(dtype, isa)
        (zeros beyond the last one); squared_norms: (G, H, W, L) ||k||^2 of the patch centred at
        each pixel (+inf beyond the last image, so that those lanes weigh nothing); count: images held.
    """

    images: torch.Tensor
    squared_norms: torch.Tensor
    count: int
    isa: str

    @classmethod
    def from_images(cls, images: torch.Tensor, patch_size: int, padding: str, isa: str | None = None) -> "LaneImages":
        """Lay out images (N, C, H, W) padded with zeros or circularly (patchdb.patches.padded_images)."""
        isa = isa or best_isa()
        count, channels, height, width = images.shape
        num_lanes = lanes(images.dtype, isa)
        groups, half = -(-count // num_lanes), patch_size // 2
        laid = images.new_zeros(groups, height + 2 * half, width + 2 * half, channels, num_lanes)
        by_lane = laid.permute(0, 4, 3, 1, 2)  # (G, L, C, H + P - 1, W + P - 1), a view
        if padding == "zeros":
            by_lane = by_lane[..., half:half + height, half:half + width]  # the padding stays 0
        else:
            images = padded_images(images, patch_size, padding)
        full, rest = divmod(count, num_lanes)
        by_lane[:full] = images[:full * num_lanes].view(full, num_lanes, *images.shape[1:])
        if rest:
            by_lane[full, :rest] = images[full * num_lanes:]
        # each patch's squared norm: window sums of the squares, along the rows and then the columns (direct sums),
        # a few groups at a time: the temporaries stay small enough to be reused, where fresh memory costs page faults
        norms = images.new_empty(groups, height, width, num_lanes)
        step = max(1, LAYOUT_CHUNK_BYTES // laid[0].nbytes)
        for first in range(0, groups, step):
            squares = laid[first:first + step].square().sum(dim=3)  # (g, H + P - 1, W + P - 1, L)
            norms[first:first + step] = window_sums(squares, patch_size)
        if rest:
            norms[-1, ..., rest:] = math.inf  # absent images (the last group's tail) weigh nothing
        return cls(laid, norms.contiguous(), count, isa)

    def groups(self, first: int, stop: int) -> "LaneImages":
        """Lane groups first..stop-1 (a view)."""
        num_lanes = self.images.shape[-1]
        count = min(self.count, stop * num_lanes) - first * num_lanes
        return LaneImages(self.images[first:stop], self.squared_norms[first:stop], count, self.isa)


def lane_image_bytes(channels: int, height: int, width: int, patch_size: int, dtype: torch.dtype) -> int:
    """Bytes per training image of (channels, height, width) in LaneImages.from_images, in dtype."""
    padded = (height + patch_size - 1) * (width + patch_size - 1) * channels
    return (padded + height * width) * torch.empty((), dtype=dtype).element_size()


def window_tasks(groups: list[DictionaryGroup], width: int) -> torch.Tensor:
    """(T, 6) int64 tasks (iy0, iy1, ix0, ix1, sy, sx) that pair every pixel of a grid width pixels wide with its whole
    dictionary, once.

    Each group's query and key pixels must form one rectangle each, or (same location) a few.
    """
    tasks = []
    for group in groups:
        query_boxes = pixel_boxes(group.query_pixels, width)
        if group.same_location:
            tasks += [(row, row + rows, col, col + cols, 0, 0) for row, col, rows, cols in query_boxes]
            continue
        key_boxes = pixel_boxes(group.key_pixels, width)
        if len(query_boxes) != 1 or len(key_boxes) != 1:
            raise ValueError(f"group {group.boundary_class!r}: sliding windows need rectangular query and key pixels")
        (qy, qx, qh, qw), (ky, kx, kh, kw) = query_boxes[0], key_boxes[0]
        for sy in range(ky - (qy + qh - 1), ky + kh - qy):
            iy0, iy1 = max(qy, ky - sy), min(qy + qh, ky + kh - sy)
            for sx in range(kx - (qx + qw - 1), kx + kw - qx):
                ix0, ix1 = max(qx, kx - sx), min(qx + qw, kx + kw - sx)
                tasks.append((iy0, iy1, ix0, ix1, sy, sx))
    return torch.tensor(tasks, dtype=torch.int64).reshape(-1, 6)


@dataclass
class WindowState:
    """The kernel's running softmax for B queries' pixels, per lane (in bits; see patchdb/_windows.c)."""

    shift: torch.Tensor
    normaliser: torch.Tensor
    weighted: torch.Tensor
    best: torch.Tensor
    best_code: torch.Tensor

    @classmethod
    def empty(cls, batch: int, channels: int, height: int, width: int, dtype: torch.dtype, num_lanes: int) -> "WindowState":
        shape = (batch, height, width, num_lanes)
        code_dtype = torch.int32 if dtype == torch.float32 else torch.int64
        return cls(torch.full(shape, -math.inf, dtype=dtype), torch.zeros(shape, dtype=dtype),
                   torch.zeros(batch, height, width, channels, num_lanes, dtype=dtype), torch.full(shape, -math.inf, dtype=dtype),
                   torch.zeros(shape, dtype=code_dtype))

    def fold(self, queries: torch.Tensor, lanes: LaneImages, tasks: torch.Tensor, alpha_bar: float, patch_size: int,
             group_offset: int, track_best: bool = True) -> None:
        """Fold every task against every image of lanes (the first of which is group group_offset overall);
        track_best: also keep each lane's largest logit and its source (best, best_code)."""
        signal, noise_variance = math.sqrt(alpha_bar), 1.0 - alpha_bar
        _windows.fold(lanes.isa, queries.numpy(), lanes.images.numpy(), lanes.squared_norms.numpy(), tasks.numpy(),
                      self.shift.numpy(), self.normaliser.numpy(), self.weighted.numpy(), self.best.numpy(),
                      self.best_code.numpy(), signal / noise_variance * LOG2_E, alpha_bar / (2 * noise_variance) * LOG2_E,
                      patch_size, group_offset, track_best)


def window_posterior(x: torch.Tensor, image_blocks, tasks: torch.Tensor, alpha_bar: float, patch_size: int, padding: str,
                     threads: int = 1, provenance: bool = True):
    """Exact posterior of every pixel of x (B, C, H, W) over the tasks' patches of the training images.

    image_blocks: iterable of LaneImages holding the training images in order (one block, or several
    when they do not fit in memory at once). threads: threads that fold disjoint lane groups.
    Returns mean (B, C, H, W) and, with provenance (else None, None), source (B, H, W, 3) int64
    (training image, centre row, centre column) of each pixel's largest-weight patch and its weight (B, H, W).
    """
    batch, channels, height, width = x.shape
    queries = padded_images(x, patch_size, padding).contiguous()
    states, group_offset = None, 0
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for lanes in image_blocks:
            groups, num_lanes = lanes.images.shape[0], lanes.images.shape[-1]
            if states is None:
                states = [WindowState.empty(batch, channels, height, width, x.dtype, num_lanes) for _ in range(threads)]
            bounds = [groups * part // threads for part in range(threads + 1)]
            jobs = [pool.submit(state.fold, queries, lanes.groups(first, stop), tasks, alpha_bar, patch_size,
                                group_offset + first, provenance)
                    for state, first, stop in zip(states, bounds, bounds[1:]) if stop > first]
            for job in jobs:
                job.result()
            group_offset += groups
    return _merge(states, tasks, x.dtype, provenance)


def _merge(states: list[WindowState], tasks: torch.Tensor, dtype: torch.dtype, provenance: bool):
    """Combine the states' lanes (in float64): posterior mean and, with provenance, dominant source and its weight."""
    shift = torch.stack([state.shift for state in states], dim=3).double().flatten(3)  # (B, H, W, K)
    normaliser = torch.stack([state.normaliser for state in states], dim=3).double().flatten(3)
    weighted = torch.stack([state.weighted for state in states], dim=3).double().transpose(3, 4).flatten(4)  # (B, H, W, C, K)
    top = shift.amax(dim=3, keepdim=True)
    factor = torch.exp2(shift - top)
    total = (normaliser * factor).sum(dim=3)
    mean = (weighted * factor[:, :, :, None, :]).sum(dim=4) / total[..., None]
    if not provenance:
        return mean.permute(0, 3, 1, 2).to(dtype), None, None
    best_logit, best_lane = torch.stack([state.best for state in states], dim=3).double().flatten(3).max(dim=3)
    num_lanes = states[0].shift.shape[-1]
    code = torch.stack([state.best_code for state in states], dim=3).flatten(3).gather(3, best_lane[..., None])[..., 0].long()
    image = code // tasks.shape[0] * num_lanes + best_lane % num_lanes
    task = tasks[code % tasks.shape[0]]
    batch, height, width = shift.shape[:3]
    rows = torch.arange(height)[None, :, None].expand(batch, -1, width)
    cols = torch.arange(width)[None, None, :].expand(batch, height, -1)
    source = torch.stack([image, rows + task[..., 4], cols + task[..., 5]], dim=-1)
    weight = torch.exp2(best_logit - top[..., 0]) / total
    return mean.permute(0, 3, 1, 2).to(dtype), source, weight.to(dtype)
