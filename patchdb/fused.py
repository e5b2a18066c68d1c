"""The exact backend's fused GPU method: matrix product and streaming softmax in one Triton kernel.

The matrix-product method writes every chunk of logits to memory and reads it back several times
(maximum, exp, sum, contraction); on a GPU that traffic, not the arithmetic, bounds it. Here each
program scores a block of queries against a run of dictionary entries on the tensor cores and folds
the logits straight into a running maximum, normaliser, weighted sum and best entry held in
registers, like an attention kernel whose values are the entries' centre pixels. Programs that
share a block of queries but cover different runs (splits) are merged afterwards.

Precision. The tensor cores multiply float16 operands exactly and add in float32. Keys on a lattice
k = n / KEY_LATTICE with integers |n| <= 2048 (every 8-bit image preprocessed affinely to [-1, 1]
or [0, 1]) are exact in float16; a query is split into two float16 parts, q = q_hi + q_lo, which
carry 22 of its 24 significant bits, so q.k is as accurate as a float32 product up to a relative
2^-22. Other keys are split as well (three products: hi.hi, lo.hi, hi.lo).

Triton is imported only here and only when the method is used: torch's CUDA builds bring it; on a
CPU (no Triton) the engine never asks for this method.
"""

import functools
import math
import os
from dataclasses import dataclass

import torch

from patchdb.errors import PatchdbError

LOG2_E = 1.0 / math.log(2.0)  # as patchdb.engine.LOG2_E: engine imports this module, not the other way

KEY_LATTICE = 255.0
"""Keys k with k * KEY_LATTICE integral (to float32 rounding) are multiplied as those integers, exactly."""

MAX_LATTICE_INTEGER = 2048
"""float16 holds every integer up to this magnitude exactly."""

FLOAT16_MAX = 65504.0

CONFIGS = ((128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4))
"""(queries per program, entries per block, warps, pipeline stages): the kernel configurations timed at each depth."""

KEY_BLOCK = 1 << 20
"""Keys converted to the kernel's operand at a time."""

TUNING_QUERIES = 4096
TUNING_ENTRIES = 1 << 17
TUNING_REPEATS = 3

PROGRAMS_PER_PROCESSOR = 4
"""Enough programs per multiprocessor that a kernel fills the GPU even for few queries (then entries are split)."""


def available(device: torch.device) -> bool:
    """Whether the fused method can run on device: a CUDA GPU and an importable Triton
    (or Triton's interpreter, TRITON_INTERPRET=1, on the CPU: for tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class FusedKeys:
    """A dictionary's keys as the kernel's float16 operand, and how queries meet it.

    parts: (K, depth) float16: the keys as lattice integers (D columns, zero-padded to depth), or, when split,
        their high and low float16 parts side by side (2D columns, padded). The kernel adds two products per
        key: the query's first operand against parts, and its second (see queries) against parts.
    split: whether the keys are split (not on the lattice).
    scale: what the products are multiplied by (1 / KEY_LATTICE for lattice keys, else 1).
    dim: D, the keys' length.
    """

    parts: torch.Tensor
    split: bool
    scale: float
    dim: int

    @property
    def shape(self) -> tuple[int, int]:
        """(K, D), as the float keys it stands for."""
        return self.parts.shape[0], self.dim

    @classmethod
    def from_keys(cls, keys: torch.Tensor) -> "FusedKeys":
        """keys: (K, D) float32 or float64, converted KEY_BLOCK rows at a time (a whole scaled copy would double the
        peak memory)."""
        num_keys, dim = keys.shape
        blocks = keys.split(KEY_BLOCK)
        split = not all(_on_lattice(block) for block in blocks)
        if split and any(bool(block.abs().max() > FLOAT16_MAX) for block in blocks):
            raise PatchdbError("the fused exact method needs keys below 65504 in magnitude; use --exact-method products")
        parts = _padded_zeros(num_keys, 2 * dim if split else dim, keys.device)
        for start, block in zip(range(0, num_keys, KEY_BLOCK), blocks):
            rows = parts[start:start + block.shape[0]]
            if split:
                high = block.half()
                rows[:, :dim] = high
                rows[:, dim:2 * dim] = block - high.to(block.dtype)
            else:
                rows[:, :dim] = (block * KEY_LATTICE).round()
        return cls(parts, split, 1.0 if split else 1.0 / KEY_LATTICE, dim)

    def queries(self, queries: torch.Tensor) -> torch.Tensor:
        """(2, Q, depth) float16: the two query operands for queries (Q, D): the high and low float16 parts of the
        queries, against lattice keys; [high, high] and [low, 0] against split keys (q_hi.k_hi + q_hi.k_lo + q_lo.k_hi)."""
        dim = self.dim
        operands = _padded_zeros(queries.shape[0], self.parts.shape[1], queries.device, leading=2)
        high = queries.half()
        operands[0, :, :dim] = high
        operands[1, :, :dim] = queries - high.to(queries.dtype)
        if self.split:
            operands[0, :, dim:2 * dim] = high
        return operands


def _on_lattice(keys: torch.Tensor) -> bool:
    """Whether every key of keys (n, D) is an integer of at most MAX_LATTICE_INTEGER over KEY_LATTICE (to float32 rounding)."""
    scaled = keys * KEY_LATTICE
    return bool((scaled - scaled.round()).abs().max() <= 1e-3) and bool(scaled.abs().max() <= MAX_LATTICE_INTEGER)


def _padded_zeros(rows: int, width: int, device: torch.device, leading: int | None = None) -> torch.Tensor:
    """float16 zeros (rows, width padded to a multiple of the kernel's depth block), with a leading dimension if given;
    a width given as already padded stays as it is."""
    depth = _depth_block(width)
    shape = (rows, math.ceil(width / depth) * depth)
    return torch.zeros((leading, *shape) if leading else shape, dtype=torch.float16, device=device)


def _depth_block(width: int) -> int:
    """The kernel's depth block for operands of this width: 64, unless 32 pads less (a width of 81 pads to 96, not 128)."""
    return 64 if math.ceil(width / 64) * 64 == math.ceil(width / 32) * 32 else 32


def fold(accumulator, queries: torch.Tensor, keys: FusedKeys, squared_norms: torch.Tensor, log_multiplicity: torch.Tensor | None,
         values: torch.Tensor, sources: torch.Tensor, alpha_bar: float, negligible_bits: float) -> None:
    """Fold every entry of one dictionary into accumulator (a patchdb.engine.SoftmaxAccumulator) at noise level alpha_bar.

    queries: (Q, D) noisy patches. keys: the dictionary's K keys (FusedKeys). squared_norms: (K,) ||key||^2.
    log_multiplicity: (K,) natural log of each entry's multiplicity, or None (all 1). values: (K, V). sources: (K, 3).
    negligible_bits: a block of entries that lies this many bits below every query's running maximum is skipped
    (the engine's NEGLIGIBLE_LOG_WEIGHT, in bits).
    """
    if queries.shape[1] != keys.dim:
        raise ValueError(f"queries of {queries.shape[1]} values against keys of {keys.dim}")
    signal, noise_variance = math.sqrt(alpha_bar), 1.0 - alpha_bar
    norm_bias = ((-alpha_bar * LOG2_E / (2 * noise_variance)) * squared_norms).float().contiguous()
    log_multiplicity_bits = (torch.zeros_like(norm_bias) if log_multiplicity is None
                             else (log_multiplicity * LOG2_E).float().contiguous())
    split_state = _launch(keys.queries(queries), keys, norm_bias, log_multiplicity_bits, values.float().contiguous(),
                          signal * LOG2_E / noise_variance * keys.scale, negligible_bits)
    accumulator.merge(split_state, sources)


def _launch(operand: torch.Tensor, keys: FusedKeys, norm_bias: torch.Tensor, log_multiplicity_bits: torch.Tensor,
            values: torch.Tensor, scale: float, negligible_bits: float,
            config: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, ...]:
    """Run the kernel (with config, else the tuned one for the keys' depth) and return the splits' states, each (S, Q) or
    (S, Q, V): maximum, normaliser, weighted sum, best logit (bits) and best entry."""
    num_rows, num_entries, depth = operand.shape[1], keys.parts.shape[0], keys.parts.shape[1]
    channels = values.shape[1]
    device = operand.device
    if config is None:
        config = _tuned_config(depth, channels, device.index or 0) if device.type == "cuda" else CONFIGS[0]
    block_rows, block_entries, warps, stages = config
    row_blocks = math.ceil(num_rows / block_rows)
    processors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    splits = max(1, min(math.ceil(PROGRAMS_PER_PROCESSOR * processors / row_blocks),
                        math.ceil(num_entries / (4 * block_entries))))
    entries_per_split = math.ceil(math.ceil(num_entries / splits) / block_entries) * block_entries
    splits = math.ceil(num_entries / entries_per_split)
    float32 = dict(dtype=torch.float32, device=device)
    state = (torch.empty(splits, num_rows, **float32), torch.empty(splits, num_rows, **float32),
             torch.empty(splits, num_rows, channels, **float32), torch.empty(splits, num_rows, **float32),
             torch.empty(splits, num_rows, dtype=torch.int64, device=device))
    _kernel()[(row_blocks, splits)](
        operand, keys.parts, norm_bias, log_multiplicity_bits, values, *state,
        num_rows, num_entries, depth, operand[1].storage_offset(), entries_per_split, scale, negligible_bits,
        CHANNELS=channels, CHANNELS_PADDED=max(2, 1 << (channels - 1).bit_length()), BLOCK_ROWS=block_rows,
        BLOCK_ENTRIES=block_entries, BLOCK_DEPTH=_depth_block(depth), num_warps=warps, num_stages=stages)
    return state


@functools.cache
def _tuned_config(depth: int, channels: int, device_index: int) -> tuple[int, int, int, int]:
    """The fastest of CONFIGS at this depth on one GPU, timed once per process on random operands of
    TUNING_QUERIES x TUNING_ENTRIES (a few milliseconds each). Triton's autotuner times the first real call instead:
    at 60,000 images on an H200 the first step at each patch size then took 97-113 s, later ones about 3 s."""
    if len(CONFIGS) == 1:
        return CONFIGS[0]
    device = torch.device("cuda", device_index)
    generator = torch.Generator(device).manual_seed(0)
    keys = FusedKeys(torch.randn(TUNING_ENTRIES, depth, generator=generator, device=device).half(), False, 1.0, depth)
    operand = torch.randn(2, TUNING_QUERIES, depth, generator=generator, device=device).half()
    zeros = torch.zeros(TUNING_ENTRIES, device=device)
    values = torch.rand(TUNING_ENTRIES, channels, generator=generator, device=device)
    timings = {}
    for config in CONFIGS:
        launch = functools.partial(_launch, operand, keys, zeros, zeros, values, 1.0 / depth, math.inf, config)
        launch()  # compiles
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(TUNING_REPEATS):
            launch()
        stop.record()
        stop.synchronize()
        timings[config] = start.elapsed_time(stop)
    return min(timings, key=timings.get)


@functools.cache
def _kernel():
    """The Triton kernel, defined on first use (Triton is imported only then); it compiles per configuration and depth block."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["num_rows", "num_entries"])
    def posterior_fold(query_ptr, key_ptr, norm_bias_ptr, log_multiplicity_ptr, value_ptr,
                       max_ptr, normaliser_ptr, weighted_ptr, best_ptr, best_entry_ptr,
                       num_rows, num_entries, depth, low_offset, entries_per_split, scale, negligible_bits,
                       CHANNELS: tl.constexpr, CHANNELS_PADDED: tl.constexpr,
                       BLOCK_ROWS: tl.constexpr, BLOCK_ENTRIES: tl.constexpr, BLOCK_DEPTH: tl.constexpr):
        """One block of queries against one split of the entries: logits in bits, folded online."""
        row_block = tl.program_id(0)
        split = tl.program_id(1)
        rows = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < num_rows
        first = split * entries_per_split
        stop = tl.minimum(first + entries_per_split, num_entries)
        depth_offsets = tl.arange(0, BLOCK_DEPTH)
        channel = tl.arange(0, CHANNELS_PADDED)
        running_max = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
        normaliser = tl.zeros([BLOCK_ROWS], tl.float32)
        weighted = tl.zeros([BLOCK_ROWS, CHANNELS_PADDED], tl.float32)
        best = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
        best_entry = tl.full([BLOCK_ROWS], -1, tl.int64)
        # 64-bit bases once per block, 32-bit offsets within it
        query_block = query_ptr + (row_block * BLOCK_ROWS).to(tl.int64) * depth
        query_offsets = tl.arange(0, BLOCK_ROWS)[:, None] * depth + depth_offsets[None, :]
        key_offsets = tl.arange(0, BLOCK_ENTRIES)[None, :] * depth + depth_offsets[:, None]
        for start in range(first, stop, BLOCK_ENTRIES):
            entries = start + tl.arange(0, BLOCK_ENTRIES)
            entry_ok = entries < stop
            key_block = key_ptr + tl.cast(start, tl.int64) * depth
            products = tl.zeros([BLOCK_ROWS, BLOCK_ENTRIES], tl.float32)
            # the depth loop is the one Triton pipelines; one flat loop over (entry block, depth block) pairs, tried,
            # made it wait for each tensor-core instruction before issuing the next (its accumulator is reset inside it)
            for offset in range(0, depth, BLOCK_DEPTH):
                key = tl.load(key_block + offset + key_offsets, mask=entry_ok[None, :], other=0.0)
                high = tl.load(query_block + offset + query_offsets, mask=row_ok[:, None], other=0.0)
                low = tl.load(query_block + low_offset + offset + query_offsets, mask=row_ok[:, None], other=0.0)
                products = tl.dot(high, key, products)
                products = tl.dot(low, key, products)
            logits = products * scale + tl.load(norm_bias_ptr + entries, mask=entry_ok, other=float("-inf"))[None, :]
            tile_max = tl.where(row_ok, tl.max(logits, axis=1), float("-inf"))
            improved = tile_max > best
            if tl.max(improved.to(tl.int32), axis=0) > 0:  # the dominant copy (multiplicity aside) changes
                best_entry = tl.where(improved, (start + tl.argmax(logits, axis=1)).to(tl.int64), best_entry)
                best = tl.where(improved, tile_max, best)
            logits += tl.load(log_multiplicity_ptr + entries, mask=entry_ok, other=0.0)[None, :]
            tile_max = tl.where(row_ok, tl.max(logits, axis=1), float("-inf"))
            new_max = tl.maximum(running_max, tile_max)
            # a block every one of whose rows lies negligible_bits below its running maximum is skipped
            if tl.max((tile_max - new_max > -negligible_bits).to(tl.int32), axis=0) > 0:  # a difference: see update
                rescale = tl.exp2(running_max - new_max)
                weights = tl.exp2(logits - new_max[:, None])
                normaliser = normaliser * rescale + tl.sum(weights, axis=1)
                weighted = weighted * rescale[:, None]
                for c in tl.static_range(CHANNELS):
                    value = tl.load(value_ptr + entries * CHANNELS + c, mask=entry_ok, other=0.0)
                    weighted += tl.where(channel[None, :] == c, tl.sum(weights * value[None, :], axis=1)[:, None], 0.0)
                running_max = new_max
        out = split * num_rows + rows
        tl.store(max_ptr + out, running_max, mask=row_ok)
        tl.store(normaliser_ptr + out, normaliser, mask=row_ok)
        tl.store(best_ptr + out, best, mask=row_ok)
        tl.store(best_entry_ptr + out, best_entry, mask=row_ok)
        tl.store(weighted_ptr + out[:, None] * CHANNELS + channel[None, :], weighted,
                 mask=row_ok[:, None] & (channel[None, :] < CHANNELS))

    return posterior_fold
