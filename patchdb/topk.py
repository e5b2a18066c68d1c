"""The top-k backend: a certified truncated softmax over an indexed dictionary, with a fallback per query.

For a query q (a pixel's noisy patch) and a clustered dictionary (patchdb.index), every cluster c
has an upper bound b_c on its members' logits (triangle inequality) and so a bound
M_c = b_c + log(summed multiplicities) on its share of the posterior's normaliser. The backend

1. orders the clusters by the distance from q / sqrt(alpha_bar) to their centroids, as an IVF
   search probes them, and scores each cluster's medoid (its entry nearest the cluster's k-means centre): their
   summed weight is a lower bound Z on the query's normaliser;
2. takes the shortest prefix of that order whose complement's mass bound
   logsumexp(M_c over the rest) is at most tol * Z: if that prefix holds at most ``topk`` entries,
   the query is *certified*: its prefix is scored exactly and the neglected posterior mass is
   provably below tol, so its posterior mean is off by at most tol times the spread of the values.
   Otherwise its nearest clusters up to ``topk`` entries are scored, and the query is certified
   after all if their now exactly known mass proves the rest below tol;
3. otherwise (a broad posterior) falls back, as ``fallback`` says:
   - 'exact': every cluster that is not provably negligible (the exact backend's e^-60 rule);
   - 'none': the best clusters up to ``topk`` entries only, a plain truncated softmax (*truncated*);
   - 'estimate': those best clusters exactly, plus a uniform random sample of the remaining
     patches reweighted by (patches left) / (sampled patches left): an unbiased estimate of the
     tail's share of the normaliser and of the weighted sum (*estimated*). Where the standard error
     of the estimated posterior mean (delta method, in the values' units) exceeds ``estimate_error``, the query visits
     DEEPENING_FACTOR times as many nearest entries and is estimated again over the smaller tail,
     at most DEEPENING_ROUNDS times; the last estimate is kept. Each round's estimate is unbiased, but those kept are
     not quite: an estimate is accepted on a standard error taken from its own draws, and draws that miss a
     dominant patch also look precise (benchmarks/RESULTS.md, "The estimator's misses");
   - 'auto': as 'estimate', but a query whose last estimate still exceeds ``estimate_error`` is exact.
   A fold's draws are a function of the backend's seed, the dictionary, alpha_bar and the deepening round only, not
   of the other queries: a pixel's estimate is the same whichever batch it is sampled in (a sample regenerated alone
   by its seed is the same image).

Scoring is in one of three ways (``scoring``):
- 'compiled' (the CPU's default where patchdb._clusters was compiled, float32): a kernel takes each
  visited cluster in turn, reads its entries' patches where they lie (the in-memory keys, or the
  training images themselves for gathered entries) and scores them against the queries that visit
  it, folding the weights into the queries' running softmax as it goes: nothing is copied or masked;
- 'runs' (the CPU's default otherwise), by the engine's matrix products: runs of consecutive
  clusters (clusters with nearby numbers lie near each other) against every query that visits one
  of them, masking the clusters a query does not visit: few wasted products, many small ones;
- 'gathered' (a GPU's default), by matrix products too: each query's visited entries gathered into
  one padded row, and all rows of a block scored by one batched product: a few large operations per
  fold, whatever the number of clusters, at the price of copying the entries (queries whose entries
  do not fit one chunk are scored in runs).

With ``exact_from_patch_size``, the steps at that patch size and above are not searched at all: the
patch machine hands them to the exact backend's sliding windows (where every pixel would fall back).
"""

import hashlib
import math
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from patchdb.engine import (LN_2, LOG2_E, LOG_WEIGHT_FLOOR, NEGLIGIBLE_LOG_WEIGHT, ExactBackend, PatchDictionary,
                            SoftmaxAccumulator, _logits, logit_chunk_bytes)
from patchdb.errors import PatchdbError
from patchdb.index import ClusteredDictionary, EntryClusters, GatheredEntries, balanced_ranges, cluster_of_entries, take_entries

try:
    from patchdb import _clusters
except ImportError:  # the extension was not compiled (no C compiler when installing): matrix products score the clusters
    _clusters = None

PATHS = ("exact", "certified", "estimated", "truncated")
"""Path codes: the path a query took is PATHS[code]."""
FALLBACKS = ("auto", "exact", "estimate", "none")
ESTIMATING_FALLBACKS = ("estimate", "auto")
"""The fallbacks whose estimator reads estimate_samples and estimate_error."""
SCORINGS = ("compiled", "runs", "gathered")

DEFAULT_TOPK = None
"""None: 'auto' (auto_topk): the larger of MIN_AUTO_TOPK and AUTO_TOPK_CLUSTERS mean clusters of each dictionary, at
patches of AUTO_TOPK_DIMENSION numbers, and in inverse proportion to the patches' numbers at other patch sizes."""
MIN_AUTO_TOPK = 4096
AUTO_TOPK_CLUSTERS = 8
"""Clusters are capped in number (patchdb.index.MAX_CLUSTERS), so they grow with the training set (about
1,000 entries at 6,000 images, 10,000 at 60,000): a fixed topk visits fewer of them as the set grows,
and at 60,000 images 4,096 entries (one cluster) reached r 0.995 where 65,536 reached 0.9986
(benchmarks/RESULTS.md, issue 4; eight clusters' worth there: 0.9979 on the worse of 2 seeds, 0.9990
with the deepening of poor estimates, DEEPENING_FACTOR)."""
AUTO_TOPK_DIMENSION = 121
"""'auto' is a budget of multiply-adds rather than of entries (11 x 11 patches of one channel get AUTO_TOPK_CLUSTERS
mean clusters): an entry of a 3x3 patch takes a thirteenth of the multiply-adds of one of 11x11, and at the late,
sharp steps, whose small patches' errors reach the sample unrepaired, a dominant patch just past the budget goes unseen
by the estimator (benchmarks/RESULTS.md, "A budget of multiply-adds")."""
DEFAULT_TOL = 1e-2
DEFAULT_FALLBACK = "estimate"
DEFAULT_ESTIMATE_SAMPLES = 4096
DEFAULT_ESTIMATE_ERROR = 0.02
"""The defaults are the fast setting measured in benchmarks/RESULTS.md (issue 4). The estimate error is a
standard error in pixel units (images in [-1, 1]): a typical pixel's estimate, with 4,096 samples, is
off by 0.01 or less, and a fifth to a third of the pixels exceed 0.02 in the middle of the trajectory."""

MAX_TOPK = 2**40
"""More entries than any dictionary holds (60,000 images give some 10^8): larger counts would overflow the searches' integers."""
MAX_ESTIMATE_SAMPLES = 2**20
"""256 times the default: the draws' patches are copied once per fold (1.2 GB at this many for P = 17)."""
ESTIMATE_LOGIT_BYTES = 2**30
"""The estimator's logits of a block of rows against all its draws take at most this many bytes (at the default draws
no fold of up to 65,536 pixels is split)."""

DEEPENING_FACTOR = 4
DEEPENING_ROUNDS = 2
"""An estimate whose standard error exceeds estimate_error is redone over a tail shrunk by visiting
DEEPENING_FACTOR times as many nearest entries, up to DEEPENING_ROUNDS times (so up to 16 times topk)."""

PROBE_MARGIN = 4
"""Clusters ordered per query: PROBE_MARGIN times as many as topk entries fill at the mean cluster size."""

MASS_ROUNDING = 1e-6
"""Added, relative to itself, to every sum of clusters' mass bounds: the bounds, relative to the largest, are float32
(each rounded by less than 3e-7 of itself by the exponential) and summed directly (never as a difference), in float32
with the bound on its rounding (_summed_masses) or in float64."""

MASS_HEADROOM = 40.0
"""The clusters' mass bounds are kept as float32 relative to e^MASS_HEADROOM times the normaliser's lower bound (the
medoids'): a mass that float32 rounds to 0 is then below e^-63 of the normaliser."""

THREAD_MULTIPLY_ADDS = 2**27
"""The compiled scoring takes one thread per this many multiply-adds ((row, entry) pairs times the patches' dimension;
some 20 ms of work), up to torch's threads: on less, starting the threads and merging their states costs about what
they save (benchmarks/bench_clusters.py)."""

RUN_ENTRIES = 2048
"""Consecutive clusters are scored together in runs of about this many entries (and the rows in
blocks that keep each run's logits within the engine's chunk size, patchdb.engine.logit_chunk_bytes)."""


class TopKBackend:
    """Certified truncated softmax over ClusteredDictionary parts; other parts go to the exact backend.

    topk: most entries a query may score exactly and still count as certified (or truncated); None
        for each dictionary's own (DEFAULT_TOPK);
    tol: the certified bound on the neglected posterior mass; fallback: one of FALLBACKS;
    estimate_samples: entries in the estimator's uniform sample; estimate_error: the largest standard error of
    an estimated posterior mean (in the values' units: pixels in [-1, 1]) accepted without visiting more
    entries (module docstring); seed: with the dictionary, alpha_bar and the round, what the estimator's draws are
    drawn from (module docstring);
    scoring: one of SCORINGS, or None for the default (default_scoring);
    exact_from_patch_size: patch sizes from which on a whole step is left to the exact backend's sliding windows
        (patchdb.machines.PatchMachine; a CPU): where the posterior is broad and the patches large, every pixel
        would fall back anyway, and the windows cost O(1) per patch where scoring a visited patch costs O(P^2).
        None: never.
    """

    def __init__(self, topk: int | None = DEFAULT_TOPK, tol: float = DEFAULT_TOL, fallback: str = DEFAULT_FALLBACK,
                 estimate_samples: int = DEFAULT_ESTIMATE_SAMPLES, estimate_error: float = DEFAULT_ESTIMATE_ERROR,
                 seed: int = 0, exact: ExactBackend | None = None, scoring: str | None = None,
                 exact_from_patch_size: int | None = None):
        if topk is not None and not 1 <= topk <= MAX_TOPK:
            raise PatchdbError(f"--topk must lie in 1..{MAX_TOPK} (2^40), got {topk}")
        if not 0.0 <= tol < 1.0:
            raise PatchdbError(f"--tol must lie in [0, 1), got {tol}")
        if fallback not in FALLBACKS:
            raise PatchdbError(f"unknown fallback {fallback!r}; choose one of {', '.join(FALLBACKS)}")
        if not 1 <= estimate_samples <= MAX_ESTIMATE_SAMPLES:
            raise PatchdbError(f"--estimate-samples must lie in 1..{MAX_ESTIMATE_SAMPLES}, got {estimate_samples}")
        if not 0 < estimate_error < math.inf:
            raise PatchdbError(f"--estimate-error must be a positive finite number, got {estimate_error}")
        if scoring not in (None, *SCORINGS):
            raise PatchdbError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
        if scoring == "compiled" and _clusters is None:
            raise PatchdbError("scoring 'compiled' needs patchdb._clusters, which was not compiled: reinstall patchdb "
                               "with a C compiler (`make setup`), or choose scoring 'runs'")
        if exact_from_patch_size is not None and exact_from_patch_size < 1:
            raise PatchdbError(f"--exact-from-patch-size must be a patch size (at least 1), got {exact_from_patch_size}")
        self.scoring, self.exact_from_patch_size = scoring, exact_from_patch_size
        self.topk, self.tol, self.fallback = topk, tol, fallback
        self.estimate_samples, self.estimate_error = estimate_samples, estimate_error
        self.seed = seed
        self.exact = exact or ExactBackend()
        self._report = _new_report()

    def leaves_to_exact(self, patch_size: int) -> bool:
        """Whether a step at this patch size is left to the exact backend (exact_from_patch_size)."""
        return self.exact_from_patch_size is not None and patch_size >= self.exact_from_patch_size

    def count_exact(self, pixels: int, entries: int, seconds: float) -> None:
        """Report a step that the exact backend scored: pixels on the exact path, entries scored in all, its seconds."""
        self._count(torch.full((pixels,), PATHS.index("exact"), dtype=torch.uint8), entries)
        self._report["seconds"]["rescore"] += seconds

    def reads_patches_in_place(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this backend's scoring reads the clustered entries' patches where they lie in the training images
        ('compiled'), so that the store need not copy them into memory (patchdb.store.PatchStore.dictionaries)."""
        return self.scoring_on(device, dtype) == "compiled"

    def scoring_on(self, device: torch.device, dtype: torch.dtype) -> str:
        """The scoring used for queries on device in dtype: the one asked for, or the default there."""
        return self.scoring or default_scoring(device, dtype)

    def fold(self, accumulator: SoftmaxAccumulator, queries: torch.Tensor, dictionary, alpha_bar: float) -> torch.Tensor:
        """Fold dictionary into accumulator for queries (Q, D); returns each query's path code (Q,) uint8."""
        if not isinstance(dictionary, ClusteredDictionary):
            start = time.perf_counter()
            self.exact.fold(accumulator, queries, dictionary, alpha_bar)
            self._report["seconds"]["rescore"] += time.perf_counter() - start
            path = torch.full((queries.shape[:-1].numel(),), PATHS.index("exact"), dtype=torch.uint8, device=queries.device)
            self._count(path.cpu(), path.numel() * len(dictionary))
            return path
        entries, clusters = dictionary.entries, dictionary.clusters
        seconds = self._report["seconds"]
        start = time.perf_counter()
        topk = self.topk or auto_topk(len(entries), len(clusters), queries.shape[1])
        plan = self._plan(queries, entries, clusters, alpha_bar, topk)
        seconds["search"] += time.perf_counter() - start

        start = time.perf_counter()
        if topk >= len(entries):  # room for every entry: nothing to truncate, so every query is scored as exact scores it
            plan.path.fill_(PATHS.index("exact"))
            self._count(plan.path.cpu(), self._score(accumulator, queries, dictionary, plan.relevant, alpha_bar))
            seconds["rescore"] += time.perf_counter() - start
            return plan.path
        scored = self._score(accumulator, queries, dictionary, plan.visit, alpha_bar)
        seconds["rescore"] += time.perf_counter() - start
        uncertified = torch.nonzero(~plan.certified).squeeze(1)
        if self.fallback != "exact":
            uncertified = self._certify_scored(accumulator, queries, clusters, alpha_bar, plan, uncertified)
        rejected = uncertified[:0]
        if self.fallback in ("estimate", "auto"):
            rejected, budget = uncertified, topk
            for deepening in range(DEEPENING_ROUNDS + 1):
                last = deepening == DEEPENING_ROUNDS
                start = time.perf_counter()
                rejected, sampled = self._estimate(accumulator, queries, dictionary, plan, rejected, alpha_bar,
                                                   strict=self.fallback == "auto" or not last, deepening=deepening)
                scored += sampled
                seconds["estimate"] += time.perf_counter() - start
                if last or not rejected.numel():
                    break
                start = time.perf_counter()
                self._report["deepenings"] += rejected.numel()
                budget *= DEEPENING_FACTOR
                scored += self._score(accumulator, queries, dictionary, self._deepen(plan, clusters, rejected, budget), alpha_bar)
                seconds["rescore"] += time.perf_counter() - start
                rejected = self._certify_scored(accumulator, queries, clusters, alpha_bar, plan, rejected)
        if rejected.numel():
            start = time.perf_counter()
            tail_visit = torch.zeros_like(plan.visit)
            tail_visit[rejected] = plan.relevant[rejected] & ~plan.visit[rejected]
            scored += self._score(accumulator, queries, dictionary, tail_visit, alpha_bar)
            plan.path[rejected] = PATHS.index("exact")
            seconds["rescore"] += time.perf_counter() - start
        self._count(plan.path.cpu(), scored)
        return plan.path

    def _certify_scored(self, accumulator: SoftmaxAccumulator, queries: torch.Tensor, clusters: EntryClusters,
                        alpha_bar: float, plan: "_Plan", rows: torch.Tensor) -> torch.Tensor:
        """Certify those of rows whose scored clusters now prove the rest below tol; returns the others.

        Once a query's visited clusters are scored, its normaliser is known exactly over them, a
        lower bound usually far above the medoids'; where the unvisited clusters' mass bound lies
        below tol times it, the query is certified after all and needs no fallback. The comparison is
        made in log space: at small t the normaliser lies thousands of nats above the plan's shift.
        """
        if not rows.numel() or self.tol == 0:
            return rows
        log_normaliser = accumulator.running_max[rows] + accumulator.normaliser[rows].double().log()
        # over all rows, in place (the visited clusters' bounds are not needed again): cheaper than copying most rows
        unvisited_mass = _summed_masses(plan.masses.masked_fill_(plan.visit, 0.0))[rows] * (1 + MASS_ROUNDING)
        log_unvisited = unvisited_mass.log() + plan.mass_shift[rows].double()
        # a bound that overflowed float32 relative to the shift (a cluster near the query, unvisited) bounds nothing:
        # the rows that hold one get their unvisited clusters' bounds again, summed in log space
        overflowed = torch.isinf(unvisited_mass)
        if overflowed.any():
            again = rows[overflowed]
            bounds = clusters.search(queries[again], alpha_bar)[1].masked_fill_(plan.visit[again], -math.inf)
            log_unvisited[overflowed] = torch.logsumexp(bounds.double(), dim=1) + math.log1p(MASS_ROUNDING)
        proven = log_unvisited <= math.log(self.tol) + log_normaliser
        plan.certified[rows[proven]] = True
        plan.path[rows[proven]] = PATHS.index("certified")
        return rows[~proven]

    def _deepen(self, plan: "_Plan", clusters: EntryClusters, rows: torch.Tensor, budget: int) -> torch.Tensor:
        """Extend the visits of rows to their nearest clusters up to budget entries; returns the clusters added (Q, C)."""
        nearest = _nearest_clusters(plan.centroid_distances[rows], clusters, budget)
        affordable = (clusters.sizes[nearest].cumsum(dim=1) <= budget).sum(dim=1).clamp_min(1)
        deeper = _first_clusters(nearest, affordable, len(clusters))
        added = torch.zeros_like(plan.visit)
        added[rows] = deeper & ~plan.visit[rows]
        plan.visit |= added
        return added

    def _plan(self, queries, entries, clusters: EntryClusters, alpha_bar: float, topk: int) -> "_Plan":
        """Search the clusters for every query and decide its path (steps 1-3 of the module docstring).

        Only the nearest `probes` clusters are ordered (a partial sort): more could not fit in topk
        entries unless clusters were much smaller than average, and a query that would need more is
        simply not certified.
        """
        centroid_distances, mass_bounds = clusters.search(queries, alpha_bar)  # (Q, C) each
        medoids = take_entries(entries, clusters.medoids)
        medoid_logits = _logits(queries, medoids, 0, len(clusters), alpha_bar, bits=True)
        log_normaliser = _log_sum_exp(medoid_logits.add_(medoids.log_multiplicity * LOG2_E)) * LN_2  # C actual entries
        nearest = _nearest_clusters(centroid_distances, clusters, topk)
        probes = nearest.shape[1]
        # relative to the normaliser's lower bound, not the largest bound: that one can lie hundreds of nats above
        # (a wide cluster around q), and float32 masses relative to it would round neighbouring clusters' to 0;
        # a mass above the headroom overflows to inf, which only keeps the query from being certified
        shift = torch.minimum(mass_bounds.amax(dim=1), log_normaliser + MASS_HEADROOM)[:, None]
        # clusters whose whole mass is below e^-60 of the normaliser are negligible (the exact backend's rule)
        relevant = mass_bounds > (log_normaliser + NEGLIGIBLE_LOG_WEIGHT)[:, None]
        # (Q, C) in [0, 1], in place: a new (Q, C) tensor costs more in page faults than the pass
        masses = mass_bounds.sub_(shift).mul_(LOG2_E).exp2_()
        # the mass bound of the clusters beyond each prefix of the probe order: those never probed, summed with the
        # probed ones beyond the prefix
        probed = masses.gather(1, nearest)
        never_probed = _summed_masses(masses.scatter_(1, nearest, 0.0))[:, None]
        masses.scatter_(1, nearest, probed)
        beyond = probed.double().flip(1).cumsum(dim=1).flip(1)  # (Q, probes): ranks j.. of the probe order
        tail = (never_probed + torch.cat([beyond[:, 1:], torch.zeros_like(beyond[:, :1])], dim=1)) * (1 + MASS_ROUNDING)
        threshold = self.tol * (log_normaliser[:, None] - shift).double().exp()
        within = tail <= threshold
        needed = torch.where(within.any(dim=1), within.to(torch.int8).argmax(dim=1) + 1, probes + 1)  # clusters to visit
        prefix_entries = clusters.sizes[nearest].cumsum(dim=1)  # (Q, probes) entries in ranks 0..j
        certified = (needed <= probes) & (prefix_entries.gather(1, (needed.clamp_max(probes) - 1)[:, None])[:, 0] <= topk)
        affordable = (prefix_entries <= topk).sum(dim=1).clamp_min(1)
        head = torch.where(certified, needed, affordable)
        visit = _first_clusters(nearest, head, len(clusters))
        if self.fallback == "exact":
            visit = torch.where(certified[:, None], visit, relevant)
        path = torch.where(certified, PATHS.index("certified"), PATHS.index(_UNCERTIFIED_PATH[self.fallback])).to(torch.uint8)
        return _Plan(visit, relevant, masses, shift[:, 0], centroid_distances, certified, path)

    def take_report(self) -> dict:
        """Counts since the last call: queries per path, entries scored, deepenings (queries that visited more
        entries after a poor estimate, once per round), seconds in search / rescore / estimate,
        and the standard error of the accepted estimates' posterior means, in the values' units (median, 90th
        percentile and max of the known ones, and the number unknown: rows with one draw in their tail, accepted
        only in the last round; None without estimates)."""
        report, self._report = self._report, _new_report()
        report["paths"] = {PATHS[code]: count for code, count in sorted(report["paths"].items())}
        errors = report.pop("standard_errors")
        report["estimate_standard_error"] = None
        if errors:
            errors = torch.cat(errors)
            known = errors[errors.isfinite()]
            median, p90, largest = (known.quantile(torch.tensor([0.5, 0.9, 1.0], dtype=errors.dtype)).tolist()
                                    if known.numel() else (None, None, None))
            report["estimate_standard_error"] = {"median": median, "p90": p90, "max": largest,
                                                 "unknown": errors.numel() - known.numel()}
        return report

    def _count(self, path: torch.Tensor, scored: int) -> None:
        self._report["paths"].update(Counter(path.tolist()))
        self._report["queries"] += path.numel()
        self._report["entries_scored"] += int(scored)

    def _score(self, accumulator, queries, dictionary: ClusteredDictionary, visit: torch.Tensor, alpha_bar: float) -> int:
        """Score exactly, for each query, the entries of the clusters visit (Q, C) marks; returns the entries scored."""
        entries, clusters = dictionary.entries, dictionary.clusters
        scoring = self.scoring_on(queries.device, queries.dtype)
        if scoring == "compiled":
            return _score_compiled(accumulator, queries, dictionary, visit, alpha_bar)
        if scoring == "runs":
            return self._score_runs(accumulator, queries, entries, clusters, visit, alpha_bar)
        chunk_bytes = logit_chunk_bytes(queries.device)
        counts = (visit * clusters.sizes).sum(dim=1)  # (Q,) entries each query visits
        entry_bytes = queries.shape[1] * queries.element_size()
        fits = counts * entry_bytes <= chunk_bytes
        scored = self._score_gathered(accumulator, queries, entries, clusters, visit, counts, fits, entry_bytes, alpha_bar,
                                      chunk_bytes)
        if not bool(fits.all()):
            scored += self._score_runs(accumulator, queries, entries, clusters, visit & ~fits[:, None], alpha_bar)
        return scored

    def _score_runs(self, accumulator, queries, entries: PatchDictionary | GatheredEntries, clusters: EntryClusters,
                    visit: torch.Tensor, alpha_bar: float) -> int:
        """'runs' scoring (module docstring)."""
        offsets, scored = clusters.offsets.tolist(), 0
        for first, last in _cluster_runs(clusters.sizes, RUN_ENTRIES):
            rows = torch.nonzero(visit[:, first:last].any(dim=1)).squeeze(1)
            if not rows.numel():
                continue
            start, stop = offsets[first], offsets[last]
            run = take_entries(entries, slice(start, stop))
            sizes, member = clusters.sizes[first:last], None
            log_multiplicity = run.log_multiplicity if run.merged else None
            for block in rows.split(max(1, logit_chunk_bytes(queries.device) // ((stop - start) * queries.element_size()))):
                block_visit = visit[block, first:last]
                logits = _logits(queries[block], run, 0, stop - start, alpha_bar)
                if not bool(block_visit.all()):
                    if member is None:
                        member = cluster_of_entries(sizes)
                    logits.masked_fill_(~block_visit[:, member], -math.inf)
                scored += int((block_visit.sum(dim=0) * sizes).sum())  # integer products have no CUDA kernel
                accumulator.update(logits, lambda weights, _, values=run.values: weights @ values, run.sources,
                                   log_multiplicity, rows=block)
        return scored

    def _score_gathered(self, accumulator, queries, entries, clusters: EntryClusters, visit: torch.Tensor, counts: torch.Tensor,
                        fits: torch.Tensor, entry_bytes: int, alpha_bar: float, chunk_bytes: int) -> int:
        """'gathered' scoring (module docstring) of the queries that visit entries and whose entries fit (fits (Q,))."""
        rows = torch.nonzero(fits & (counts > 0)).squeeze(1)
        if not rows.numel():
            return 0
        rows = rows[torch.argsort(counts[rows])]  # rows of similar widths share a block: little padding
        row_bytes = counts[rows] * entry_bytes
        # accumulator row -> row in block
        position = torch.full((queries.shape[0],), -1, dtype=torch.int64, device=queries.device)
        start = 0
        for end in _block_ends(row_bytes.tolist(), chunk_bytes):
            block = rows[start:end]
            start = end
            index, valid = _visited_entries(visit[block], clusters, counts[block])
            width = index.shape[1]
            flat = take_entries(entries, index.flatten())
            padded = PatchDictionary(flat.keys.view(len(block), width, -1), flat.values.view(len(block), width, -1),
                                     flat.squared_norms.view(len(block), width), flat.log_multiplicity.view(len(block), width),
                                     flat.sources.view(len(block), width, 3), flat.merged)
            logits = _logits(queries[block][:, None, :], padded, 0, width, alpha_bar)[:, 0].masked_fill_(~valid, -math.inf)
            position[block] = torch.arange(len(block), device=block.device)

            def contract(weights, target, values=padded.values):
                return torch.einsum("rn,rnv->rv", weights, values[position[target]])

            accumulator.update(logits, contract, padded.sources, padded.log_multiplicity if padded.merged else None,
                               row_groups=position, rows=block)
        return int(counts[rows].sum())

    def _estimate(self, accumulator, queries, dictionary: ClusteredDictionary, plan: "_Plan", rows: torch.Tensor,
                  alpha_bar: float, strict: bool, deepening: int) -> tuple[torch.Tensor, int]:
        """Fold an estimate of the clusters that rows did not visit into the accumulator.

        One sample of the dictionary's patches, uniform over all patches (so an entry is drawn in
        proportion to its multiplicity, with replacement), is shared by all rows; for each row, the
        draws that fall in its unvisited clusters are a uniform sample of their patches, and each
        stands for (patches in them) / (draws in them) patches. Returns the rows whose estimate was
        rejected (no draw in their unvisited clusters or, when strict, a standard error of the estimated
        posterior mean above estimate_error) and the entries scored. The rows are estimated in blocks whose
        logits against the draws take at most ESTIMATE_LOGIT_BYTES.
        """
        counts, clusters = dictionary.patch_counts, dictionary.clusters
        patches = torch.randint(counts.total, (self.estimate_samples,),
                                generator=self._draw_generator(dictionary, alpha_bar, deepening))
        draws = counts.entries_of(patches.sort().values).to(rows.device)
        draw_cluster = torch.searchsorted(clusters.offsets, draws, right=True) - 1
        draws_in = torch.bincount(draw_cluster, minlength=len(clusters))  # (C,), each cluster's draws consecutive
        sample = take_entries(dictionary.entries, draws)
        block = max(1, ESTIMATE_LOGIT_BYTES // (len(draws) * queries.element_size()))
        rejected = [part[self._estimate_rows(accumulator, queries, dictionary, plan, part, alpha_bar, strict, sample,
                                             draws_in)]
                    for part in rows.split(block)]
        return torch.cat(rejected), rows.numel() * len(draws)

    def _estimate_rows(self, accumulator, queries, dictionary: ClusteredDictionary, plan: "_Plan", rows: torch.Tensor,
                       alpha_bar: float, strict: bool, sample: PatchDictionary, draws_in: torch.Tensor) -> torch.Tensor:
        """_estimate for rows (R,) with the draws sample (m entries, in the order of their clusters) and the number
        drawn from each cluster draws_in (C,); returns the positions in rows of the rejected ones."""
        num_draws = len(sample)
        # the visited clusters as (row, cluster) pairs, a few per row: the tail is everything else, so the draws and
        # patches in it are totals less the visited ones (in integers) and (R, C) masks are not needed
        pair_rows, pair_clusters = torch.nonzero(plan.visit[rows]).unbind(1)
        pair_draws = draws_in[pair_clusters]
        drawn = num_draws - torch.zeros_like(rows).index_add_(0, pair_rows, pair_draws)
        visited_patches = torch.zeros_like(rows).index_add_(0, pair_rows, dictionary.cluster_patches[pair_clusters])
        tail_patches = (dictionary.patch_counts.total - visited_patches).double()
        logits = _logits(queries[rows], sample, 0, num_draws, alpha_bar, bits=True)
        draw_of = cluster_of_entries(pair_draws)  # (n,) the pair of each visited draw
        first_draw = (draws_in.cumsum(0) - draws_in)[pair_clusters][draw_of]
        rank = torch.arange(len(draw_of), device=draw_of.device) - (pair_draws.cumsum(0) - pair_draws)[draw_of]
        logits.view(-1).index_fill_(0, pair_rows[draw_of] * num_draws + first_draw + rank, -math.inf)
        shift, chunk_max, sums, standard_error = self._tail_estimate(accumulator, rows, logits, sample.values, drawn,
                                                                     tail_patches)
        accept = drawn > 0
        if strict:
            accept &= standard_error <= self.estimate_error
        kept, rejected = torch.nonzero(accept).squeeze(1), torch.nonzero(~accept).squeeze(1)
        if kept.numel():
            self._report["standard_errors"].append(standard_error[kept].cpu())
            # each draw stands for tail_patches / drawn patches (its own multiplicity is already in the sampling); the
            # rejected rows are left out by a shift of -inf
            shift_bits = (shift.double() + (tail_patches / drawn.clamp_min(1)).log2()).index_fill_(0, rejected, -math.inf)
            # logits now hold the squared weights (_tail_estimate), whose row argmax is the logits'
            accumulator.fold_sums(sums, shift_bits, logits, chunk_max.index_fill_(0, rejected, -math.inf), sample.sources,
                                  rows=rows)
        return rejected

    def _draw_generator(self, dictionary: ClusteredDictionary, alpha_bar: float, deepening: int) -> torch.Generator:
        """The generator of a fold's draws, from the seed and what identifies the fold whatever the batch: the
        dictionary (its patches, entries and clusters), the noise level (repr: exact) and the round."""
        identity = (self.seed, dictionary.patch_counts.total, len(dictionary.entries), len(dictionary.clusters),
                    float(alpha_bar), deepening)
        digest = hashlib.blake2b(repr(identity).encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)

    @staticmethod
    def _tail_estimate(accumulator, rows: torch.Tensor, logits: torch.Tensor, values: torch.Tensor, drawn: torch.Tensor,
                       tail_patches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The draws' sums and the estimate's standard error for rows (R,), from the logits (R, m) in bits of the m
        draws (-inf outside each row's tail), their values (m, V), the draws in each row's tail drawn (R,) and the
        patches there tail_patches (R,) float64.

        Returns shift (R,) in bits, the logits' row maxima (R,), the sums (R, V + 1) float64 of the weights
        w_i = 2^(logit_i - shift) times (value_i, 1) (what the accumulator folds, SoftmaxAccumulator.fold_sums), and
        the standard error (R,) of each row's estimated posterior mean (the largest over the value channels), in the
        values' units: by the delta method, tail_patches * sd(w_i (v_i - mean)) / sqrt(drawn) / normaliser over the
        draws i in the row's tail. The logits are overwritten by the squared weights, an increasing function of them
        with the same row argmax (the dominant entry), as a new (R, m) tensor costs more in page faults than the pass
        that fills it. The weights, at most 1, and their moments are in the logits' dtype: with values in
        a bounded range, as pixels are, the moments' cancellation costs float32 at most a few of its digits where the
        variance is not negligible against them."""
        running_max = accumulator.running_max[rows] * LOG2_E  # float64 bits
        chunk_max = logits.amax(dim=1)
        shift = torch.maximum(running_max.to(chunk_max.dtype), chunk_max)
        # (R, m), at most 1; floored like the accumulator's weights (LOG_WEIGHT_FLOOR), as subnormals are slow on x86
        weights = logits.sub_(shift[:, None]).clamp_(min=LOG_WEIGHT_FLOOR * LOG2_E).exp2_()
        count = drawn.clamp_min(1).double()
        scale = torch.exp2(running_max - shift.double())
        known, known_sum = accumulator.normaliser[rows].double() * scale, accumulator.weighted_sum[rows].double() * scale[:, None]
        ones = torch.ones(values.shape[0], 1, dtype=values.dtype, device=values.device)
        tail_sums = (weights @ torch.cat([values, ones], dim=1)).double()  # (R, V + 1): sums of w v and of w
        tail_mean, tail_mean_sum = tail_sums[:, -1] / count, tail_sums[:, :-1] / count[:, None]
        normaliser = known + tail_patches * tail_mean
        mean = (known_sum + tail_patches[:, None] * tail_mean_sum) / normaliser[:, None]  # (R, V)
        # the sample variance of d_i = w_i (v_i - mean) from the sums of w^2, w^2 v and w^2 v^2; the weights are floored
        # at e^(LOG_WEIGHT_FLOOR / 2) first, so that their squares are not subnormal either (which made this product
        # and the squaring slower than the rest of the estimate), adding at most e^LOG_WEIGHT_FLOOR per draw
        squared_weights = weights.clamp_(min=math.exp(LOG_WEIGHT_FLOOR / 2)).square_()
        squares = (squared_weights @ torch.cat([values.square(), values, ones], dim=1)).double()  # (R, 2 V + 1)
        channels = values.shape[1]
        second = squares[:, :channels] - 2 * mean * squares[:, channels:-1] + mean.square() * squares[:, -1:]
        variance = (second - count[:, None] * (tail_mean_sum - mean * tail_mean[:, None]).square()).clamp_min(0)
        variance /= (count - 1).clamp_min(1)[:, None]
        standard_error = (tail_patches[:, None] * (variance / count[:, None]).sqrt() / normaliser[:, None]).amax(dim=1)
        standard_error.masked_fill_(drawn < 2, math.inf)  # one draw has no sample variance: its error is unknown
        return shift, chunk_max, tail_sums, standard_error


def auto_topk(entries: int, clusters: int, dimension: int) -> int:
    """The entries that topk 'auto' lets a query score exactly in a dictionary of entries in clusters, for patches of
    dimension numbers (channels x P x P): the larger of MIN_AUTO_TOPK and AUTO_TOPK_CLUSTERS mean clusters, times
    AUTO_TOPK_DIMENSION / dimension."""
    return math.ceil(max(MIN_AUTO_TOPK, AUTO_TOPK_CLUSTERS * entries / clusters) * AUTO_TOPK_DIMENSION / dimension)


def _summed_masses(masses: torch.Tensor) -> torch.Tensor:
    """(Q,) float64 upper bounds on the row sums of masses (Q, n), non-negative float32. Summed in float32, in whatever
    order torch takes: any order's sum of n non-negative terms lies within gamma = (n - 1) 2^-24 / (1 - (n - 1) 2^-24) of
    the true sum s, so s <= sum / (1 - gamma); a float64 sum would cost a (Q, n) float64 copy."""
    unit = (masses.shape[1] - 1) * 2.0**-24
    return masses.sum(dim=1).double() / (1 - unit / (1 - unit))


def _log_sum_exp(x: torch.Tensor) -> torch.Tensor:
    """(R,) log2 of the sum of 2^x over each row of x (R, n) of finite numbers in bits, overwriting x (exp2 is several
    times faster than exp on a CPU)."""
    top = x.amax(dim=1, keepdim=True)
    return x.sub_(top).exp2_().sum(dim=1).log2_().add_(top[:, 0])


def default_scoring(device: torch.device, dtype: torch.dtype) -> str:
    """'compiled' on a CPU in float32 where patchdb._clusters was compiled, else 'runs' on a CPU, 'gathered' elsewhere."""
    if device.type != "cpu":
        return "gathered"
    return "compiled" if _clusters is not None and dtype == torch.float32 else "runs"


def _score_compiled(accumulator: SoftmaxAccumulator, queries: torch.Tensor, dictionary: ClusteredDictionary, visit: torch.Tensor,
                    alpha_bar: float, isa: str | None = None) -> int:
    """'compiled' scoring (module docstring): the visits as lists of rows per cluster, folded by patchdb._clusters with
    the instruction set isa (one of _clusters.isas(); default the fastest). Each of torch's threads (at most one per
    THREAD_MULTIPLY_ADDS) folds one range of clusters, of about equal (row, entry) pairs, into a state of its own,
    merged afterwards: splitting the rows instead would split every cluster's visitors, and the kernel pads each
    cluster's group of them to ROW_ALIGN.
    Returns the entries scored."""
    if queries.dtype != torch.float32 or queries.device.type != "cpu":
        raise PatchdbError("scoring 'compiled' runs on a CPU in float32; choose scoring 'runs' for other dtypes")
    clusters, layout = dictionary.clusters, dictionary.patch_layout
    # one pass over visit: its (row, cluster) pairs, from which the visited clusters and their visitors follow
    pair_rows, pair_clusters = torch.nonzero(visit).unbind(1)  # by row, then cluster
    visitors = torch.bincount(pair_clusters, minlength=len(clusters))  # (C,)
    layout.prepare(torch.nonzero(visitors).squeeze(1))
    by_cluster = torch.argsort(pair_clusters, stable=True)  # by cluster, then row
    visit_rows = pair_rows[by_cluster]
    visit_starts = torch.zeros(len(clusters) + 1, dtype=torch.int64)
    visit_starts[1:] = visitors.cumsum(0)
    signal, noise_variance = math.sqrt(alpha_bar), 1.0 - alpha_bar
    queries = queries.contiguous()
    pairs = (visit_starts.diff() * clusters.sizes).cumsum(0)
    multiply_adds = int(pairs[-1]) * queries.shape[1]
    threads = max(1, min(torch.get_num_threads(), len(clusters), multiply_adds // THREAD_MULTIPLY_ADDS))
    ranges = balanced_ranges(pairs, threads)
    num_rows, channels = queries.shape[0], layout.channels
    parts = (torch.full((threads - 1, num_rows), -math.inf), torch.zeros(threads - 1, num_rows),
             torch.zeros(threads - 1, num_rows, channels), torch.full((threads - 1, num_rows), -math.inf),
             torch.full((threads - 1, num_rows), -1, dtype=torch.int64))

    def fold_clusters(state, first, last):
        starts = visit_starts[first:last + 1]
        _clusters.fold(layout.buffer.numpy(), layout.starts.numpy(), layout.squared_norms.numpy(),
                       None if layout.log_multiplicity is None else layout.log_multiplicity.numpy(), layout.channels,
                       layout.patch_size, layout.channel_stride, layout.row_stride, clusters.offsets[first:last + 1].numpy(),
                       (starts - starts[0]).numpy(), visit_rows[int(starts[0]):int(starts[-1])].numpy(), queries.numpy(),
                       signal / noise_variance * LOG2_E, alpha_bar / (2 * noise_variance) * LOG2_E,
                       *(tensor.numpy() for tensor in state), isa)

    def fold(*state):
        if threads == 1:
            fold_clusters(state, 0, len(clusters))
            return
        states = [state, *zip(*parts)]  # the accumulator's own, then one of parts per further thread
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for job in [pool.submit(fold_clusters, part, first, last) for part, (first, last) in zip(states, ranges)]:
                job.result()

    accumulator.fold_in_place(fold, dictionary.entries.sources)
    if threads > 1:
        accumulator.merge(parts, dictionary.entries.sources)
    return int(clusters.sizes[pair_clusters].sum())


@dataclass
class _Plan:
    """Per query of a fold: visit (Q, C) the clusters scored exactly so far; relevant (Q, C) the clusters
    not provably negligible; masses (Q, C) float32 the clusters' mass bounds divided by e^mass_shift
    (mass_shift (Q,): the largest bound, at most MASS_HEADROOM above the medoids' log normaliser; masses set to 0 where
    visited once the visits are scored); centroid_distances (Q, C) the search
    order's distances; certified (Q,); path (Q,) uint8 code."""

    visit: torch.Tensor
    relevant: torch.Tensor
    masses: torch.Tensor
    mass_shift: torch.Tensor
    centroid_distances: torch.Tensor
    certified: torch.Tensor
    path: torch.Tensor


_UNCERTIFIED_PATH = {"auto": "estimated", "exact": "exact", "estimate": "estimated", "none": "truncated"}


def _new_report() -> dict:
    return {"paths": Counter(), "queries": 0, "entries_scored": 0, "deepenings": 0, "standard_errors": [],
            "seconds": {"search": 0.0, "rescore": 0.0, "estimate": 0.0}}


def _nearest_clusters(centroid_distances: torch.Tensor, clusters: EntryClusters, budget: int) -> torch.Tensor:
    """(Q, probes) each query's nearest clusters, nearest first, for centroid_distances (Q, C): PROBE_MARGIN times
    as many as budget entries fill at the mean cluster size (a partial sort)."""
    probes = min(len(clusters), max(1, math.ceil(PROBE_MARGIN * budget * len(clusters) / int(clusters.offsets[-1]))))
    return centroid_distances.topk(probes, dim=1, largest=False, sorted=True).indices


def _first_clusters(nearest: torch.Tensor, count: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """(Q, num_clusters) bool: the first count[q] clusters of each query's order nearest (Q, probes)."""
    first = torch.arange(nearest.shape[1], device=nearest.device)[None, :] < count[:, None]
    return torch.zeros(nearest.shape[0], num_clusters, dtype=torch.bool, device=nearest.device).scatter_(1, nearest, first)


def _visited_entries(visit: torch.Tensor, clusters: EntryClusters, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's visited entries, padded: index (R, W) int64 entry numbers (0 where padding) and valid (R, W),
    for visit (R, C) and counts (R,) the entries each row visits (W = their maximum)."""
    pair_rows, pair_clusters = torch.nonzero(visit).unbind(1)  # row-major: each row's clusters in order
    sizes = clusters.sizes[pair_clusters]
    pair_of = cluster_of_entries(sizes)  # (n,) the (row, cluster) pair of each entry
    position = torch.arange(len(pair_of), device=sizes.device)
    entry = clusters.offsets[pair_clusters][pair_of] + position - (sizes.cumsum(0) - sizes)[pair_of]
    row = pair_rows[pair_of]
    column = position - (counts.cumsum(0) - counts)[row]
    index = torch.zeros(visit.shape[0], int(counts.max()), dtype=torch.int64, device=visit.device)
    valid = torch.zeros(index.shape, dtype=torch.bool, device=visit.device)
    index[row, column] = entry
    valid[row, column] = True
    return index, valid


def _block_ends(row_bytes: list[int], chunk_bytes: int) -> list[int]:
    """End positions of consecutive blocks of rows (at least one each) whose padded bytes (rows times the
    largest, the last, for rows sorted by size) stay within chunk_bytes."""
    ends, start = [], 0
    for end, size in enumerate(row_bytes, start=1):
        if (end - start) * size > chunk_bytes and end - 1 > start:
            ends.append(end - 1)
            start = end - 1
    ends.append(len(row_bytes))
    return ends


def _cluster_runs(sizes: torch.Tensor, run_entries: int) -> list[tuple[int, int]]:
    """(first, last) ranges of consecutive clusters holding about run_entries entries each (at least one cluster)."""
    runs, first, total = [], 0, 0
    for cluster, size in enumerate(sizes.tolist()):
        total += size
        if total >= run_entries:
            runs.append((first, cluster + 1))
            first, total = cluster + 1, 0
    if first < len(sizes):
        runs.append((first, len(sizes)))
    return runs
