"""The exact patch posterior from sliding-window correlations: the exact backend's CPU method.

A patch machine's logit for pixel i and the training patch of image n centred at u is, in bits,

    l = c1 <q_i, k_{n,u}> - c2 ||k_{n,u}||^2,   c1 = sqrt(alpha_bar) / beta * log2(e),
                                                 c2 = alpha_bar / (2 beta) * log2(e)

(patchdb.engine, up to a constant per pixel). Write u = i + s. With X the padded noisy image and
Y_n the padded training image, <q_i, k_{n,i+s}> = sum over the P x P window at i of
Z_s[p] = X[p] Y_n[p + s]: for one shift s, one product image filtered by a box gives the inner
products of every pixel with its partner at i + s, at O(1) per (pixel, patch) pair where a matrix
product of patches costs O(P^2). Nothing is dropped or approximated: every dictionary entry's logit
is computed and folded into a streaming softmax, so this is the exact posterior, and no patch is
ever copied (the dictionaries are the images themselves).

The machines' dictionaries (patchdb.patches.dictionary_groups) become tasks: a rectangle of query
pixels and one shift. A group whose query and key pixels are rectangles A and U contributes, for
every shift s, the pixels A ∩ (U - s); a same-location group (LS, bbELS corners) the shift 0 only.

The compiled kernel (patchdb/_windows.c) vectorises over LANES training images at a time; threads
fold disjoint sets of images into states of their own, merged here.
"""

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patchdb.patches import DictionaryGroup, _boxes, padded_images

try:
    from patchdb import _windows
except ImportError:  # the extension was not compiled (no C compiler when installing): the matrix-product method is used
    _windows = None

LANES = 16 if _windows is None else _windows.LANES
LOG2_E = 1.0 / math.log(2.0)


def compiled() -> bool:
    """Whether the kernel patchdb._windows was compiled when patchdb was installed."""
    return _windows is not None


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel can score on device in dtype (compiled, CPU, float32 or float64)."""
    return compiled() and device.type == "cpu" and dtype in (torch.float32, torch.float64)


@dataclass
class LaneImages:
    """Training images laid out for the kernel at one patch size.

    images: (G, H + P - 1, W + P - 1, C, LANES) the padded images, image n = g * LANES + lane
        (zeros beyond the last one); squared_norms: (G, H, W, LANES) ||k||^2 of the patch centred at
        each pixel (+inf beyond the last image, so that those lanes weigh nothing); count: images held.
    """

    images: torch.Tensor
    squared_norms: torch.Tensor
    count: int

    @classmethod
    def from_images(cls, images: torch.Tensor, patch_size: int, padding: str) -> "LaneImages":
        """Lay out images (N, C, H, W) padded with zeros or circularly (patchdb.patches.padded_images)."""
        count, channels, height, width = images.shape
        groups = -(-count // LANES)
        padded = padded_images(images, patch_size, padding)
        norms = F.avg_pool2d(padded.square().sum(dim=1, keepdim=True), patch_size, stride=1) * patch_size**2  # (N, 1, H, W)
        lanes = padded.new_zeros(groups * LANES, *padded.shape[1:])
        lanes[:count] = padded
        lane_norms = norms.new_full((groups * LANES, height, width), math.inf)
        lane_norms[:count] = norms[:, 0]
        return cls(lanes.view(groups, LANES, *padded.shape[1:]).permute(0, 3, 4, 2, 1).contiguous(),
                   lane_norms.view(groups, LANES, height, width).permute(0, 2, 3, 1).contiguous(), count)

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size() + self.squared_norms.numel() * self.squared_norms.element_size()


def lane_image_bytes(num_images: int, channels: int, height: int, width: int, patch_size: int, itemsize: int) -> int:
    """Bytes of LaneImages.from_images for num_images images of (channels, height, width)."""
    padded = (height + patch_size - 1) * (width + patch_size - 1) * channels
    return -(-num_images // LANES) * LANES * (padded + height * width) * itemsize


def window_tasks(groups: list[DictionaryGroup], height: int, width: int) -> torch.Tensor:
    """(T, 6) int64 tasks (iy0, iy1, ix0, ix1, sy, sx) that pair every pixel with its whole dictionary, once.

    Each group's query and key pixels must form one rectangle each, or (same location) a few.
    """
    tasks = []
    for group in groups:
        query_boxes = _boxes(group.query_pixels, width)
        if group.same_location:
            tasks += [(row, row + rows, col, col + cols, 0, 0) for row, col, rows, cols in query_boxes]
            continue
        key_boxes = _boxes(group.key_pixels, width)
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
    def empty(cls, batch: int, channels: int, height: int, width: int, dtype: torch.dtype) -> "WindowState":
        shape = (batch, height, width, LANES)
        code_dtype = torch.int32 if dtype == torch.float32 else torch.int64
        return cls(torch.full(shape, -math.inf, dtype=dtype), torch.zeros(shape, dtype=dtype),
                   torch.zeros(batch, height, width, channels, LANES, dtype=dtype), torch.full(shape, -math.inf, dtype=dtype),
                   torch.zeros(shape, dtype=code_dtype))

    def fold(self, queries: torch.Tensor, lanes: LaneImages, tasks: torch.Tensor, alpha_bar: float, patch_size: int,
             group_offset: int) -> None:
        """Fold every task against every image of lanes (the first of which is group group_offset overall)."""
        signal, noise_variance = math.sqrt(alpha_bar), 1.0 - alpha_bar
        _windows.fold(queries.numpy(), lanes.images.numpy(), lanes.squared_norms.numpy(), tasks.numpy(),
                      self.shift.numpy(), self.normaliser.numpy(), self.weighted.numpy(), self.best.numpy(),
                      self.best_code.numpy(), signal / noise_variance * LOG2_E, alpha_bar / (2 * noise_variance) * LOG2_E,
                      patch_size, group_offset)


def window_posterior(x: torch.Tensor, image_blocks, tasks: torch.Tensor, alpha_bar: float, patch_size: int, padding: str,
                     threads: int = 1):
    """Exact posterior of every pixel of x (B, C, H, W) over the tasks' patches of the training images.

    image_blocks: iterable of LaneImages holding the training images in order (one block, or several
    when they do not fit in memory at once). threads: threads that fold disjoint lane groups.
    Returns mean (B, C, H, W), source (B, H, W, 3) int64 (training image, centre row, centre column)
    of each pixel's largest-weight patch, and its weight (B, H, W).
    """
    batch, channels, height, width = x.shape
    queries = padded_images(x, patch_size, padding).contiguous()
    states = [WindowState.empty(batch, channels, height, width, x.dtype) for _ in range(threads)]
    group_offset = 0
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for lanes in image_blocks:
            groups = lanes.images.shape[0]
            bounds = [groups * part // threads for part in range(threads + 1)]
            jobs = [pool.submit(state.fold, queries, LaneImages(lanes.images[first:stop], lanes.squared_norms[first:stop], 0),
                                tasks, alpha_bar, patch_size, group_offset + first)
                    for state, first, stop in zip(states, bounds, bounds[1:]) if stop > first]
            for job in jobs:
                job.result()
            group_offset += groups
    return _merge(states, tasks, x.dtype)


def _merge(states: list[WindowState], tasks: torch.Tensor, dtype: torch.dtype):
    """Combine the states' lanes (in float64): posterior mean, dominant source and its weight."""
    shift = torch.stack([state.shift for state in states], dim=3).double().flatten(3)  # (B, H, W, K)
    best = torch.stack([state.best for state in states], dim=3).double().flatten(3)
    normaliser = torch.stack([state.normaliser for state in states], dim=3).double().flatten(3)
    weighted = torch.stack([state.weighted for state in states], dim=3).double().transpose(3, 4).flatten(4)  # (B, H, W, C, K)
    top = shift.amax(dim=3, keepdim=True)
    factor = torch.exp2(shift - top)
    total = (normaliser * factor).sum(dim=3)
    mean = (weighted * factor[:, :, :, None, :]).sum(dim=4) / total[..., None]
    best_logit, best_lane = best.max(dim=3)
    code = torch.stack([state.best_code for state in states], dim=3).flatten(3).gather(3, best_lane[..., None])[..., 0].long()
    image = code // tasks.shape[0] * LANES + best_lane % LANES
    task = tasks[code % tasks.shape[0]]
    batch, height, width = shift.shape[:3]
    rows = torch.arange(height)[None, :, None].expand(batch, -1, width)
    cols = torch.arange(width)[None, None, :].expand(batch, height, -1)
    source = torch.stack([image, rows + task[..., 4], cols + task[..., 5]], dim=-1)
    weight = torch.exp2(best_logit - top[..., 0]) / total
    return mean.permute(0, 3, 1, 2).to(dtype), source, weight.to(dtype)
