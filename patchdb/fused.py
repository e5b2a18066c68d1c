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

KEY_LATTICE = 255.0
"""Keys k with k * KEY_LATTICE integral (to float32 rounding) are multiplied as those integers, exactly."""

MAX_LATTICE_INTEGER = 2048
"""float16 holds every integer up to this magnitude exactly."""

FLOAT16_MAX = 65504.0

BLOCK_ROWS = 128
"""Queries per program, for sizing the grid (the tuned configurations use 64 or 128)."""

TUNED_CONFIGS = ((128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 2))
"""(queries, entries per block, warps, pipeline stages) that Triton's autotuner times at each patch length."""

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

    parts: (K, depth) float16: the keys as lattice integers (depth D, padded), or their high and low float16
        parts side by side (2D, padded). The kernel adds two products per key: the query's high part against
        parts, and its second operand (the low part; beside zeros when the keys are split) against parts.
    scale: what the products are multiplied by (1 / KEY_LATTICE for lattice keys, else 1).
    dim: D, the keys' length.
    """

    parts: torch.Tensor
    split: bool
    scale: float
    dim: int

    @classmethod
    def from_keys(cls, keys: torch.Tensor) -> "FusedKeys":
        """keys: (K, D) float32 or float64."""
        scaled = keys * KEY_LATTICE
        integers = scaled.round()
        if bool((scaled - integers).abs().max() <= 1e-3) and bool(integers.abs().max() <= MAX_LATTICE_INTEGER):
            return cls(_padded([integers.half()]), False, 1.0 / KEY_LATTICE, keys.shape[1])
        if bool(keys.abs().max() > FLOAT16_MAX):
            raise PatchdbError("the fused exact method needs keys below 65504 in magnitude; use --exact-method products")
        high = keys.half()
        return cls(_padded([high, (keys - high.to(keys.dtype)).half()]), True, 1.0, keys.shape[1])

    def queries(self, queries: torch.Tensor) -> torch.Tensor:
        """(2, Q, depth) float16: the two query operands for queries (Q, D) (q_hi.k_hi + q_lo.k_hi + q_hi.k_lo when split)."""
        high = queries.half()
        low = (queries - high.to(queries.dtype)).half()
        if self.split:
            first, second = _padded([high, high]), _padded([low, torch.zeros_like(low)])
        else:
            first, second = _padded([high]), _padded([low])
        return torch.stack([first, second])


def _padded(columns: list[torch.Tensor]) -> torch.Tensor:
    """The columns side by side, zero-padded to a multiple of the kernel's depth block, float16."""
    width = sum(column.shape[1] for column in columns)
    depth = _depth_block(width)
    out = torch.zeros(columns[0].shape[0], math.ceil(width / depth) * depth, dtype=torch.float16, device=columns[0].device)
    start = 0
    for column in columns:
        out[:, start:start + column.shape[1]] = column
        start += column.shape[1]
    return out


def _depth_block(width: int) -> int:
    return 32 if width <= 64 else 64


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
    log2_e = 1.0 / math.log(2.0)
    signal, noise_variance = math.sqrt(alpha_bar), 1.0 - alpha_bar
    operand = keys.queries(queries)
    norm_bias = ((-alpha_bar * log2_e / (2 * noise_variance)) * squared_norms).float().contiguous()
    merged = log_multiplicity is not None
    log_multiplicity_bits = (log_multiplicity * log2_e).float().contiguous() if merged else norm_bias
    values = values.float().contiguous()
    num_rows, num_entries = operand.shape[1], keys.parts.shape[0]
    channels = values.shape[1]
    row_blocks = math.ceil(num_rows / BLOCK_ROWS)
    processors = torch.cuda.get_device_properties(queries.device).multi_processor_count if queries.is_cuda else 1
    splits = max(1, min(math.ceil(PROGRAMS_PER_PROCESSOR * processors / row_blocks), math.ceil(num_entries / (4 * BLOCK_ROWS))))
    entries_per_split = math.ceil(math.ceil(num_entries / splits) / BLOCK_ROWS) * BLOCK_ROWS
    splits = math.ceil(num_entries / entries_per_split)
    float32 = dict(dtype=torch.float32, device=queries.device)
    split_max = torch.empty(splits, num_rows, **float32)
    split_normaliser = torch.empty(splits, num_rows, **float32)
    split_weighted = torch.empty(splits, num_rows, channels, **float32)
    split_best = torch.empty(splits, num_rows, **float32)
    split_best_entry = torch.empty(splits, num_rows, dtype=torch.int64, device=queries.device)
    _kernel()[lambda meta: (math.ceil(num_rows / meta["BLOCK_ROWS"]), splits)](
        operand, keys.parts, norm_bias, log_multiplicity_bits, values,
        split_max, split_normaliser, split_weighted, split_best, split_best_entry,
        num_rows, num_entries, keys.parts.shape[1], operand[1].storage_offset(), entries_per_split, signal * log2_e / noise_variance * keys.scale,
        negligible_bits, CHANNELS=channels, CHANNELS_PADDED=max(2, 1 << (channels - 1).bit_length()), MERGED=merged,
        BLOCK_DEPTH=_depth_block(keys.parts.shape[1]))

    def merge(max_bits, normaliser, weighted_sum, best_bits, best_entry):
        new_max = torch.maximum(max_bits, split_max.amax(dim=0))
        rescale = torch.exp2(max_bits - new_max).to(max_bits.dtype)
        split_rescale = torch.exp2(split_max - new_max.float())
        normaliser.mul_(rescale).add_((split_normaliser * split_rescale).sum(dim=0).to(normaliser.dtype))
        weighted_sum.mul_(rescale[:, None]).add_((split_weighted * split_rescale[:, :, None]).sum(dim=0).to(weighted_sum.dtype))
        max_bits.copy_(new_max)
        best, split = split_best.max(dim=0)
        improved = best.to(best_bits.dtype) > best_bits
        best_bits.copy_(torch.where(improved, best.to(best_bits.dtype), best_bits))
        best_entry.copy_(torch.where(improved, split_best_entry.gather(0, split[None]).squeeze(0), best_entry))

    accumulator.fold_in_place(merge, sources)


@functools.cache
def _kernel():
    """The Triton kernel, defined on first use (Triton is imported only then). It compiles per patch length
    and configuration; the autotuner times TUNED_CONFIGS at the first call of each patch length (the
    interpreter, for tests, takes the first only)."""
    import triton
    import triton.language as tl

    tuned = TUNED_CONFIGS[:1] if os.environ.get("TRITON_INTERPRET") == "1" else TUNED_CONFIGS
    configs = [triton.Config({"BLOCK_ROWS": rows, "BLOCK_ENTRIES": entries}, num_warps=warps, num_stages=stages)
               for rows, entries, warps, stages in tuned]

    @triton.autotune(configs=configs, key=["depth"])
    @triton.jit(do_not_specialize=["num_rows", "num_entries"])
    def posterior_fold(query_ptr, key_ptr, norm_bias_ptr, log_multiplicity_ptr, value_ptr,
                       max_ptr, normaliser_ptr, weighted_ptr, best_ptr, best_entry_ptr,
                       num_rows, num_entries, depth, low_offset, entries_per_split, scale, negligible_bits,
                       CHANNELS: tl.constexpr, CHANNELS_PADDED: tl.constexpr, MERGED: tl.constexpr,
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
        query_rows = query_ptr + rows.to(tl.int64)[:, None] * depth
        for start in range(first, stop, BLOCK_ENTRIES):
            entries = start + tl.arange(0, BLOCK_ENTRIES)
            entry_ok = entries < stop
            key_columns = key_ptr + entries.to(tl.int64)[None, :] * depth
            products = tl.zeros([BLOCK_ROWS, BLOCK_ENTRIES], tl.float32)
            for offset in range(0, depth, BLOCK_DEPTH):
                key = tl.load(key_columns + offset + depth_offsets[:, None], mask=entry_ok[None, :], other=0.0)
                high = tl.load(query_rows + offset + depth_offsets[None, :], mask=row_ok[:, None], other=0.0)
                products = tl.dot(high, key, products)
                low = tl.load(query_rows + low_offset + offset + depth_offsets[None, :], mask=row_ok[:, None], other=0.0)
                products = tl.dot(low, key, products)
            logits = products * scale + tl.load(norm_bias_ptr + entries, mask=entry_ok, other=float("-inf"))[None, :]
            tile_max = tl.where(row_ok, tl.max(logits, axis=1), float("-inf"))
            improved = tile_max > best
            if tl.max(improved.to(tl.int32), axis=0) > 0:
                best_entry = tl.where(improved, (start + tl.argmax(logits, axis=1)).to(tl.int64), best_entry)
                best = tl.where(improved, tile_max, best)
            if MERGED:
                logits += tl.load(log_multiplicity_ptr + entries, mask=entry_ok, other=0.0)[None, :]
                tile_max = tl.where(row_ok, tl.max(logits, axis=1), float("-inf"))
            new_max = tl.maximum(running_max, tile_max)
            # a tile every one of whose rows lies negligible_bits below its running maximum is skipped
            if tl.max((tile_max > new_max - negligible_bits).to(tl.int32), axis=0) > 0:
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
        tl.store(weighted_ptr + out[:, None] * CHANNELS + channel[None, :], weighted, mask=row_ok[:, None] & (channel[None, :] < CHANNELS))

    return posterior_fold
