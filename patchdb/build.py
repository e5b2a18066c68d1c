"""Build a patch store (patchdb.store): every dictionary of a machine at every scale, merged and clustered.

For each patch size, each label (class-conditional) or all images, and each dictionary group of
the machine that is not same-location (patchdb.patches), the builder streams the group's patches
from the training images once, hashing them and assigning them to k-means clusters (patchdb.index,
FAISS k-means on a sample) whose bounds it accumulates; identical patches are merged (exact: their
multiplicity is kept). Dictionaries of fewer than min_indexed_entries distinct patches are stored
without clusters. Each scale's file is written whole; scales already on disk are kept, so an
interrupted build resumes.
"""

import logging
from collections.abc import Callable
from pathlib import Path

import faiss
import torch
from tqdm.auto import tqdm

from patchdb.data import Dataset
from patchdb.errors import WRITE_PROBE, PatchdbError
from patchdb.files import folder_lock, process_alive, temporary_writer
from patchdb.duplicates import BLOCK_ROWS, merge_hashed, row_hashes, unique_rows
from patchdb.index import (CLUSTER_SIZE, KMEANS_SAMPLE_PER_CLUSTER, MIN_INDEXED_ENTRIES, Partition, Quantizer, flat_index,
                           number_of_clusters)
from patchdb.patches import (PATCH_MACHINES, check_patch_sizes, gather_patches, gather_sources, padding_mode,
                             patch_windows)
from patchdb.store import (STORE_FILE, PatchStore, StoredDictionary, StoreSettings, dictionary_key, read_settings,
                           scale_file, scale_mismatch, settings_differences, stored_groups, write_scale, write_settings)

log = logging.getLogger(__name__)

BYTES_PER_PATCH = 96
"""Memory per patch while a dictionary is built: its hash, cluster and merge bookkeeping (measured: see benchmarks/RESULTS.md)."""


def build_store(dataset: Dataset, machine: str, scales: list[int], out: str | Path, conditional: bool = False,
                labels: list[int] | None = None, cluster_size: int = CLUSTER_SIZE, min_indexed_entries: int = MIN_INDEXED_ENTRIES,
                merge_duplicates: bool = True, progress: bool = True,
                callback: Callable[[int], None] | None = None) -> PatchStore:
    """Build (or resume) the store of machine's dictionaries for dataset at the patch sizes scales, in out.

    conditional: one set of dictionaries per class, for the classes labels (default: all of them);
    cluster_size: patches (duplicates counted) per k-means cluster; dictionaries with fewer than min_indexed_entries
    distinct patches are stored without clusters (the exact backend scans them); callback(patch_size)
    is called each time a scale's file has been written.
    """
    if machine not in PATCH_MACHINES:
        raise PatchdbError(f"build-index indexes patch dictionaries: --machine must be one of {', '.join(PATCH_MACHINES)}, "
                           f"not {machine!r}")
    scales = sorted(set(scales))
    bad = [size for size in scales if size <= 0 or size % 2 == 0]
    if bad:
        raise PatchdbError(f"patch sizes {bad} are invalid: give positive odd sizes, e.g. --scales 3,5,7")
    check_patch_sizes(scales, machine, dataset.images.shape[1:])
    if conditional and dataset.labels is None:
        raise PatchdbError(f"--conditional needs class labels but the data set {dataset.name!r} has none")
    if conditional:
        present = [int(label) for label in torch.unique(dataset.labels)]
        absent = sorted(set(labels or ()) - set(present))
        if absent:
            raise PatchdbError(f"labels {absent} do not occur in the data set {dataset.name} (it has {present})")
        labels = tuple(sorted(set(labels))) if labels else tuple(present)
    elif labels is not None:
        raise PatchdbError("labels select the classes of a conditional store: pass conditional=True (--conditional)")
    settings = StoreSettings(fingerprint=dataset.fingerprint, dataset=dataset.name, num_images=len(dataset),
                             image_shape=tuple(dataset.images.shape[1:]), machine=machine, padding=padding_mode(machine),
                             scales=tuple(scales), labels=labels, cluster_size=cluster_size,
                             min_indexed_entries=min_indexed_entries, merge_duplicates=merge_duplicates)
    outputs = (STORE_FILE, *(scale_file(Path(), size).name for size in scales))
    with folder_lock(out, outputs=outputs) as out:  # held for the whole build, so that no other command writes there meanwhile
        if (out / STORE_FILE).exists():
            existing = read_settings(out)
            differences = settings_differences(existing, settings, ("stored", "asked"))
            if differences is not None:
                raise PatchdbError(f"{out} holds a store built with other settings ({differences}); "
                                   f"choose another --out, or delete {out} to rebuild it")
            settings = existing  # the same build, its data perhaps named otherwise: its scale files carry the stored settings
        else:
            write_settings(out, settings, dataset)
        for temporary in (path for name in (*outputs, WRITE_PROBE) for path in out.glob(f".{name}.*.tmp")):  # ours only
            writer = temporary_writer(temporary)
            if writer is not None and not process_alive(writer):  # left by a command that was killed outright
                temporary.unlink(missing_ok=True)
        todo = [size for size in scales if _missing_or_stale(out, size, settings)]
        if len(todo) < len(scales):
            log.info("resuming %s: patch sizes %s are already built", out, sorted(set(scales) - set(todo)))
        for patch_size in tqdm(todo, desc="build-index", unit="scale", disable=not progress):
            _build_scale(dataset, settings, patch_size, out)
            if callback is not None:
                callback(patch_size)
        return PatchStore(out)


def _missing_or_stale(out: Path, patch_size: int, settings: StoreSettings) -> bool:
    """Whether scale-PP.h5 of out must be built: it is absent, or a build with other settings left it."""
    if not scale_file(out, patch_size).is_file():
        return True
    problem = scale_mismatch(out, patch_size, settings)
    if problem:
        log.warning("rebuilding patch size %d: %s", patch_size, problem)
    return problem is not None


def _build_scale(dataset: Dataset, settings: StoreSettings, patch_size: int, out: Path) -> None:
    channels = settings.image_shape[0]
    groups = stored_groups(settings, patch_size)
    label_sets = [None] if settings.labels is None else list(settings.labels)
    dictionaries = {}
    for label in label_sets:
        images = dataset.images if label is None else dataset.images[dataset.indices_of_label(label)]
        windows = patch_windows(images, patch_size, settings.padding)
        for group in groups:
            key = dictionary_key(label, group)
            num_patches = images.shape[0] * len(group.key_pixels)
            log.info("%s at P=%d: %d patches of %d values, about %.2f GiB while building", key, patch_size, num_patches,
                     channels * patch_size**2, num_patches * BYTES_PER_PATCH / 1024**3)
            dictionaries[key] = _build_dictionary(windows, group.key_pixels, settings)
    write_scale(out, patch_size, dictionaries, settings)


def _build_dictionary(windows: torch.Tensor, key_pixels: torch.Tensor, settings: StoreSettings) -> StoredDictionary:
    """Merge and cluster the patches centred at key_pixels (K,) of every image of windows (a patch_windows view).

    One streamed pass over the patches, image block by image block, hashes them (for merging) and
    assigns them to clusters, whose bounds it accumulates (patchdb.index.Partition). Patch number
    n * K + k is the one centred at key_pixels[k] of image n.
    """
    num_images, per_image, width = windows.shape[0], len(key_pixels), windows.shape[3]
    num_patches = num_images * per_image

    def sources_of(rows):  # (image, row, column) of patches rows
        pixel = key_pixels[rows % per_image]
        return torch.stack([rows // per_image, pixel // width, pixel % width], dim=1)

    def gather(rows):
        return gather_sources(windows, sources_of(rows))

    def image_blocks():  # (patch numbers (n,), patches (n, D)) of every patch, a block of images at a time
        images_per_block = max(1, BLOCK_ROWS // per_image)
        for start in range(0, num_images, images_per_block):
            stop = min(start + images_per_block, num_images)
            yield torch.arange(start * per_image, stop * per_image), gather_patches(windows[start:stop], key_pixels).flatten(0, 1)

    partition = None
    if num_patches >= settings.min_indexed_entries:
        generator = torch.Generator().manual_seed(0)
        num_clusters = number_of_clusters(num_patches, settings.cluster_size)
        sample = gather(torch.randperm(num_patches, generator=generator)[:num_clusters * KMEANS_SAMPLE_PER_CLUSTER])
        partition = Partition(Quantizer.fit(sample[unique_rows(sample)[0]], num_clusters))
        assignment = torch.empty(num_patches, dtype=torch.int32)
    hashes = torch.empty(num_patches, dtype=torch.int64) if settings.merge_duplicates else None
    if partition is not None or hashes is not None:
        for rows, keys in image_blocks():
            if hashes is not None:
                hashes[rows] = row_hashes(keys)
            if partition is not None:
                assignment[rows] = partition.add(rows, keys).to(torch.int32)
    if hashes is not None:
        first, counts = merge_hashed(hashes, gather)
        del hashes
    else:
        first, counts = torch.arange(num_patches), torch.ones(num_patches, dtype=torch.int64)
    sources = sources_of(first)
    if partition is None or len(first) < settings.min_indexed_entries:
        return StoredDictionary(sources, counts, num_patches)
    order, clusters = partition.finish(assignment[first].to(torch.int64), counts.to(torch.float32).log(), first)
    return StoredDictionary(sources[order], counts[order], num_patches, clusters,
                            faiss.serialize_index(flat_index(clusters.centroids)))
