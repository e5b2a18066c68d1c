"""Inverted-file indices over patch dictionaries: clusters of entries with centroids and radii.

A dictionary's entries are grouped by k-means (FAISS) into clusters and reordered so that every
cluster is one contiguous run of entries, ``offsets[c]:offsets[c + 1]``. Each cluster keeps its
centroid and radius (the largest distance from the centroid to a member). By the triangle
inequality every member k of cluster c lies at least max(0, ||p - centroid_c|| - radius_c) from any
point p, which bounds the logit of every member without touching it: the certificate of the top-k
backend (patchdb.topk).

k-means runs on the entries projected on their top principal directions (REDUCED_DIMENSIONS), which
makes assignment cheap; centroids and radii are then computed in the full patch space, so the bounds
hold exactly whatever the clustering's quality (a poor clustering only loosens them).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from patchdb.engine import PatchDictionary
from patchdb.patches import gather_sources

CLUSTER_SIZE = 1024
"""Default number of dictionary entries per cluster."""

MIN_INDEXED_ENTRIES = 16384
"""Dictionaries with fewer entries (after merging duplicates) are not clustered: they are scanned exactly."""

REDUCED_DIMENSIONS = 16
"""Principal directions on which k-means clusters the entries."""

MAX_CLUSTERS = 4096
"""At most this many clusters per dictionary (assignment costs entries x clusters x REDUCED_DIMENSIONS)."""

PCA_SAMPLE = 65536
"""Entries sampled to find the principal directions."""

BLOCK_ROWS = 65536
"""Entries gathered at once while clustering."""

KMEANS_ITERATIONS = 10
KMEANS_SAMPLE_PER_CLUSTER = 64
"""k-means trains on at most this many entries per cluster (a random sample)."""

DISTANCE_SLACK = 1e-3
"""Relative slack on the float32 distances of the bounds (their rounding error is far smaller)."""


@dataclass
class EntryClusters:
    """Clusters of a dictionary's entries, which are stored sorted by cluster.

    offsets: (C + 1,) int64, cluster c holds entries offsets[c]:offsets[c + 1].
    centroids: (C, D) mean of each cluster's keys. radii: (C,) largest ||key - centroid|| in each cluster.
    log_mass: (C,) log of the summed multiplicities of each cluster's entries.
    medoids: (C,) int64 the entry of each cluster nearest its centroid (an index into the sorted entries).
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
        squared = torch.addmm(point_norms + centroid_norms, points, self.centroids.T, alpha=-2.0).clamp_min_(0)
        distances = squared.sqrt_()
        slack = DISTANCE_SLACK * (point_norms + centroid_norms).sqrt()
        member_distances = (distances - self.radii - slack).clamp_min_(0)
        query_norms = queries.square().sum(dim=1, keepdim=True)
        return distances, (query_norms - alpha_bar * member_distances.square()) / (2 * noise_variance) + self.log_mass


@dataclass
class GatheredEntries:
    """Dictionary entries that are not held in memory: each access gathers their patches from the images.

    windows: a patch_windows view (M, C, H, W, P, P) of the training images; sources: (K, 3) int64
    (image, centre row, centre column); log_multiplicity: (K,); centre: (C,) positions of the
    centre pixel in a flattened patch. For dictionaries too large to keep (tens of GB at 60,000
    images), at the price of one gather per access.
    """

    windows: torch.Tensor
    sources: torch.Tensor
    log_multiplicity: torch.Tensor
    centre: torch.Tensor
    merged: bool

    def take(self, index: torch.Tensor) -> PatchDictionary:
        """The entries at index (n,) int64 as an in-memory PatchDictionary."""
        sources = self.sources[index]
        keys = gather_sources(self.windows, sources)
        return PatchDictionary(keys, keys[:, self.centre], torch.linalg.vector_norm(keys, dim=1).square(),
                               self.log_multiplicity[index], sources, self.merged)

    def __len__(self) -> int:
        return self.sources.shape[0]


def take_entries(entries: "PatchDictionary | GatheredEntries", index: torch.Tensor | slice) -> PatchDictionary:
    """Entries at index ((n,) int64, or a slice) of an in-memory or gathered dictionary, as an in-memory
    PatchDictionary (a view for a slice of one in memory)."""
    if isinstance(entries, GatheredEntries):
        if isinstance(index, slice):
            index = torch.arange(len(entries), device=entries.sources.device)[index]
        return entries.take(index)
    return PatchDictionary(entries.keys[index], entries.values[index], entries.squared_norms[index],
                           entries.log_multiplicity[index], entries.sources[index], entries.merged)


@dataclass
class ClusteredDictionary:
    """A patch dictionary whose entries are sorted by cluster, with the clusters' bounds."""

    entries: "PatchDictionary | GatheredEntries"
    clusters: EntryClusters


def clustered(dictionary: PatchDictionary, cluster_size: int = CLUSTER_SIZE, seed: int = 0) -> ClusteredDictionary:
    """An in-memory dictionary reordered by cluster, with every cluster's bounds (see build_clusters)."""
    order, clusters = build_clusters(lambda rows: dictionary.keys[rows], len(dictionary), dictionary.log_multiplicity,
                                     cluster_size, seed)
    return ClusteredDictionary(take_entries(dictionary, order), clusters)


def build_clusters(gather: Callable[[torch.Tensor], torch.Tensor], num_entries: int, log_multiplicity: torch.Tensor,
                   cluster_size: int = CLUSTER_SIZE, seed: int = 0, block_rows: int = BLOCK_ROWS
                   ) -> tuple[torch.Tensor, EntryClusters]:
    """Cluster num_entries keys by k-means, streaming them in blocks: (order, clusters).

    gather(rows) returns the keys (len(rows), D) of entries rows (int64); log_multiplicity (K,) is
    each entry's. order (K,) int64 lists the entries sorted by cluster (clusters numbered along the
    centroids' first principal direction, so that nearby numbers lie near each other); clusters
    describes them in that order. Only the reduced projections (K, REDUCED_DIMENSIONS) are held
    in memory at once, never all keys.
    """
    device = log_multiplicity.device
    num_clusters = max(1, min(MAX_CLUSTERS, round(num_entries / cluster_size)))
    generator = torch.Generator().manual_seed(seed)
    sample = gather(torch.randperm(num_entries, generator=generator)[:PCA_SAMPLE].to(device)).double()
    mean = sample.mean(dim=0)
    _, eigenvectors = torch.linalg.eigh((sample - mean).T @ (sample - mean))
    directions = eigenvectors[:, -min(REDUCED_DIMENSIONS, sample.shape[1]):].flip(1)  # largest first
    reduced = np.empty((num_entries, directions.shape[1]), dtype=np.float32)
    for start in range(0, num_entries, block_rows):
        rows = torch.arange(start, min(start + block_rows, num_entries), device=device)
        reduced[start:start + len(rows)] = ((gather(rows).double() - mean) @ directions).float().cpu().numpy()
    if num_clusters == 1:
        assignment = torch.zeros(num_entries, dtype=torch.int64)
    else:
        kmeans = faiss.Kmeans(reduced.shape[1], num_clusters, niter=KMEANS_ITERATIONS, seed=seed,
                              min_points_per_centroid=1, max_points_per_centroid=KMEANS_SAMPLE_PER_CLUSTER, verbose=False)
        kmeans.train(reduced)
        _, nearest = kmeans.index.search(reduced, 1)
        rank = np.empty(num_clusters, dtype=np.int64)
        rank[np.argsort(kmeans.centroids[:, 0], kind="stable")] = np.arange(num_clusters)
        assignment = torch.from_numpy(rank[nearest[:, 0]])
    del reduced
    order = torch.argsort(assignment, stable=True).to(device)
    _, sizes = torch.unique_consecutive(assignment[order.cpu()], return_counts=True)  # empty clusters are dropped
    sizes = sizes.to(device)
    offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64, device=device)
    offsets[1:] = sizes.cumsum(0)
    member_cluster = cluster_of_entries(sizes)
    sums = None
    for start in range(0, num_entries, block_rows):
        keys = gather(order[start:start + block_rows]).double()
        if sums is None:
            sums = torch.zeros(len(sizes), keys.shape[1], dtype=torch.float64, device=device)
        sums.index_add_(0, member_cluster[start:start + block_rows], keys)
    centroids = (sums / sizes[:, None]).to(log_multiplicity.dtype)
    distances = torch.cat([torch.linalg.vector_norm(gather(order[start:start + block_rows]) - centroids[member_cluster[start:start + block_rows]], dim=1)
                           for start in range(0, num_entries, block_rows)])
    radii = torch.zeros(len(sizes), dtype=centroids.dtype, device=device).scatter_reduce_(0, member_cluster, distances, reduce="amax")
    nearest = torch.zeros(len(sizes), dtype=centroids.dtype, device=device).scatter_reduce_(
        0, member_cluster, distances, reduce="amin", include_self=False)
    candidates = torch.where(distances == nearest[member_cluster], torch.arange(num_entries, device=device), num_entries)
    medoids = torch.full((len(sizes),), num_entries, device=device).scatter_reduce_(0, member_cluster, candidates, reduce="amin")
    log_mass = cluster_log_mass(member_cluster, len(sizes), log_multiplicity[order])
    return order, EntryClusters(offsets, centroids, radii, log_mass, medoids)


def cluster_of_entries(sizes: torch.Tensor) -> torch.Tensor:
    """(K,) int64 cluster of each entry of entries sorted by cluster, from the clusters' sizes (C,)."""
    return torch.repeat_interleave(torch.arange(len(sizes), device=sizes.device), sizes)


def cluster_log_mass(member_cluster: torch.Tensor, num_clusters: int, log_multiplicity: torch.Tensor) -> torch.Tensor:
    """(C,) log of the summed multiplicities of each cluster's entries (member_cluster, log_multiplicity: (K,))."""
    mass = torch.zeros(num_clusters, dtype=torch.float64, device=member_cluster.device)
    mass.index_add_(0, member_cluster, log_multiplicity.double().exp())
    return mass.log().to(log_multiplicity.dtype)
