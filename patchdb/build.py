"""Build a patch store (patchdb.store): every dictionary of a machine at every scale, merged and clustered.

For each patch size, each label (class-conditional) or all images, and each dictionary group of
the machine that is not same-location (patchdb.patches), the builder streams the group's patches
from the training images, merges identical ones (exact: their multiplicity is kept), clusters the
distinct ones with FAISS k-means (patchdb.index) when there are at least MIN_INDEXED_ENTRIES, and
writes the scale's file. Scales already on disk are kept, so an interrupted build resumes.
"""

import logging
import os
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from patchdb.data import Dataset
from patchdb.errors import PatchdbError
from patchdb.duplicates import distinct_entries
from patchdb.index import CLUSTER_SIZE, MIN_INDEXED_ENTRIES, REDUCED_DIMENSIONS, build_clusters
from patchdb.patches import PATCH_MACHINES, dictionary_groups, gather_sources, padding_mode, patch_windows
from patchdb.store import (STORE_FILE, PatchStore, StoredDictionary, StoreSettings, dictionary_key, read_settings, scale_file,
                           write_scale, write_settings)

log = logging.getLogger(__name__)

BYTES_PER_ENTRY = 8 * 4 + 4 * REDUCED_DIMENSIONS
"""Memory per patch while a dictionary is built: hash, group, order and sources (int64), and its reduced projection."""


def build_store(dataset: Dataset, machine: str, scales: list[int], out: str | Path, conditional: bool = False,
                labels: list[int] | None = None, cluster_size: int = CLUSTER_SIZE, min_indexed_entries: int = MIN_INDEXED_ENTRIES,
                merge_duplicates: bool = True, progress: bool = True) -> PatchStore:
    """Build (or resume) the store of machine's dictionaries for dataset at the patch sizes scales, in out.

    conditional: one set of dictionaries per class, for the classes labels (default: all of them);
    cluster_size: entries per k-means cluster; dictionaries with fewer than min_indexed_entries
    distinct patches are stored without clusters (the exact backend scans them).
    """
    if machine not in PATCH_MACHINES:
        raise PatchdbError(f"build-index indexes patch dictionaries: --machine must be one of {', '.join(PATCH_MACHINES)}, not {machine!r}")
    scales = sorted(set(scales))
    bad = [size for size in scales if size <= 0 or size % 2 == 0]
    if bad:
        raise PatchdbError(f"patch sizes {bad} are invalid: give positive odd sizes, e.g. --scales 3,5,7")
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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / STORE_FILE).exists():
        existing = read_settings(out)
        if existing != settings:
            changed = [name for name, value in vars(settings).items() if getattr(existing, name) != value]
            raise PatchdbError(f"{out} holds a store built with other settings ({', '.join(changed)} differ); "
                               f"choose another --out, or delete {out} to rebuild it")
    else:
        write_settings(out, settings, dataset)
    for temporary in out.glob(".*.tmp"):
        if not _process_alive(int(temporary.suffixes[-2].lstrip("."))):  # left by a build that was killed outright
            temporary.unlink(missing_ok=True)
    todo = [size for size in scales if not scale_file(out, size).is_file()]
    if len(todo) < len(scales):
        log.info("resuming %s: patch sizes %s are already built", out, sorted(set(scales) - set(todo)))
    for patch_size in tqdm(todo, desc="build-index", unit="scale", disable=not progress):
        _build_scale(dataset, settings, patch_size, out)
    return PatchStore(out)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _build_scale(dataset: Dataset, settings: StoreSettings, patch_size: int, out: Path) -> None:
    channels, height, width = settings.image_shape
    groups = [group for group in dictionary_groups(settings.machine, patch_size, height, width) if not group.same_location]
    label_sets = [None] if settings.labels is None else list(settings.labels)
    dictionaries = {}
    for label in label_sets:
        images = dataset.images if label is None else dataset.images[dataset.indices_of_label(label)]
        windows = patch_windows(images, patch_size, settings.padding)
        for group in groups:
            key = dictionary_key(label, group)
            key_pixels = group.key_pixels
            num_patches = images.shape[0] * len(key_pixels)
            log.info("%s at P=%d: %d patches of %d values, about %.2f GiB while building", key, patch_size, num_patches,
                     channels * patch_size**2, num_patches * BYTES_PER_ENTRY / 1024**3)

            def sources_of(rows, key_pixels=key_pixels):  # patch number image * len(key_pixels) + pixel index
                pixel = key_pixels[rows % len(key_pixels)]
                return torch.stack([rows // len(key_pixels), pixel // width, pixel % width], dim=1)

            def gather(rows, windows=windows, sources_of=sources_of):
                return gather_sources(windows, sources_of(rows))

            if settings.merge_duplicates:
                first, counts = distinct_entries(gather, num_patches)
            else:
                first, counts = torch.arange(num_patches), torch.ones(num_patches, dtype=torch.int64)
            sources = sources_of(first)
            if len(first) < settings.min_indexed_entries:
                dictionaries[key] = StoredDictionary(sources, counts, num_patches)
                continue
            order, clusters = build_clusters(lambda rows: gather(first[rows]), len(first), counts.to(torch.float32).log(),
                                             settings.cluster_size)
            quantizer = faiss.IndexFlatL2(clusters.centroids.shape[1])
            quantizer.add(np.ascontiguousarray(clusters.centroids.float().numpy()))
            dictionaries[key] = StoredDictionary(sources[order], counts[order], num_patches, clusters,
                                                 faiss.serialize_index(quantizer))
    write_scale(out, patch_size, dictionaries)
