"""The engine every machine shares: a posterior-weighted mean over a dictionary, streamed in chunks.

For a query q (a noisy patch, or a whole noisy image) at time t with s = sqrt(alpha_bar) and
beta = 1 - alpha_bar, dictionary entry k (a training patch, or image) has posterior logit

    logit_k = -||q - s k||^2 / (2 beta) + log m_k
            = (s <q, k> - s^2 ||k||^2 / 2) / beta + log m_k  + (a term constant in k),

where m_k is the multiplicity of k when identical entries were merged (exact). The engine returns
the softmax-weighted mean of the entries' values (the centre pixel of a patch, or a whole image),
the entry with the largest weight and that weight. It never holds more than one chunk of logits:
a streaming log-sum-exp keeps a running maximum, normaliser and weighted sum per query.

Backends: ``ExactBackend`` scans the whole dictionary with large matrix products.
"""

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

DEFAULT_MEMORY_BUDGET = 4 * 1024**3
"""Bytes that one machine may use for cached dictionaries plus one chunk of logits (default 4 GiB)."""

LOGIT_CHUNK_BYTES = 2 * 1024**2
"""Bytes of logits per chunk: small enough that the passes over a chunk stay in cache, large enough for efficient matrix products."""

LOG_WEIGHT_FLOOR = -80.0
"""Log-weights relative to the running maximum are floored here before exp (see SoftmaxAccumulator.update)."""

MERGE_WORTHWHILE = 0.9
"""Duplicates are merged only when that leaves at most this fraction of the entries (else the copy costs more than it saves)."""

NEGLIGIBLE_LOG_WEIGHT = -60.0
"""A chunk whose every log-weight lies this far below a query's running maximum is skipped for that query."""


@dataclass
class PosteriorSummary:
    """What the engine reports for Q queries.

    mean: (Q, V) posterior mean of the values.
    best_source: (Q, 3) int64 source (training image, row, column) of the entry of largest weight.
    best_weight: (Q,) its posterior weight, in (0, 1].
    """

    mean: torch.Tensor
    best_source: torch.Tensor
    best_weight: torch.Tensor


class SoftmaxAccumulator:
    """Streaming softmax-weighted mean over chunks of logits (an online log-sum-exp)."""

    def __init__(self, num_queries: int, value_dim: int, dtype: torch.dtype, device: torch.device):
        self.running_max = torch.full((num_queries,), -math.inf, dtype=dtype, device=device)
        self.normaliser = torch.zeros(num_queries, dtype=dtype, device=device)
        self.weighted_sum = torch.zeros(num_queries, value_dim, dtype=dtype, device=device)
        self.best_logit = torch.full((num_queries,), -math.inf, dtype=dtype, device=device)
        self.best_source = torch.zeros(num_queries, 3, dtype=torch.int64, device=device)

    def update(self, logits: torch.Tensor, contract: Callable, sources: torch.Tensor,
               log_multiplicity: torch.Tensor | None = None, row_groups: torch.Tensor | None = None) -> None:
        """Fold in one chunk.

        logits: (Q, n) logits of one copy of each of n dictionary entries; overwritten.
        contract: contract(weights, rows) maps the unnormalised weights (R, n) of rows (an index
            tensor, or slice(None) for all Q) to their weighted sums of values (R, V).
        sources: (n, 3) int64 provenance of the n entries; with row_groups, (G, n, 3), one set per group.
        log_multiplicity: (n,) log of how many identical entries each one stands for, or None.
        row_groups: (Q,) int64 group of each row, when rows of different groups share the chunk.
        The dominant entry is the one copy of largest weight (the nearest patch), so it does not
        depend on whether duplicates were merged.
        """
        chunk_max = logits.amax(dim=1)
        improved = torch.nonzero(chunk_max > self.best_logit).squeeze(1)
        if improved.numel():  # argmax is slow on CPU: only where the best entry changes
            self.best_logit[improved] = chunk_max[improved]
            entries = logits[improved].argmax(dim=1)
            self.best_source[improved] = sources[entries] if row_groups is None else sources[row_groups[improved], entries]
        if log_multiplicity is not None:
            logits.add_(log_multiplicity)
            chunk_max = chunk_max + log_multiplicity.max()  # an upper bound is as good a shift as the maximum
        new_max = torch.maximum(self.running_max, chunk_max)
        live = chunk_max > new_max + NEGLIGIBLE_LOG_WEIGHT
        if not bool(live.all()):
            # Rows for which every entry of this chunk weighs < e^-60 of the row's maximum keep their
            # state: the mass skipped is below 1e-26 per entry (the engine's only truncation).
            rows = torch.nonzero(live).squeeze(1)
            self._fold_rows(rows, logits[rows], new_max[rows], contract)
            return
        self._fold_rows(slice(None), logits, new_max, contract)

    def _fold_rows(self, rows, logits: torch.Tensor, new_max: torch.Tensor, contract) -> None:
        rescale = torch.exp(self.running_max[rows] - new_max)
        # exp of very negative numbers yields subnormals, which are ~15x slower on x86; entries
        # below the floor weigh < 1e-34 of the dominant one, so flooring them changes nothing.
        weights = logits.sub_(new_max[:, None]).clamp_(min=LOG_WEIGHT_FLOOR).exp_()
        self.normaliser[rows] = self.normaliser[rows] * rescale + weights.sum(dim=1)
        self.weighted_sum[rows] = self.weighted_sum[rows] * rescale[:, None] + contract(weights, rows)
        self.running_max[rows] = new_max

    def summary(self) -> PosteriorSummary:
        """The posterior mean, dominant entry and its weight for every query."""
        mean = self.weighted_sum / self.normaliser[:, None]
        best_weight = torch.exp(self.best_logit - self.running_max) / self.normaliser
        return PosteriorSummary(mean, self.best_source, best_weight)


@dataclass
class PatchDictionary:
    """The training entries one dictionary group compares against, ready for the engine.

    Stacked form: G groups of one pixel each (LS, bbELS corners) share one dictionary object whose
    tensors all have a leading group dimension G (keys (G, K, D), ...), never merged.

    keys: (K, D) entries (patches or images), in the machine's dtype and device.
    values: (K, V) what each entry contributes to the mean (its centre pixel, or the whole image).
    squared_norms: (K,) ||key||^2.
    log_multiplicity: (K,) log of how many identical entries each row stands for (0 when unmerged).
    sources: (K, 3) int64 (training image index, centre row, centre column) of each entry
        (of its first occurrence when merged).
    """

    keys: torch.Tensor
    values: torch.Tensor
    squared_norms: torch.Tensor
    log_multiplicity: torch.Tensor
    sources: torch.Tensor
    merged: bool = False

    @classmethod
    def from_entries(cls, keys: torch.Tensor, values: torch.Tensor, sources: torch.Tensor, merge_duplicates: bool = True):
        """Build a dictionary, merging identical keys (their multiplicity joins the logit, which is exact)."""
        log_multiplicity = torch.zeros(keys.shape[0], dtype=keys.dtype, device=keys.device)
        merged = False
        if merge_duplicates and keys.shape[0] > 1:
            first, counts = unique_rows(keys)
            if first.shape[0] <= MERGE_WORTHWHILE * keys.shape[0]:
                keys, values, sources = keys[first], values[first], sources[first]
                log_multiplicity, merged = counts.to(keys.dtype).log(), True
        return cls(keys, values, torch.linalg.vector_norm(keys, dim=-1).square(), log_multiplicity, sources, merged)

    @classmethod
    def stacked(cls, keys: torch.Tensor, values: torch.Tensor, sources: torch.Tensor):
        """A stacked dictionary: keys (G, K, D), values (G, K, V), sources (G, K, 3)."""
        zeros = torch.zeros(keys.shape[:2], dtype=keys.dtype, device=keys.device)
        return cls(keys, values, torch.linalg.vector_norm(keys, dim=-1).square(), zeros, sources, False)

    def __len__(self) -> int:
        """Number of entries (per group, for a stacked dictionary)."""
        return self.keys.shape[-2]

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.numel() for t in (self.keys, self.values, self.squared_norms, self.log_multiplicity, self.sources))


def unique_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the first occurrence of each group of identical rows of rows (K, D), in order, and
    the groups' sizes.

    Rows are grouped by hash (_row_hashes) and every merge is verified exactly: a row that shares a
    hash with a different row (a collision) is kept on its own, so no two different rows ever merge.
    """
    _, group, counts = torch.unique(_row_hashes(rows), return_inverse=True, return_counts=True)
    first = _first_occurrences(group, counts.shape[0])
    duplicates = torch.nonzero(first[group] != torch.arange(rows.shape[0], device=rows.device)).squeeze(1)
    collided = duplicates[(rows[duplicates] != rows[first[group[duplicates]]]).any(dim=1)]
    if collided.numel():
        group = group.clone()
        group[collided] = counts.shape[0] + torch.arange(collided.shape[0], device=rows.device)
        _, group, counts = torch.unique(group, return_inverse=True, return_counts=True)
        first = _first_occurrences(group, counts.shape[0])
    order = torch.argsort(first)
    return first[order], counts[order]


def _row_hashes(rows: torch.Tensor) -> torch.Tensor:
    """(K,) int64 hashes of the rows: the bits of their projections on two fixed random directions.

    Identical rows project alike (-0.0 and 0.0 included), so they always share a hash.
    """
    generator = torch.Generator().manual_seed(0x5EED)
    directions = torch.rand(rows.shape[1], 2, generator=generator, dtype=torch.float64).to(device=rows.device, dtype=rows.dtype)
    projections = (rows @ directions) + 0.0  # (K, 2); + 0.0 folds -0.0 into 0.0
    if projections.dtype == torch.float64:
        return projections[:, 0].view(torch.int64) ^ (projections[:, 1].view(torch.int64) * 0x9E3779B1)
    bits = projections.to(torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return (bits[:, 0] << 32) | bits[:, 1]


def _first_occurrences(inverse: torch.Tensor, num_unique: int) -> torch.Tensor:
    positions = torch.arange(inverse.shape[0], device=inverse.device)
    first = torch.full((num_unique,), inverse.shape[0], dtype=torch.int64, device=inverse.device)
    return first.scatter_reduce(0, inverse, positions, reduce="amin")


class ExactBackend:
    """Scan every dictionary entry: logits by matrix products, chunk by chunk, into a streaming softmax."""

    def __init__(self, chunk_bytes: int = LOGIT_CHUNK_BYTES):
        self.chunk_bytes = chunk_bytes

    def fold(self, accumulator: SoftmaxAccumulator, queries: torch.Tensor, dictionary: PatchDictionary, alpha_bar: float) -> None:
        """Fold every entry of dictionary into accumulator at noise level alpha_bar.

        queries: (Q, D); for a stacked dictionary (G, B, D), accumulated as rows g * B + b.
        """
        signal = math.sqrt(alpha_bar)
        noise_variance = 1.0 - alpha_bar
        stacked = dictionary.keys.ndim == 3
        row_groups = torch.arange(queries.shape[0], device=queries.device).repeat_interleave(queries.shape[1]) if stacked else None
        num_rows = row_groups.shape[0] if stacked else queries.shape[0]
        for start, stop in chunk_ranges(len(dictionary), num_rows, queries.element_size(), self.chunk_bytes):
            bias = (-alpha_bar / (2 * noise_variance)) * dictionary.squared_norms[..., start:stop]
            values = dictionary.values[..., start:stop, :]
            if stacked:
                logits = torch.baddbmm(bias[:, None, :], queries, dictionary.keys[:, start:stop].transpose(1, 2),
                                       alpha=signal / noise_variance).reshape(num_rows, -1)

                def contract(weights, rows, values=values):
                    if isinstance(rows, slice):
                        return torch.bmm(weights.reshape(values.shape[0], -1, weights.shape[1]), values).reshape(weights.shape[0], -1)
                    return torch.einsum("rn,rnv->rv", weights, values[row_groups[rows]])
            else:
                logits = torch.addmm(bias[None, :], queries, dictionary.keys[start:stop].T, alpha=signal / noise_variance)

                def contract(weights, rows, values=values):
                    return weights @ values
            log_multiplicity = dictionary.log_multiplicity[start:stop] if dictionary.merged else None
            accumulator.update(logits, contract, dictionary.sources[..., start:stop, :], log_multiplicity, row_groups)

    def summarize(self, queries: torch.Tensor, parts: Iterable[PatchDictionary], alpha_bar: float) -> PosteriorSummary:
        """Posterior summary for queries (Q, D) against the union of dictionary parts."""
        accumulator = None
        for dictionary in parts:
            if accumulator is None:
                accumulator = SoftmaxAccumulator(queries.shape[0], dictionary.values.shape[-1], queries.dtype, queries.device)
            self.fold(accumulator, queries, dictionary, alpha_bar)
        if accumulator is None:
            raise ValueError("the dictionary is empty")
        return accumulator.summary()


def chunk_ranges(num_entries: int, num_queries: int, itemsize: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """(start, stop) ranges of dictionary entries so that one chunk of logits takes about chunk_bytes."""
    step = max(256, chunk_bytes // max(1, num_queries * itemsize))
    for start in range(0, num_entries, step):
        yield start, min(start + step, num_entries)
