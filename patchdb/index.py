"""Inverted-file indices over patch dictionaries: clusters of entries with centroids and radii.

A dictionary's entries are grouped by k-means (FAISS) into clusters and reordered so that every
cluster is one contiguous run of entries, ``offsets[c]:offsets[c + 1]``. Each cluster keeps its
centroid and radius (the largest distance from the centroid to a member). By the triangle
inequality every member k of cluster c lies at least max(0, ||p - centroid_c|| - radius_c) from any
point p, which bounds the logit of every member without touching it: the certificate of the top-k
backend (patchdb.topk).

The clusters come from a two-level k-means (FAISS) on the entries' top principal projections
(REDUCED_DIMENSIONS), fitted on a sample; every entry is then assigned in one streamed pass, which
also bounds each cluster in the full patch space: a member's distance to the cluster's k-means
centre c' is exact from its projection, and the stored radius max ||k - c'|| + ||centroid - c'||
bounds its distance to the stored centroid (the cluster's mean). The bounds hold whatever the
clustering's quality; a poor clustering only loosens them.
"""

import functools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from patchdb.engine import LOG2_E, PatchDictionary, principal_directions
from patchdb.errors import PatchdbError
from patchdb.patches import gather_sources, window_sums

CLUSTER_SIZE = 1024
"""Default number of patches (duplicates counted) per cluster."""

MIN_INDEXED_ENTRIES = 16384
"""Dictionaries with fewer entries (after merging duplicates) are not clustered: they are scanned exactly."""

REDUCED_DIMENSIONS = 16
"""Principal directions on which k-means clusters the entries."""

MAX_CLUSTERS = 4096
"""At most this many clusters per dictionary (the top-k backend's search costs queries x clusters x D)."""

PCA_SAMPLE = 65536
"""At most this many keys of the k-means sample find the principal directions."""

BLOCK_ROWS = 65536
"""Entries gathered at once while clustering."""

KMEANS_ITERATIONS = 10
KMEANS_SAMPLE_PER_CLUSTER = 64
"""k-means trains on a random sample of this many keys per cluster."""

DISTANCE_SLACK = 1e-3
"""Relative slack on the float32 distances of the bounds (their rounding error is far smaller)."""

TERM_ROUNDINGS = 8
"""The two terms of a cluster's logit bound, ||q||^2 / (2 beta) and alpha_bar d^2 / (2 beta), are each moved by this many
units of their rounding in the bound's favour: near t = 0 they are thousands of nats, and their difference, the
bound, would otherwise fall short of the float64 truth by rounding."""


@dataclass
class EntryClusters:
    """Clusters of a dictionary's entries, which are stored sorted by cluster.

    offsets: (C + 1,) int64, cluster c holds entries offsets[c]:offsets[c + 1].
    centroids: (C, D) mean of each cluster's patches (duplicates counted).
    radii: (C,) a bound on ||key - centroid|| over each cluster's keys.
    log_mass: (C,) log of the summed multiplicities of each cluster's entries.
    medoids: (C,) int64 an entry of each cluster near its centre (an index into the sorted entries).
    """

    offsets: torch.Tensor
    centroids: torch.Tensor
    radii: torch.Tensor
    log_mass: torch.Tensor
    medoids: torch.Tensor

    def __len__(self) -> int:
        return self.centroids.shape[0]

    @property
    def sizes(self) -> torch.Tensor:
        """(C,) number of entries (rows) in each cluster."""
        return self.offsets.diff()

    def search(self, queries: torch.Tensor, alpha_bar: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances (Q, C) from q / s to each centroid, and upper bounds (Q, C) on the log of each
        cluster's share of q's posterior normaliser, for queries q (Q, D) at noise level alpha_bar.

        With s = sqrt(alpha_bar) and beta = 1 - alpha_bar, the engine's logit of key k is
        (s <q, k> - s^2 ||k||^2 / 2) / beta = (||q||^2 - s^2 ||q / s - k||^2) / (2 beta), and
        ||q / s - k|| >= max(0, ||q / s - centroid|| - radius) for every member k; a cluster's share
        is at most its summed multiplicities times the largest member weight.
        """
        signal, noise_variance = math.sqrt(alpha_bar), 1.0 - alpha_bar
        points = queries / signal
        point_norms = points.square().sum(dim=1, keepdim=True)
        centroid_norms = self.centroids.square().sum(dim=1)
        # in place wherever it can be: each new (Q, C) tensor costs a fresh allocation's page faults, more than the pass
        squared = torch.addmm(centroid_norms, points, self.centroids.T, alpha=-2.0).add_(point_norms).clamp_min_(0)
        distances = squared.sqrt_()
        # the rounding slack DISTANCE_SLACK * (||p|| + ||centroid||) is at least DISTANCE_SLACK * sqrt(||p||^2 + ||centroid||^2)
        member_distances = torch.sub(distances, self.radii + DISTANCE_SLACK * centroid_norms.sqrt())
        member_distances.sub_(DISTANCE_SLACK * point_norms.sqrt()).clamp_min_(0)
        query_norms = queries.square().sum(dim=1, keepdim=True)
        # each term widened by a few of its own roundings, so that the float32 difference stays an upper bound
        widen = TERM_ROUNDINGS * torch.finfo(queries.dtype).eps
        bounds = (member_distances.square_().mul_(-alpha_bar * (1 - widen) / (2 * noise_variance))
                  .add_(query_norms * ((1 + widen) / (2 * noise_variance))))
        return distances, bounds.add_(self.log_mass)


@dataclass
class GatheredEntries:
    """Dictionary entries that are not held in memory: each access gathers their patches from the images.

    windows: a patch_windows view (M, C, H, W, P, P) of the training images; norm_maps: (M, H, W) every patch's
    ||k||^2 (squared_norm_maps(windows)); sources: (K, 3) int32 as stored, or int64 (image, centre row, centre column);
    multiplicity: (K,) int32 as stored, the identical patches each entry stands for; centre: (C,) positions of the
    centre pixel in a flattened patch. For dictionaries too large to keep (tens of GB at 60,000 images), at the price
    of one gather per access.
    """

    windows: torch.Tensor
    norm_maps: torch.Tensor
    sources: torch.Tensor
    multiplicity: torch.Tensor
    centre: torch.Tensor
    merged: bool

    def take(self, index: torch.Tensor) -> PatchDictionary:
        """The entries at index (n,) int64 as an in-memory PatchDictionary."""
        sources = self.sources[index].long()
        try:
            keys, squared_norms = gather_sources(self.windows, sources), self.squared_norms_at(sources)
        except IndexError:  # torch checks every index; only a damaged store has sources outside the images
            raise corrupt_store_error(self.windows.shape[-1], "an entry's source lies outside the images") from None
        log_multiplicity = self.multiplicity[index.cpu()].to(device=keys.device, dtype=keys.dtype).log_()
        return PatchDictionary(keys, keys[:, self.centre], squared_norms, log_multiplicity, sources, self.merged)

    def squared_norms_at(self, sources: torch.Tensor) -> torch.Tensor:
        """(n,) ||k||^2 of the patches at sources (n, 3) int64, from the norm maps."""
        image, row, column = sources.T
        height, width = self.norm_maps.shape[1:]
        return self.norm_maps.view(-1).take(image.to(torch.int64, copy=True).mul_(height).add_(row).mul_(width).add_(column))

    def __len__(self) -> int:
        return self.sources.shape[0]


def take_entries(entries: "PatchDictionary | GatheredEntries", index: torch.Tensor | slice) -> PatchDictionary:
    """Entries at index ((n,) int64, or a slice) of an in-memory or gathered dictionary, as an in-memory
    PatchDictionary (a view for a slice of one in memory)."""
    if isinstance(entries, GatheredEntries):
        if isinstance(index, slice):
            index = torch.arange(*index.indices(len(entries)), device=entries.sources.device)
        return entries.take(index)
    return PatchDictionary(entries.keys[index], entries.values[index], entries.squared_norms[index],
                           entries.log_multiplicity[index], entries.sources[index], entries.merged)


@dataclass
class ClusteredDictionary:
    """A patch dictionary whose entries are sorted by cluster, with the clusters' bounds."""

    entries: "PatchDictionary | GatheredEntries"
    clusters: EntryClusters
    patch_counts: "PatchCounts | None" = None
    """The numbering of the entries' patches, for drawing patches uniformly; derived from the entries' multiplicities
    unless given."""

    def __post_init__(self):
        if self.patch_counts is None:
            # from the logs, exact only while a float32 log's rounding stays below half a count (multiplicities below
            # about 10^6; a store passes its integer multiplicities, patchdb.store)
            self.patch_counts = PatchCounts.from_multiplicity(
                self.entries.multiplicity if isinstance(self.entries, GatheredEntries)
                else self.entries.log_multiplicity.float().exp().round())

    @functools.cached_property
    def patch_layout(self) -> "PatchLayout":
        """Where each entry's patch lies in memory, for the compiled scoring (patchdb.topk): call its prepare(clusters)
        before scoring clusters."""
        return patch_layout(self.entries, self.clusters.offsets)

    @functools.cached_property
    def cluster_patches(self) -> torch.Tensor:
        """(C,) int64 on the clusters' device: patches (multiplicities summed) in each cluster."""
        return self.patch_counts.cluster_patches(self.clusters.offsets).to(self.clusters.offsets.device)


@dataclass
class PatchLayout:
    """Entry e's (C, P, P) patch is buffer[starts[e] + c * channel_stride + dy * row_stride + dx]: buffer (flat) is
    an in-memory dictionary's keys, or the padded training images of gathered entries (nothing copied);
    squared_norms (K,) float32 ||patch||^2; log_multiplicity (K,) float32 log2 of each entry's multiplicity, None where
    no entry was merged.

    Gathered entries' starts (K,) int64, squared_norms and log_multiplicity are filled a cluster at a time, the first
    time one is scored (prepare; ready (C,) bool marks those filled): a scale's dictionaries hold tens of millions of
    entries at 60,000 images, and a run scores a third of them or less, while filling them all cost seconds at every
    scale (computing each entry's start and norm in the compiled kernel instead doubled its time: the norms' reads from
    the norm maps are scattered). In-memory entries are filled at once (ready None)."""

    buffer: torch.Tensor
    starts: torch.Tensor
    squared_norms: torch.Tensor
    log_multiplicity: torch.Tensor | None
    channel_stride: int
    row_stride: int
    channels: int
    patch_size: int
    gathered: "GatheredEntries | None" = None
    offsets: torch.Tensor | None = None
    ready: torch.Tensor | None = None

    def prepare(self, clusters: torch.Tensor) -> None:
        """Fill the starts, squared norms and log multiplicities of the entries of clusters (n,) int64 not filled yet
        (with the compiled patchdb._clusters.fill: one pass, no temporaries; the clusters split by entries among up to
        torch's threads, THREAD_FILL_ENTRIES each at least)."""
        if self.ready is None:
            return
        new = torch.unique(clusters[~self.ready[clusters]])  # each once, in memory order
        if len(new) == 0:
            return
        from patchdb import _clusters  # only the compiled scoring, which needs it, prepares layouts

        windows, norm_maps = self.gathered.windows, self.gathered.norm_maps
        image_stride, _, row_stride, column_stride = windows.stride()[:4]
        height, width = norm_maps.shape[1:]
        arguments = (self.gathered.sources.to(torch.int32).numpy(), np.array([image_stride, row_stride, column_stride]),
                     windows.storage_offset(), norm_maps.float().view(-1).numpy(), np.array([height * width, width, 1]),
                     self.offsets.numpy())
        per_entry = (self.starts.numpy(), self.squared_norms.numpy(),
                     *((None, None) if self.log_multiplicity is None
                       else (self.gathered.multiplicity.to(torch.int32).numpy(), self.log_multiplicity.numpy())))
        filled = (self.offsets[new + 1] - self.offsets[new]).cumsum(0)
        threads = max(1, min(torch.get_num_threads(), int(filled[-1]) // THREAD_FILL_ENTRIES))
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for job in [pool.submit(_clusters.fill, *arguments, new[first:stop].numpy(), *per_entry)
                        for first, stop in balanced_ranges(filled, threads) if stop > first]:
                try:
                    job.result()
                except ValueError as error:  # fill checks each stored entry it reads
                    raise corrupt_store_error(self.patch_size, str(error)) from None
        self.ready[new] = True


THREAD_FILL_ENTRIES = 2**20
"""PatchLayout.prepare fills this many entries per thread at least, up to torch's threads (some 15 ms of work each): the
fill waits on reads scattered over the norm maps, which the threads overlap (the dictionary at P = 9 and 60,000 images
0.52 s on one thread, 0.26 s on two: benchmarks/bench_fill.py)."""


def balanced_ranges(cumulative: torch.Tensor, parts: int) -> list[tuple[int, int]]:
    """parts consecutive ranges (first, stop) of the n items whose running totals of work are cumulative (n,) int64, of
    about equal work each."""
    cuts = torch.searchsorted(cumulative, cumulative[-1] * torch.arange(1, parts) // parts, right=True).tolist()
    return list(zip([0, *cuts], [*cuts, len(cumulative)]))


def corrupt_store_error(patch_size: int, problem: str) -> PatchdbError:
    """The error for a stored dictionary found damaged while sampling (patchdb.store checks only its shapes on loading)."""
    return PatchdbError(f"a patch store's dictionary at patch size {patch_size} is corrupt: {problem}; delete the store's "
                        f"scale-{patch_size:02d}.h5 and rerun `patchdb build-index` to rebuild it")


def patch_layout(entries: "PatchDictionary | GatheredEntries", offsets: torch.Tensor) -> PatchLayout:
    """The PatchLayout of a dictionary's entries, (K, D) keys or a patch_windows view of contiguous padded images,
    in clusters offsets (C + 1,) int64."""
    if isinstance(entries, GatheredEntries):
        windows = entries.windows
        _, channel_stride, _, column_stride, patch_row_stride, patch_column_stride = windows.stride()
        if column_stride != 1 or patch_column_stride != 1:
            raise ValueError("gathered entries need windows over contiguous rows of pixels")
        buffer = windows.as_strided((windows.untyped_storage().nbytes() // windows.element_size(),), (1,), 0)
        # empty, not zeros: the pages of clusters never scored are never touched
        return PatchLayout(buffer, torch.empty(len(entries), dtype=torch.int64), torch.empty(len(entries), dtype=torch.float32),
                           torch.empty(len(entries), dtype=torch.float32) if entries.merged else None, channel_stride,
                           patch_row_stride, windows.shape[1], windows.shape[-1], entries, offsets.cpu(),
                           torch.zeros(len(offsets) - 1, dtype=torch.bool))
    keys = entries.keys.contiguous()
    channels = entries.values.shape[1]
    size = math.isqrt(keys.shape[1] // channels)
    log_multiplicity = (entries.log_multiplicity.float() * LOG2_E).contiguous() if entries.merged else None
    return PatchLayout(keys.view(-1), torch.arange(keys.shape[0], device=keys.device) * keys.shape[1],
                       entries.squared_norms.float().contiguous(), log_multiplicity, size * size, size, channels, size)


NORM_MAP_IMAGES = 1024
"""squared_norm_maps squares this many padded images at a time: temporaries of a few MiB, which the allocator reuses
(4,096 images, tens of MiB, came from fresh memory at each block: 0.2-0.5 s more per scale at 60,000 images)."""


def squared_norm_maps(windows: torch.Tensor) -> torch.Tensor:
    """(M, H, W) ||patch||^2 of every patch of a patch_windows view (M, C, H, W, P, P) of padded images: window sums
    of the squared images (patches.window_sums)."""
    count, channels, height, width, size, _ = windows.shape
    image_stride, channel_stride, row_stride = windows.stride()[:3]
    padded = windows.as_strided((count, channels, height + size - 1, width + size - 1),
                                (image_stride, channel_stride, row_stride, 1), windows.storage_offset())
    maps = windows.new_empty(count, height, width)
    for first in range(0, count, NORM_MAP_IMAGES):
        squares = padded[first:first + NORM_MAP_IMAGES].square().sum(dim=1)
        maps[first:first + NORM_MAP_IMAGES] = window_sums(squares, size)
    return maps


def clustered(dictionary: PatchDictionary, cluster_size: int = CLUSTER_SIZE, seed: int = 0) -> ClusteredDictionary:
    """An in-memory dictionary reordered by cluster, with every cluster's bounds (see build_clusters)."""
    order, clusters = build_clusters(lambda rows: dictionary.keys[rows], len(dictionary), dictionary.log_multiplicity,
                                     cluster_size, seed)
    return ClusteredDictionary(take_entries(dictionary, order), clusters)


def build_clusters(gather: Callable[[torch.Tensor], torch.Tensor], num_entries: int, log_multiplicity: torch.Tensor,
                   cluster_size: int = CLUSTER_SIZE, seed: int = 0) -> tuple[torch.Tensor, EntryClusters]:
    """Cluster num_entries keys in one streamed pass: (order, clusters).

    gather(rows) returns the keys (len(rows), D) of entries rows (int64); log_multiplicity (K,) is
    each entry's, and clusters hold about cluster_size patches (multiplicities counted). order (K,)
    int64 lists the entries sorted by cluster; clusters describes them in that order. Only a
    sample of keys is held in memory at once, never all of them.
    """
    device = log_multiplicity.device
    multiplicity = log_multiplicity.double().exp()
    num_clusters = number_of_clusters(float(multiplicity.sum()), cluster_size)
    generator = torch.Generator().manual_seed(seed)
    sample = gather(torch.randperm(num_entries, generator=generator)[:num_clusters * KMEANS_SAMPLE_PER_CLUSTER].to(device))
    partition = Partition(Quantizer.fit(sample, num_clusters, seed))
    assignment = torch.cat([partition.add(rows, gather(rows), multiplicity[rows])
                            for rows in torch.arange(num_entries, device=device).split(BLOCK_ROWS)])
    return partition.finish(assignment, log_multiplicity, torch.arange(num_entries, device=device))


def number_of_clusters(num_patches: float, cluster_size: int) -> int:
    """Clusters for a dictionary of num_patches patches (duplicates counted): about cluster_size each, at most MAX_CLUSTERS."""
    return max(1, min(MAX_CLUSTERS, round(num_patches / cluster_size)))


@dataclass
class Quantizer:
    """Two-level k-means on the keys' principal projections: assigns keys to clusters in ~2 sqrt(C) distances.

    A key k (D,) reduces to r = directions^T (k - mean) (R,), directions (D, R) orthonormal; coarse
    (G, R) are the top-level centroids, fine (C, R) the clusters', those of coarse cell g at
    fine_offsets[g]:fine_offsets[g + 1]. A key's cluster is the nearest fine centroid within its
    nearest coarse cell (FAISS flat indices). Everything is float64 but the search.
    """

    mean: torch.Tensor
    directions: torch.Tensor
    coarse: torch.Tensor
    fine: torch.Tensor
    fine_offsets: torch.Tensor

    def __len__(self) -> int:
        return self.fine.shape[0]

    @classmethod
    def fit(cls, sample: torch.Tensor, num_clusters: int, seed: int = 0) -> "Quantizer":
        """Fit on sample (S, D) keys: principal directions, then k-means per level (FAISS), num_clusters in all."""
        mean, directions = principal_directions(sample[:PCA_SAMPLE], REDUCED_DIMENSIONS)
        reduced = ((sample.double() - mean) @ directions).float().cpu().numpy()
        num_clusters = max(1, min(num_clusters, len(reduced)))
        coarse = _kmeans(reduced, max(1, round(math.sqrt(num_clusters))), seed)
        cell = flat_index(coarse).search(reduced, 1)[1][:, 0]
        fine, fine_offsets = [], [0]
        for index in range(len(coarse)):
            members = reduced[cell == index]
            share = max(1, min(len(members), round(num_clusters * len(members) / len(reduced)))) if len(members) else 0
            fine.append(_kmeans(members, share, seed) if share else members)
            fine_offsets.append(fine_offsets[-1] + share)
        as_tensor = lambda array: torch.from_numpy(np.ascontiguousarray(array)).to(sample.device, torch.float64)  # noqa: E731
        return cls(mean, directions, as_tensor(coarse), as_tensor(np.concatenate(fine)),
                   torch.tensor(fine_offsets, device=sample.device))

    def __post_init__(self):
        self._coarse_index = flat_index(self.coarse)
        bounds = self.fine_offsets.tolist()
        self._fine_indices = [flat_index(self.fine[low:high]) for low, high in zip(bounds[:-1], bounds[1:])]

    def reduce(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For keys (n, D): r (n, R) float64, and ||k - mean||^2 - ||r||^2 (n,) float64, the squared
        distance of each key from the subspace that the fine centroids span."""
        keys = keys.double()
        projected = keys @ torch.cat([self.directions, self.mean[:, None]], dim=1)  # one product for r and <k, mean>
        reduced = projected[:, :-1] - self.mean @ self.directions
        centred_norms = torch.linalg.vector_norm(keys, dim=1).square() - 2 * projected[:, -1] + self.mean.square().sum()
        return reduced, (centred_norms - reduced.square().sum(dim=1)).clamp_min(0)

    def assign(self, reduced: torch.Tensor) -> torch.Tensor:
        """(n,) int64 cluster of each reduced key of reduced (n, R)."""
        points = np.ascontiguousarray(reduced.float().cpu().numpy())
        cell = self._coarse_index.search(points, 1)[1][:, 0]
        assignment = np.empty(len(points), dtype=np.int64)
        order = np.argsort(cell, kind="stable")
        bounds = np.searchsorted(cell[order], np.arange(len(self.coarse) + 1))
        for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            if start < stop:
                rows = order[start:stop]
                assignment[rows] = int(self.fine_offsets[index]) + self._fine_indices[index].search(points[rows], 1)[1][:, 0]
        return torch.from_numpy(assignment).to(reduced.device)

    def lifted(self) -> torch.Tensor:
        """(C, D) float64 the fine centroids in patch space: mean + directions f."""
        return self.mean + self.fine @ self.directions.T


class Partition:
    """Builds EntryClusters in one streamed pass over a dictionary's keys (add), then finish.

    Each key is assigned to a cluster of the quantizer, and its distance to that cluster's lifted
    centroid c' is exact from its reduction (||k - c'||^2 = ||k - mean||^2 - ||r||^2 + ||r - f||^2).
    The stored centroid c is the cluster's mean key, and its radius max ||k - c'|| + ||c - c'||
    bounds every member's distance from c (triangle inequality) without a second pass.
    """

    def __init__(self, quantizer: Quantizer):
        self.quantizer = quantizer
        size = len(quantizer)
        device = quantizer.fine.device
        self.sums = torch.zeros(size, quantizer.mean.shape[0], dtype=torch.float64, device=device)  # summed weighted keys
        self.mass = torch.zeros(size, dtype=torch.float64, device=device)
        self.reach = torch.zeros(size, dtype=torch.float64, device=device)  # max ||k - c'|| per cluster
        # per cluster the key of least (distance to c', row), packed in one int64: the float32 bits of the distance
        # (non-negative floats order as their bits do), then the row
        self.nearest = torch.full((size,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)

    def add(self, rows: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Assign keys (n, D) with row numbers rows (n,) int64 (< 2^32), each standing for weights (n,)
        patches (default 1): (n,) int64 clusters."""
        reduced, residual = self.quantizer.reduce(keys)
        assignment = self.quantizer.assign(reduced)
        distances = (residual + (reduced - self.quantizer.fine[assignment]).square().sum(dim=1)).sqrt()
        self.reach.scatter_reduce_(0, assignment, distances, reduce="amax")
        self.nearest.scatter_reduce_(0, assignment, (distances.float().view(torch.int32).to(torch.int64) << 32) | rows,
                                     reduce="amin")
        weighted = keys if weights is None else keys * weights[:, None].to(keys.dtype)
        # summed in the keys' dtype within a block, in float64 across blocks: millions of identical patches may share a cluster
        self.sums += torch.zeros(self.sums.shape, dtype=keys.dtype, device=keys.device).index_add_(0, assignment, weighted)
        self.mass.index_add_(0, assignment, torch.ones(len(keys), dtype=torch.float64, device=keys.device)
                             if weights is None else weights.double())
        return assignment

    def finish(self, assignment: torch.Tensor, log_multiplicity: torch.Tensor, rows: torch.Tensor
               ) -> tuple[torch.Tensor, EntryClusters]:
        """(order, clusters) of the entries: their clusters assignment (K,) int64, log_multiplicity (K,),
        and the row numbers rows (K,) int64, ascending, that they were added as.

        Every added key must equal an entry (entries may stand for several identical added keys).
        Entries are sorted by cluster (stably); clusters that hold no entry are dropped.
        """
        device, num_entries = assignment.device, assignment.shape[0]
        order = torch.argsort(assignment, stable=True)
        present, sizes = torch.unique_consecutive(assignment[order], return_counts=True)
        renumber = torch.full((len(self.quantizer),), -1, dtype=torch.int64, device=device)
        renumber[present] = torch.arange(len(present), device=device)
        entry_cluster = renumber[assignment]
        offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64, device=device)
        offsets[1:] = sizes.cumsum(0)
        centroids = (self.sums[present] / self.mass[present, None]).to(log_multiplicity.dtype)
        shift = torch.linalg.vector_norm(centroids.double() - self.quantizer.lifted()[present], dim=1)
        radii = (self.reach[present] + shift).to(centroids.dtype)
        # the medoid: the entry of the key nearest c' (an identical copy of it may have been added under another row
        # or, rounding apart, assigned elsewhere: then the cluster's first entry stands in; any member gives a valid bound)
        nearest_rows = self.nearest[present] & 0xFFFFFFFF
        entry = torch.searchsorted(rows, nearest_rows).clamp_max(num_entries - 1)
        position = torch.empty_like(order)
        position[order] = torch.arange(num_entries, device=device)
        found = (rows[entry] == nearest_rows) & (entry_cluster[entry] == torch.arange(len(present), device=device))
        medoids = torch.where(found, position[entry], offsets[:-1])
        counts = PatchCounts.from_multiplicity(log_multiplicity[order].double().exp().round())
        log_mass = cluster_log_mass(offsets, counts, log_multiplicity.dtype)
        return order, EntryClusters(offsets, centroids, radii, log_mass, medoids)


def _kmeans(points: np.ndarray, num_clusters: int, seed: int) -> np.ndarray:
    """(num_clusters, R) k-means centroids of points (S, R) float32 (FAISS), or the mean for one cluster."""
    if num_clusters == 1:
        return points.mean(axis=0, keepdims=True)
    kmeans = faiss.Kmeans(points.shape[1], num_clusters, niter=KMEANS_ITERATIONS, seed=seed, min_points_per_centroid=1,
                          max_points_per_centroid=KMEANS_SAMPLE_PER_CLUSTER, verbose=False)
    kmeans.train(np.ascontiguousarray(points))
    return kmeans.centroids


def flat_index(centroids: "torch.Tensor | np.ndarray") -> faiss.IndexFlatL2:
    """An exact FAISS index over centroids (k, R)."""
    points = centroids.float().cpu().numpy() if isinstance(centroids, torch.Tensor) else centroids.astype(np.float32)
    index = faiss.IndexFlatL2(points.shape[1])
    index.add(np.ascontiguousarray(points))
    return index


def cluster_of_entries(sizes: torch.Tensor) -> torch.Tensor:
    """(K,) int64 cluster of each entry of entries sorted by cluster, from the clusters' sizes (C,)."""
    return torch.repeat_interleave(torch.arange(len(sizes), device=sizes.device), sizes)


COUNT_BLOCK = 1 << 20
"""PatchCounts.from_multiplicity reads this many multiplicities at a time."""


@dataclass
class PatchCounts:
    """The numbering of a dictionary's patches: entry e stands for multiplicity[e] identical patches, numbered on
    from those of entries 0..e - 1, so that a uniform patch number draws entries in proportion to their multiplicity.

    Held by the merged entries (multiplicity > 1) alone, a fraction of a percent of the entries at 60,000 images:
    every entry's cumulative count, (K,) int64, cost a second per scale there, mostly in fresh memory.
    num_entries: K; merged_entries (M,) int64 ascending; merged_multiplicity (M,) int64; extra_through (M,) int64, the
    patches beyond one per entry in merged entries 0..i, sum (multiplicity - 1).
    """

    num_entries: int
    merged_entries: torch.Tensor
    merged_multiplicity: torch.Tensor
    extra_through: torch.Tensor

    @classmethod
    def from_multiplicity(cls, multiplicity) -> "PatchCounts":
        """From every entry's multiplicity (K,), integer counts of any dtype: a tensor, an array or a stored (h5py)
        dataset, read in blocks; ValueError where one is below 1."""
        if isinstance(multiplicity, torch.Tensor):
            multiplicity = multiplicity.cpu().numpy()
        merged, counts = [], []
        for first in range(0, len(multiplicity), COUNT_BLOCK):
            block = np.asarray(multiplicity[first:first + COUNT_BLOCK])
            if block.min() < 1:
                raise ValueError(f"entry {first + int(block.argmin())}: its multiplicity is below 1")
            where = np.flatnonzero(block > 1)
            merged.append(torch.from_numpy(where + first))
            counts.append(torch.from_numpy(block[where].astype(np.int64)))
        merged_entries = torch.cat(merged) if merged else torch.zeros(0, dtype=torch.int64)
        merged_multiplicity = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.int64)
        return cls(len(multiplicity), merged_entries, merged_multiplicity, (merged_multiplicity - 1).cumsum(0))

    @property
    def merged(self) -> bool:
        return len(self.merged_entries) > 0

    @property
    def total(self) -> int:
        """Patches in all entries."""
        return self.num_entries + (int(self.extra_through[-1]) if self.merged else 0)

    def through(self, entries: torch.Tensor) -> torch.Tensor:
        """(n,) int64: patches in entries 0..e for each of entries (n,) int64 in -1..K - 1."""
        merged_up_to = torch.searchsorted(self.merged_entries, entries, right=True)  # merged entries <= e
        return entries + 1 + torch.cat([self.extra_through.new_zeros(1), self.extra_through])[merged_up_to]

    def entries_of(self, patches: torch.Tensor) -> torch.Tensor:
        """(n,) int64: the entry that holds each of the patch numbers patches (n,) int64 in 0..total - 1."""
        if not self.merged:
            return patches.clone()
        extra_before = self.extra_through - (self.merged_multiplicity - 1)
        first_patches = self.merged_entries + extra_before  # the first patch number of each merged entry
        last = torch.searchsorted(first_patches, patches, right=True) - 1  # the last merged entry starting at or before
        at = last.clamp_min(0)
        inside = (last >= 0) & (patches < first_patches[at] + self.merged_multiplicity[at])
        # beyond merged entry `last`, every entry before the patch's own holds one patch past the merged ones' extras
        unmerged = patches - torch.where(last >= 0, self.extra_through[at], 0)
        return torch.where(inside, self.merged_entries[at], unmerged)

    def cluster_patches(self, offsets: torch.Tensor) -> torch.Tensor:
        """(C,) int64 on the CPU: patches in each cluster of entries sorted by cluster, offsets (C + 1,) int64 from 0."""
        ends = self.through(offsets.cpu() - 1)
        return ends[1:] - ends[:-1]


def cluster_log_mass(offsets: torch.Tensor, counts: PatchCounts, dtype: torch.dtype) -> torch.Tensor:
    """(C,) log of each cluster's patches (PatchCounts.cluster_patches), in dtype on the offsets' device."""
    return counts.cluster_patches(offsets).to(device=offsets.device, dtype=dtype).log()
