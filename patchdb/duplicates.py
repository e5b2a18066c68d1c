"""Exact merging of identical dictionary entries: hash, group, and verify every merge.

Merging identical patches (and adding the log of their count to the logit) leaves every posterior
unchanged; Fashion-MNIST's black background makes it worth a lot. Hashes only propose merges:
each one is checked against the keys themselves, so two different keys never merge.
"""

from collections.abc import Callable

import torch

BLOCK_ROWS = 65536
"""Keys hashed or compared at once."""


def unique_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the first occurrence of each group of identical rows of rows (K, D), in order, and the groups' sizes."""
    return merge_hashed(row_hashes(rows), lambda index: rows[index])


def distinct_entries(gather: Callable[[torch.Tensor], torch.Tensor], num_entries: int, device: torch.device | str = "cpu",
                     block_rows: int = BLOCK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """The first occurrence (n,) int64 of each group of identical keys among num_entries, in order,
    and the groups' sizes (n,), streaming the keys (gather(rows) -> (len(rows), D)) in blocks."""
    hashes = torch.cat([row_hashes(gather(torch.arange(start, min(start + block_rows, num_entries), device=device)))
                        for start in range(0, num_entries, block_rows)])
    return merge_hashed(hashes, gather, block_rows)


def merge_hashed(hashes: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor], block_rows: int = BLOCK_ROWS
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """distinct_entries for keys whose row_hashes (K,) are known: (first occurrences (n,), group sizes (n,)).

    Keys are grouped by hash and every merge is verified exactly: a key that shares its hash with a
    different key (a collision) is kept on its own, so no two different keys ever merge.
    """
    num_entries = hashes.shape[0]
    _, group, counts = torch.unique(hashes, return_inverse=True, return_counts=True)
    first = _first_occurrences(group, counts.shape[0])
    duplicates = torch.nonzero(first[group] != torch.arange(num_entries, device=group.device)).squeeze(1)
    collided = [block[(gather(block) != gather(first[group[block]])).any(dim=1)] for block in duplicates.split(block_rows)]
    collided = torch.cat(collided) if collided else duplicates
    if collided.numel():
        group = group.clone()
        group[collided] = counts.shape[0] + torch.arange(collided.shape[0], device=group.device)
        _, group, counts = torch.unique(group, return_inverse=True, return_counts=True)
        first = _first_occurrences(group, counts.shape[0])
    order = torch.argsort(first)
    return first[order], counts[order]


def row_hashes(rows: torch.Tensor) -> torch.Tensor:
    """(K,) int64 hashes of the rows of rows (K, D): the bits of their projections on two fixed random directions.

    One matrix product in the rows' dtype; identical rows (-0.0 and 0.0 included) project alike.
    Should the product round a row differently in another block, the two copies merely stay
    unmerged (never a wrong merge).
    """
    generator = torch.Generator().manual_seed(0x5EED)
    directions = torch.rand(rows.shape[1], 2, generator=generator, dtype=torch.float64).to(rows.device, rows.dtype)
    # a -0.0 entry changes a projection only when every product is zero: + 0.0 folds that -0.0 into 0.0
    projections = rows @ directions + 0.0
    if projections.element_size() == 8:
        bits = projections.view(torch.int64)
        return bits[:, 0] ^ (bits[:, 1] * 0x9E3779B1)
    bits = projections.float().view(torch.int32).to(torch.int64)
    return (bits[:, 0] << 32) | (bits[:, 1] & 0xFFFFFFFF)


def _first_occurrences(inverse: torch.Tensor, num_unique: int) -> torch.Tensor:
    positions = torch.arange(inverse.shape[0], device=inverse.device)
    first = torch.full((num_unique,), inverse.shape[0], dtype=torch.int64, device=inverse.device)
    return first.scatter_reduce(0, inverse, positions, reduce="amin")
