"""The engine every machine shares: a posterior-weighted mean over a dictionary, streamed in chunks.

For a query q (a noisy patch, or a whole noisy image) at time t with s = sqrt(alpha_bar) and
beta = 1 - alpha_bar, dictionary entry k (a training patch, or image) has posterior logit

    logit_k = -||q - s k||^2 / (2 beta) + log m_k
            = (s <q, k> - s^2 ||k||^2 / 2) / beta + log m_k  + (a term constant in k),

where m_k is the multiplicity of k when identical entries were merged (exact). The engine returns
the softmax-weighted mean of the entries' values (the centre pixel of a patch, or a whole image),
the entry with the largest weight and that weight. It never holds more than one chunk of logits:
a streaming log-sum-exp keeps a running maximum, normaliser and weighted sum per query.

Backends: ``ExactBackend`` computes every entry's logit, by one of three methods: large matrix
products, skipping the entries that a bound proves negligible (below e^-60 of a query's maximum: see
EntryBlocks); for the patch machines on a CPU, sliding-window correlations of the images
themselves (patchdb.windows), which cost O(1) per logit instead of O(P^2); or, on a GPU, one Triton
kernel that scores and folds without writing the logits out (patchdb.fused).
"""

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from patchdb import fused, windows
from patchdb.duplicates import unique_rows
from patchdb.errors import PatchdbError

LN_2 = math.log(2.0)
LOG2_E = 1.0 / LN_2

DEFAULT_MEMORY_BUDGET = 4 * 1024**3
"""Bytes that one machine may use for cached dictionaries plus one chunk of logits (default 4 GiB)."""

LOGIT_CHUNK_BYTES = 2 * 1024**2
"""Bytes of logits per chunk on a CPU: small enough that the passes over a chunk stay in cache, large enough for
efficient matrix products."""

GPU_LOGIT_CHUNK_BYTES = 256 * 1024**2
"""Bytes of logits per chunk on a GPU: there a chunk must be large enough to fill the device, and each
chunk costs kernel launches and a few host synchronisations."""

LOG_WEIGHT_FLOOR = -80.0
"""Log-weights relative to the running maximum are floored here before exp, as subnormals are slow on x86."""

MIN_BLOCKED_ENTRIES = 65536
"""Only dictionaries at least this large are sorted into blocks for pruning."""

BLOCK_PRUNING_MIN_ALPHA_BAR = 0.65
"""Block pruning pays off from here on (t <= 0.4 on the cosine schedule); earlier the posteriors are
too broad for the bounds to skip enough blocks to repay their cost and the sort (benchmarks/RESULTS.md)."""

SEED_STRIDE = 8
"""With block pruning, each query first scores every SEED_STRIDE-th entry of its most promising block:
a lower bound on its maximum (for the bounds to prune against) at an eighth of the cost of the whole block."""

MERGE_WORTHWHILE = 0.9
"""Duplicates are merged only when that leaves at most this fraction of the entries (else the copy costs more than it saves)."""

NEGLIGIBLE_LOG_WEIGHT = -60.0
"""A chunk whose every log-weight lies this far below a query's running maximum is skipped for that query."""

SQUARED_REGION_ROWS = 1024
"""PatchDictionary.stacked squares region keys this many entries at a time (a few MiB, not a copy of all the regions)."""


@dataclass
class PosteriorSummary:
    """What the engine reports for Q queries.

    mean: (Q, V) posterior mean of the values.
    best_source: (Q, 3) int64 source (training image, row, column) of the entry of largest weight (for the
        equivariant machine's shifted images: training image, row shift, column shift).
    best_weight: (Q,) its posterior weight, in (0, 1].
    """

    mean: torch.Tensor
    best_source: torch.Tensor
    best_weight: torch.Tensor


class SoftmaxAccumulator:
    """Streaming softmax-weighted mean over chunks of logits (an online log-sum-exp).

    The state is kept in bits (log2 units), so that the weights come from exp2, several times
    faster than exp on CPUs. running_max, normaliser, weighted_sum and best_logit read it in nats:
    normaliser = sum_k exp(logit_k - running_max), and likewise weighted_sum.
    """

    def __init__(self, num_queries: int, value_dim: int, dtype: torch.dtype, device: torch.device):
        self._max_bits = torch.full((num_queries,), -math.inf, dtype=dtype, device=device)
        self._normaliser = torch.zeros(num_queries, dtype=dtype, device=device)  # relative to 2^_max_bits
        self._weighted_sum = torch.zeros(num_queries, value_dim, dtype=dtype, device=device)
        self._best_bits = torch.full((num_queries,), -math.inf, dtype=dtype, device=device)
        self.best_source = torch.zeros(num_queries, 3, dtype=torch.int64, device=device)

    @property
    def running_max(self) -> torch.Tensor:
        """(Q,) float64 the shift of normaliser and weighted_sum, in nats (at least every logit seen so far, up to
        rounding). float64: near t = 0 float32 logits reach 1e9 bits, where float32 nats would round by up to 128."""
        return self._max_bits.double() * LN_2

    @property
    def normaliser(self) -> torch.Tensor:
        """(Q,) sum over the entries seen of exp(logit - running_max)."""
        return self._normaliser

    @property
    def weighted_sum(self) -> torch.Tensor:
        """(Q, V) sum over the entries seen of exp(logit - running_max) * value."""
        return self._weighted_sum

    @property
    def best_logit(self) -> torch.Tensor:
        """(Q,) the largest logit seen (one copy, without its multiplicity), in nats."""
        return self._best_bits * LN_2

    def update(self, logits: torch.Tensor, contract: Callable, sources: torch.Tensor,
               log_multiplicity: torch.Tensor | None = None, row_groups: torch.Tensor | None = None,
               rows: torch.Tensor | None = None, bits: bool = False) -> None:
        """Fold in one chunk.

        logits: (R, n) logits of one copy of each of n dictionary entries; overwritten.
        contract: contract(weights, rows) maps the unnormalised weights (R', n) of accumulator rows
            (an index tensor, or slice(None) for all) to their weighted sums of values (R', V).
        sources: (n, 3) int64 provenance of the n entries; with row_groups, (G, n, 3), one set per group.
        log_multiplicity: log of how many identical entries each one stands for, (n,), (R, n) or (R, 1), or None.
        row_groups: (Q,) int64 group of each accumulator row, when rows of different groups share the chunk.
        rows: (R,) accumulator rows of the logits' rows; None when the logits cover all Q rows.
        bits: the logits are in bits (nats times log2(e), as _logits(..., bits=True) computes them
            at no cost); nats otherwise, which costs one more pass over the chunk.
        The dominant entry is the one copy of largest weight (the nearest patch), so it does not
        depend on whether duplicates were merged.
        """
        if not bits:
            logits.mul_(LOG2_E)
        state_rows = slice(None) if rows is None else rows
        chunk_max = logits.amax(dim=1)
        self._track_best(logits, chunk_max, sources, rows, row_groups)
        if log_multiplicity is not None:
            log_multiplicity = log_multiplicity * LOG2_E
            logits.add_(log_multiplicity)
            chunk_max = chunk_max + log_multiplicity.max()  # an upper bound is as good a shift as the maximum
        new_max = torch.maximum(self._max_bits[state_rows], chunk_max)
        # the difference, not new_max + NEGLIGIBLE: near t = 0 float32 logits reach 1e9 bits, where adding -86.6 rounds
        # to nothing and a row's own maximum would not count as live
        live = chunk_max - new_max > NEGLIGIBLE_LOG_WEIGHT * LOG2_E
        if not bool(live.all()):
            # Rows for which every entry of this chunk weighs < e^-60 of the row's maximum (or that it leaves out: logits
            # of -inf) keep their state: the mass skipped is below 1e-26 per entry (the engine's only truncation).
            kept = torch.nonzero(live).squeeze(1)
            if kept.numel():  # contract need not take zero rows (an FFT of none fails)
                self._fold_rows(kept if rows is None else rows[kept], logits[kept], new_max[kept], contract)
            return
        self._fold_rows(state_rows, logits, new_max, contract)

    def fold_sums(self, sums: torch.Tensor, shift_bits: torch.Tensor, logits: torch.Tensor, chunk_max: torch.Tensor,
                  sources: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Fold in a chunk whose weights were summed elsewhere: sums (R, V + 1), over its entries, of 2^(logit - shift_bits)
        times (value, 1), shift_bits (R,) in bits (-inf for a row the chunk leaves out); the logits' row maxima chunk_max
        (R,) in bits (-inf where left out) and the logits (R, n), or any increasing function of them such as their
        weights, are read for the dominant entry only (the rows' argmax); rows as in update."""
        self._track_best(logits, chunk_max, sources, rows)
        self._add_sums(slice(None) if rows is None else rows, shift_bits[None], sums[None, :, -1], sums[None, :, :-1])

    def _track_best(self, logits: torch.Tensor, chunk_max: torch.Tensor, sources: torch.Tensor, rows: torch.Tensor | None,
                    row_groups: torch.Tensor | None = None) -> None:
        """Take the best logit and source from a chunk's logits (R, n) in bits, whose row maxima are chunk_max (R,), where
        they beat the rows' (sources, row_groups and rows as in update)."""
        improved = torch.nonzero(chunk_max > self._best_bits[slice(None) if rows is None else rows]).squeeze(1)
        if improved.numel():  # argmax is slow on CPU: only where the best entry changes
            target = improved if rows is None else rows[improved]
            self._best_bits[target] = chunk_max[improved]
            entries = logits[improved].argmax(dim=1)
            self.best_source[target] = sources[entries] if row_groups is None else sources[row_groups[target], entries]

    def _add_sums(self, rows, part_max: torch.Tensor, part_normaliser: torch.Tensor, part_weighted: torch.Tensor) -> None:
        """Add S parts' normalisers (S, R) and weighted sums (S, R, V), relative to 2^part_max (S, R), to rows (an index
        tensor, or slice(None) for all)."""
        dtype, max_bits = self._max_bits.dtype, self._max_bits[rows]
        new_max = torch.maximum(max_bits, part_max.amax(dim=0).to(dtype))
        # a row that neither this state nor a part has seen stays at -inf, and 2^(-inf - -inf) scales its zeros by 0
        rescale = torch.exp2(max_bits - new_max).nan_to_num_(0.0)
        part_rescale = torch.exp2(part_max - new_max.to(part_max.dtype)).nan_to_num_(0.0)
        self._normaliser[rows] = self._normaliser[rows] * rescale + (part_normaliser * part_rescale).sum(dim=0).to(dtype)
        self._weighted_sum[rows] = (self._weighted_sum[rows] * rescale[:, None]
                                    + (part_weighted * part_rescale[:, :, None]).sum(dim=0).to(dtype))
        self._max_bits[rows] = new_max

    def _fold_rows(self, rows, logits: torch.Tensor, new_max: torch.Tensor, contract) -> None:
        """Fold logits (R, n), in bits and overwritten, into rows, whose new maximum is new_max (R,)."""
        rescale = torch.exp2(self._max_bits[rows] - new_max)
        # exp2 of very negative numbers yields subnormals, which are slow on x86; entries below the
        # floor weigh < 1e-34 of the dominant one, so flooring them changes nothing.
        weights = logits.sub_(new_max[:, None]).clamp_(min=LOG_WEIGHT_FLOOR * LOG2_E).exp2_()
        self._normaliser[rows] = self._normaliser[rows] * rescale + weights.sum(dim=1)
        self._weighted_sum[rows] = self._weighted_sum[rows] * rescale[:, None] + contract(weights, rows)
        self._max_bits[rows] = new_max

    def fold_in_place(self, fold: Callable, sources: torch.Tensor) -> None:
        """Let a compiled kernel fold entries into the state: fold(max_bits, normaliser, weighted_sum, best_bits, best_entry)
        updates the first four (Q,), (Q,), (Q, V), (Q,) in place in this class's convention (bits; any shift at least
        the largest logit) and sets best_entry (Q,) int64, -1 on entry, to the entry (a row of sources (n, 3)) that
        raised a row's best logit (sources: integers of any dtype)."""
        best_entry = torch.full(self._best_bits.shape, -1, dtype=torch.int64, device=self._best_bits.device)
        fold(self._max_bits, self._normaliser, self._weighted_sum, self._best_bits, best_entry)
        changed = torch.nonzero(best_entry >= 0).squeeze(1)
        self.best_source[changed] = sources[best_entry[changed]].to(self.best_source.dtype)

    def merge(self, parts: tuple[torch.Tensor, ...], sources: torch.Tensor) -> None:
        """Fold in S states computed apart, stacked, in fold_in_place's convention: maximum (S, Q), normaliser (S, Q),
        weighted sum (S, Q, V), best logit (S, Q) in bits and best entry (S, Q) int64, a row of sources (n, 3) wherever
        that part's best logit is finite."""
        part_max, part_normaliser, part_weighted, part_best, part_best_entry = parts
        dtype = self._max_bits.dtype
        self._add_sums(slice(None), part_max, part_normaliser, part_weighted)
        best, part = part_best.max(dim=0)
        improved = torch.nonzero(best.to(dtype) > self._best_bits).squeeze(1)
        self._best_bits[improved] = best[improved].to(dtype)
        self.best_source[improved] = sources[part_best_entry.gather(0, part[None])[0][improved]].to(self.best_source.dtype)

    def summary(self) -> PosteriorSummary:
        """The posterior mean, dominant entry and its weight for every query."""
        mean = self._weighted_sum / self._normaliser[:, None]
        best_weight = torch.exp2(self._best_bits - self._max_bits) / self._normaliser
        return PosteriorSummary(mean, self.best_source, best_weight)


@dataclass
class EntryBlocks:
    """Consecutive runs of block_size dictionary entries and the box each spans along a few directions.

    directions: (D, r) orthonormal. low, high: (num_blocks, r) extreme projections of the block's keys.
    log_multiplicity: (num_blocks,) the largest log multiplicity in each block.
    Since projecting on orthonormal directions never lengthens a vector, ||q - s k||^2 is at least
    the squared distance from q's projection to the block's box scaled by s: an upper bound on the
    logit of every entry of the block, computed without touching the entries.
    """

    block_size: int
    directions: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    log_multiplicity: torch.Tensor

    def logit_bounds(self, queries: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """(Q, num_blocks) upper bounds on (s <q, k> - s^2 ||k||^2 / 2) / beta + log m over each block."""
        signal = math.sqrt(alpha_bar)
        projections = (queries @ self.directions)[:, None, :]  # (Q, 1, r)
        gaps = (signal * self.low - projections).clamp_min(0) + (projections - signal * self.high).clamp_min(0)
        squared_norms = queries.square().sum(dim=1, keepdim=True)
        return (squared_norms - gaps.square().sum(dim=-1)) / (2 * (1 - alpha_bar)) + self.log_multiplicity


@dataclass
class RegionKeys:
    """The keys of a stacked dictionary kept as regions of the training images (patchdb.patches.same_location_regions):
    key (g, k) = regions[k, embedding[g]]. regions: (K, A); embedding: (G, D) int64; tiles: per tile
    (members (T,) int64 groups, first, stop) the groups whose keys lie in regions[:, first:stop].

    Neighbouring pixels' patches overlap, so one region per tile and entry replaces a copy of every
    pixel's patch, and the logits are one matrix product per tile (_logits).
    """

    regions: torch.Tensor
    embedding: torch.Tensor
    tiles: list[tuple[torch.Tensor, int, int]]
    ndim = 3

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.embedding.shape[0], self.regions.shape[0], self.embedding.shape[1])

    def embed(self, queries: torch.Tensor, members: torch.Tensor, first: int, stop: int) -> torch.Tensor:
        """queries (G, B, D) of the tile's members placed in its region: (T * B, stop - first), zeros elsewhere."""
        tile_queries = queries[members]
        positions = (self.embedding[members] - first)[:, None, :].expand(-1, tile_queries.shape[1], -1)
        embedded = tile_queries.new_zeros(*tile_queries.shape[:2], stop - first).scatter_(2, positions, tile_queries)
        return embedded.reshape(-1, stop - first)


ENTRY_BLOCK_SIZE, ENTRY_BLOCK_DIRECTIONS = 1024, 2
"""PatchDictionary.sort_into_blocks: entries per block, and the principal directions the blocks' boxes span."""


def principal_directions(sample: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean (D,) and the count top principal directions (D, count), largest first, of sample (S, D), in float64."""
    sample = sample.double()
    mean = sample.mean(dim=0)
    centred = sample - mean
    _, eigenvectors = torch.linalg.eigh(centred.T @ centred)
    return mean, eigenvectors[:, -min(count, sample.shape[1]):].flip(1)


@dataclass
class PatchDictionary:
    """The training entries one dictionary group compares against, ready for the engine.

    Stacked form: G groups of one pixel each (LS, bbELS corners) share one dictionary object whose
    tensors all have a leading group dimension G (keys (G, K, D), ...), never merged.

    keys: (K, D) entries (patches or images), in the machine's dtype and device; or RegionKeys (stacked); or, once
        the fused exact method has scored the dictionary, fused.FusedKeys (its float16 operand, which replaces them).
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
    blocks: "EntryBlocks | None" = None

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
    def stacked(cls, keys: "torch.Tensor | RegionKeys", values: torch.Tensor, sources: torch.Tensor):
        """A stacked dictionary: keys (G, K, D), or as regions; values (G, K, V), sources (G, K, 3)."""
        if isinstance(keys, RegionKeys):
            squared_norms = torch.empty(keys.shape[:2], dtype=values.dtype, device=values.device)
            for members, first, stop in keys.tiles:
                window = torch.zeros(len(members), stop - first, dtype=values.dtype, device=values.device)
                window.scatter_(1, keys.embedding[members] - first, 1.0)
                for start in range(0, keys.regions.shape[0], SQUARED_REGION_ROWS):  # temporaries the allocator reuses
                    rows = slice(start, start + SQUARED_REGION_ROWS)
                    squared_norms[members, rows] = window @ keys.regions[rows, first:stop].square().T
        else:
            squared_norms = torch.linalg.vector_norm(keys, dim=-1).square()
        zeros = torch.zeros(squared_norms.shape, dtype=values.dtype, device=values.device)
        return cls(keys, values, squared_norms, zeros, sources, False)

    def sort_into_blocks(self) -> None:
        """Reorder the entries (in place, once) into blocks that are compact along the keys' top
        principal directions, and record each block's bounding box (see EntryBlocks). The posterior
        does not depend on the order; among identical copies, another one may become the reported source."""
        if self.blocks is not None:
            return
        count = len(self)
        generator = torch.Generator().manual_seed(0)
        sample = self.keys[torch.randperm(count, generator=generator)[:65536].to(self.keys.device)]
        block_size, num_directions = ENTRY_BLOCK_SIZE, ENTRY_BLOCK_DIRECTIONS
        directions = principal_directions(sample, num_directions)[1].to(self.keys.dtype)
        projections = self.keys @ directions
        # slabs along the first direction, sorted along the second within each slab: blocks are near-square cells
        num_slabs = max(1, math.isqrt(math.ceil(count / block_size)))
        rank = torch.empty(count, dtype=torch.int64, device=self.keys.device)
        rank[torch.argsort(projections[:, 0])] = torch.arange(count, device=self.keys.device)
        slab = rank * num_slabs // count
        order = torch.argsort(projections[:, 1])
        order = order[torch.argsort(slab[order], stable=True)]
        projections = projections[order]
        block = torch.arange(count, device=self.keys.device) // block_size
        num_blocks = int(block[-1]) + 1
        low = torch.full((num_blocks, num_directions), math.inf, dtype=projections.dtype, device=projections.device)
        high = torch.full_like(low, -math.inf)
        index = block[:, None].expand(-1, num_directions)
        low = low.scatter_reduce(0, index, projections, reduce="amin")
        high = high.scatter_reduce(0, index, projections, reduce="amax")
        log_multiplicity = self.log_multiplicity[order]
        block_log_multiplicity = torch.zeros(num_blocks, dtype=projections.dtype, device=projections.device)
        block_log_multiplicity = block_log_multiplicity.scatter_reduce(0, block, log_multiplicity, reduce="amax",
                                                                       include_self=False)
        self.keys, self.values, self.squared_norms = self.keys[order], self.values[order], self.squared_norms[order]
        self.log_multiplicity, self.sources = log_multiplicity, self.sources[order]
        self.blocks = EntryBlocks(block_size, directions, low, high, block_log_multiplicity)

    def __len__(self) -> int:
        """Number of entries (per group, for a stacked dictionary)."""
        return self.keys.shape[-2]

    @property
    def nbytes(self) -> int:
        keys = (self.keys.regions if isinstance(self.keys, RegionKeys)
                else self.keys.parts if isinstance(self.keys, fused.FusedKeys) else self.keys)
        return sum(t.element_size() * t.numel()
                   for t in (keys, self.values, self.squared_norms, self.log_multiplicity, self.sources))


EXACT_METHODS = ("auto", "windows", "products", "fused")
"""How the exact backend scores: 'windows' (patch machines: patchdb.windows, sliding-window correlations, compiled,
CPU only), 'products' (matrix products of copied entries, any device), 'fused' (patchdb.fused: product and softmax in
one Triton kernel, CUDA GPUs), 'auto' (windows on a CPU, fused on a GPU in float32 where Triton is installed, else products)."""


def check_exact_method(method: str) -> None:
    """A clear error unless method is one of EXACT_METHODS."""
    if method not in EXACT_METHODS:
        raise PatchdbError(f"unknown exact method {method!r}; choose one of {', '.join(EXACT_METHODS)}")


class ExactBackend:
    """Scan every dictionary entry into a streaming softmax: logits by matrix products, chunk by chunk,
    (the patch machines on a CPU, method 'windows') by sliding windows over the images (patchdb.windows), or
    (plain dictionaries on a GPU, method 'fused') by one kernel that scores and folds (patchdb.fused).

    With block pruning, a large dictionary at low noise (alpha_bar >= BLOCK_PRUNING_MIN_ALPHA_BAR) is
    sorted into bounded blocks once, and each query skips the blocks whose bound proves them
    negligible (below e^-60 of its running maximum): the same posterior, computed faster late in
    sampling, where each pixel's posterior is concentrated on few patches.

    method (one of EXACT_METHODS): the patch machines ask uses_windows whether to score by sliding
    windows, which need no dictionaries, instead of folding their dictionaries here.
    """

    def __init__(self, chunk_bytes: int | None = None, block_pruning: bool = True, method: str = "auto"):
        check_exact_method(method)
        self.chunk_bytes = chunk_bytes
        self.block_pruning = block_pruning
        self.method = method

    def uses_windows(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether patch machines on device and dtype are scored by sliding windows (method 'windows', or 'auto'
        where possible)."""
        if self.method in ("products", "fused"):
            return False
        usable = windows.available(device, dtype)
        if self.method == "windows" and not usable:
            reason = ("patchdb's compiled kernel is missing: reinstall with a C compiler present (pip install -e .)"
                      if not windows.compiled() else f"it runs on the CPU in float32 or float64, not {device.type} {dtype}")
            raise PatchdbError(f"the exact method 'windows' cannot be used: {reason}; or choose the method 'products'")
        return usable

    def _chunk_bytes(self, device: torch.device) -> int:
        return self.chunk_bytes or logit_chunk_bytes(device)

    def plain_method(self, device: torch.device, dtype: torch.dtype) -> str:
        """How plain (unstacked) dictionaries are scored on device in dtype: 'fused' (method 'fused', or 'auto' on a GPU in
        float32 where Triton is installed) or 'products'; the patch machines ask uses_windows first."""
        if self.method == "fused":
            if not fused.available(device):
                raise PatchdbError("the exact method 'fused' needs a CUDA GPU and Triton (which torch's CUDA builds bring); "
                                   "choose the method 'products' or 'auto'")
            return "fused"
        automatic = self.method == "auto" and device.type == "cuda" and dtype == torch.float32 and fused.available(device)
        return "fused" if automatic else "products"

    def fuses(self, queries: torch.Tensor, dictionary: PatchDictionary) -> bool:
        """Whether dictionary is scored by the fused kernel: a plain one, where plain_method says so."""
        plain = (isinstance(dictionary.keys, fused.FusedKeys)
                 or (isinstance(dictionary.keys, torch.Tensor) and dictionary.keys.ndim == 2))
        return plain and self.plain_method(queries.device, queries.dtype) == "fused"

    def fold(self, accumulator: SoftmaxAccumulator, queries: torch.Tensor, dictionary: PatchDictionary, alpha_bar: float) -> None:
        """Fold every entry of dictionary into accumulator at noise level alpha_bar.

        queries: (Q, D); for a stacked dictionary (G, B, D), accumulated as rows g * B + b.
        A dictionary with blocks skips, per query, whole blocks that the bound proves negligible.
        """
        if self.fuses(queries, dictionary):
            if not isinstance(dictionary.keys, fused.FusedKeys):
                # the float keys are freed: a dictionary this backend fuses is never scored otherwise (half the memory)
                dictionary.keys = fused.FusedKeys.from_keys(dictionary.keys)
            fused.fold(accumulator, queries, dictionary.keys, dictionary.squared_norms,
                       dictionary.log_multiplicity if dictionary.merged else None, dictionary.values, dictionary.sources,
                       alpha_bar, -NEGLIGIBLE_LOG_WEIGHT * LOG2_E)
            return
        if (self.block_pruning and dictionary.keys.ndim == 2 and len(dictionary) >= MIN_BLOCKED_ENTRIES
                and alpha_bar >= BLOCK_PRUNING_MIN_ALPHA_BAR):
            dictionary.sort_into_blocks()
            self._fold_blocked(accumulator, queries, dictionary, alpha_bar)
            return
        stacked = dictionary.keys.ndim == 3
        row_groups = (torch.arange(queries.shape[0], device=queries.device).repeat_interleave(queries.shape[1])
                      if stacked else None)
        num_rows = row_groups.shape[0] if stacked else queries.shape[0]
        for start, stop in chunk_ranges(len(dictionary), num_rows, queries.element_size(), self._chunk_bytes(queries.device)):
            if stacked:
                logits = _logits(queries, dictionary, start, stop, alpha_bar, bits=True).reshape(num_rows, -1)
                values = dictionary.values[:, start:stop]

                def contract(weights, rows, values=values):
                    if isinstance(rows, slice):
                        return torch.bmm(weights.reshape(values.shape[0], -1, weights.shape[1]),
                                         values).reshape(weights.shape[0], -1)
                    return torch.einsum("rn,rnv->rv", weights, values[row_groups[rows]])
            else:
                logits = _logits(queries, dictionary, start, stop, alpha_bar, bits=True)
                contract = _plain_contract(dictionary.values[start:stop])
            log_multiplicity = dictionary.log_multiplicity[start:stop] if dictionary.merged else None
            accumulator.update(logits, contract, dictionary.sources[..., start:stop, :], log_multiplicity, row_groups, bits=True)

    def _fold_blocked(self, accumulator, queries, dictionary, alpha_bar) -> None:
        """Seed every query with its most promising block, then scan the rest in chunks, computing
        a chunk only for the queries whose bound says it may hold a non-negligible entry."""
        blocks = dictionary.blocks
        bounds = blocks.logit_bounds(queries, alpha_bar)  # (Q, num_blocks)
        num_entries, block_size = len(dictionary), blocks.block_size
        seed_block = bounds.argmax(dim=1)
        seed_offsets = torch.arange(0, block_size, SEED_STRIDE, device=queries.device)
        seed_entries = seed_block[:, None] * block_size + seed_offsets
        beyond_end = seed_entries >= num_entries  # the last block may be short
        seed_entries = seed_entries.clamp_max(num_entries - 1)
        signal, noise_variance = math.sqrt(alpha_bar), 1.0 - alpha_bar
        seed_keys = dictionary.keys[seed_entries]  # (Q, block, D)
        seed_logits = (signal * torch.bmm(seed_keys, queries[:, :, None]).squeeze(2)
                       - (alpha_bar / 2) * dictionary.squared_norms[seed_entries]) * (LOG2_E / noise_variance)
        seed_logits[beyond_end] = -math.inf  # weight e^-80 relative after the floor: nothing
        seed_values = dictionary.values[seed_entries]
        accumulator.update(seed_logits, lambda weights, rows: torch.einsum("rn,rnv->rv", weights, seed_values[rows]),
                           dictionary.sources[seed_entries],
                           dictionary.log_multiplicity[seed_entries] if dictionary.merged else None,
                           row_groups=torch.arange(queries.shape[0], device=queries.device), bits=True)
        step_blocks = max(1, next(chunk_ranges(num_entries, queries.shape[0], queries.element_size(),
                                               self._chunk_bytes(queries.device)))[1] // block_size)
        for first_block in range(0, bounds.shape[1], step_blocks):
            last_block = min(first_block + step_blocks, bounds.shape[1])
            start, stop = first_block * block_size, min(last_block * block_size, num_entries)
            needed = bounds[:, first_block:last_block].amax(dim=1) > accumulator.running_max + NEGLIGIBLE_LOG_WEIGHT
            rows = torch.nonzero(needed).squeeze(1)
            if not rows.numel():
                continue
            all_rows = rows.numel() == queries.shape[0]
            logits = _logits(queries if all_rows else queries[rows], dictionary, start, stop, alpha_bar, bits=True)
            # entries of a row's seed block were counted already (masked: weight e^-80 relative, nothing)
            seeded = torch.nonzero((seed_block[rows] >= first_block) & (seed_block[rows] < last_block)).squeeze(1)
            if seeded.numel():
                columns = (seed_block[rows[seeded]] - first_block)[:, None] * block_size + seed_offsets
                # seed entries beyond a short last block mask the block's first entry again, a seed entry too
                columns = torch.where(columns < stop - start, columns, columns[:, :1])
                logits[seeded[:, None], columns] = -math.inf
            log_multiplicity = dictionary.log_multiplicity[start:stop] if dictionary.merged else None
            accumulator.update(logits, _plain_contract(dictionary.values[start:stop]), dictionary.sources[start:stop],
                               log_multiplicity, rows=None if all_rows else rows, bits=True)

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


def _logits(queries: torch.Tensor, dictionary: PatchDictionary, start: int, stop: int, alpha_bar: float,
            bits: bool = False) -> torch.Tensor:
    """Logits (Q, n) of one copy of entries start..stop (or (G, B, n) for a stacked dictionary), up to a
    per-query constant; in nats, or in bits (times log2(e), folded into the product's scale)."""
    signal, noise_variance = math.sqrt(alpha_bar), 1.0 - alpha_bar
    unit = LOG2_E if bits else 1.0
    bias = (-alpha_bar * unit / (2 * noise_variance)) * dictionary.squared_norms[..., start:stop]
    if isinstance(dictionary.keys, RegionKeys):
        keys = dictionary.keys
        logits = bias[:, None, :].repeat(1, queries.shape[1], 1)  # (G, B, n)
        for members, first, stop_column in keys.tiles:
            products = keys.embed(queries, members, first, stop_column) @ keys.regions[start:stop, first:stop_column].T
            logits[members] += (signal * unit / noise_variance) * products.view(len(members), queries.shape[1], -1)
        return logits
    if dictionary.keys.ndim == 3:
        return torch.baddbmm(bias[:, None, :], queries, dictionary.keys[:, start:stop].transpose(1, 2),
                             alpha=signal * unit / noise_variance)
    return torch.addmm(bias[None, :], queries, dictionary.keys[start:stop].T, alpha=signal * unit / noise_variance)


def _plain_contract(values: torch.Tensor) -> Callable:
    return lambda weights, rows: weights @ values


def logit_chunk_bytes(device: torch.device) -> int:
    """The default size of one chunk of logits on device (LOGIT_CHUNK_BYTES, or GPU_LOGIT_CHUNK_BYTES)."""
    return LOGIT_CHUNK_BYTES if device.type == "cpu" else GPU_LOGIT_CHUNK_BYTES


def chunk_ranges(num_entries: int, num_queries: int, itemsize: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """(start, stop) ranges of dictionary entries so that one chunk of logits takes about chunk_bytes."""
    step = max(256, chunk_bytes // max(1, num_queries * itemsize))
    for start in range(0, num_entries, step):
        yield start, min(start + step, num_entries)
