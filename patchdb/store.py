"""The patch store: a machine's indexed patch dictionaries on disk (HDF5), built by ``patchdb build-index``.

A store is a folder:

- ``store.h5``: metadata (the ``settings`` attribute: StoreSettings as JSON) and the preprocessed
  training images (N, C, H, W) float32 (plus labels). Patches are not stored (C * P * P floats per entry,
  tens of GB at 60,000 images): a run gathers them from its own training images, which must have the
  store's fingerprint, and PatchStore.faiss_index from the images kept here.
- ``scale-PP.h5`` for each patch size P: the settings it was built with (the same attribute as
  ``store.h5``'s, so that a scale file left by another build is never taken for this one's) and one HDF5
  group per dictionary, ``label-L/<boundary class>``
  (``label-all`` unconditionally), holding
    ``sources`` (n, 3) int32: training image (index within the label's images), centre row, column
        of each distinct patch (its first occurrence), sorted by cluster;
    ``multiplicity`` (n,) int32: how many identical patches each one stands for;
    and, for dictionaries of at least min_indexed_entries distinct patches, the inverted file:
    ``offsets`` (C + 1,) int64, ``centroids`` (C, D) float32, ``radii`` (C,) float32, ``medoids``
    (C,) int64 (an entry of each cluster near its centre) and
    ``coarse_quantizer`` (bytes): the FAISS IndexFlatL2 over the centroids (faiss.deserialize_index), with
        the inverted file the coarse level of a FAISS IVF index (PatchStore.faiss_index).
  Same-location dictionaries (LS, bbELS corners: one patch per training image) are not stored.

Damage is detected: the inverted file's arrays, read whole at every load, carry HDF5's Fletcher-32 checksum, which
every read verifies. ``sources`` and ``multiplicity`` stay contiguous and unfiltered, so that a run can map them and
read only the clusters it scores; each carries its CRC-32 as the attribute ``crc32``, which PatchStore.verify
(``patchdb info --verify``) checks. The images in ``store.h5`` are checked against the store's fingerprint.

Every file is written under a temporary name and renamed when complete, so a part that exists is
whole; an interrupted build resumes from the scales already written.
"""

import contextlib
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

import patchdb
from patchdb.data import Dataset, make_dataset
from patchdb.engine import PatchDictionary
from patchdb.errors import PatchdbError, check_readable
from patchdb.files import atomic_path, lock_holder
from patchdb.index import (ClusteredDictionary, EntryClusters, GatheredEntries, PatchCounts, cluster_log_mass, squared_norm_maps,
                           take_entries)
from patchdb.patches import DictionaryGroup, centre_indices, dictionary_groups, patch_windows
from patchdb.settings import differing_keys

FORMAT_VERSION = 4  # 4: checksums (the module's docstring)
STORE_FILE = "store.h5"
MAPPED_ARRAYS = ("sources", "multiplicity")  # unfiltered, with a crc32 attribute
CRC_BLOCK_BYTES = 1 << 26


@dataclass(frozen=True)
class StoreSettings:
    """What a store was built from and for; a run must match all of it (see check_run).

    labels: the classes with their own dictionaries (conditional), or None (one unconditional set).
    """

    fingerprint: str
    dataset: str
    num_images: int
    image_shape: tuple[int, ...]
    machine: str
    padding: str
    scales: tuple[int, ...]
    labels: tuple[int, ...] | None
    cluster_size: int
    min_indexed_entries: int
    merge_duplicates: bool
    preprocessing: str = "resized to 32x32 (bilinear), scaled to [-1, 1]"
    format_version: int = FORMAT_VERSION
    patchdb_version: str = patchdb.__version__

    @property
    def conditional(self) -> bool:
        return self.labels is not None


def scale_file(store: Path, patch_size: int) -> Path:
    return Path(store) / f"scale-{patch_size:02d}.h5"


def dictionary_key(label: int | None, group: DictionaryGroup) -> str:
    """HDF5 path of a dictionary inside its scale file."""
    return f"label-{'all' if label is None else label}/{group.boundary_class}"


@contextlib.contextmanager
def atomic_h5(path: Path) -> Iterator[h5py.File]:
    """An HDF5 file open for writing under a temporary name, renamed to path only when the block succeeds
    and the file is on disk (patchdb.files.atomic_path)."""
    with atomic_path(path) as temporary, h5py.File(temporary, "w") as file:
        yield file


H5_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError)
"""What h5py and the readers of a store raise on a damaged or foreign file (RuntimeError: broken HDF5 metadata, such as
'bad local heap signature'; TypeError: an attribute of another type). torch's allocation failures are RuntimeErrors
too: _damaged tells them apart."""


def _damaged(error: Exception) -> bool:
    """Whether error (one of H5_ERRORS) says a file is damaged, not that torch could not allocate memory."""
    return not (isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error))


def _settings_json(settings: StoreSettings) -> str:
    return json.dumps(asdict(settings))


def write_settings(store: Path, settings: StoreSettings, dataset: Dataset) -> None:
    """Write store.h5: the settings as attributes, and the preprocessed images and labels."""
    with atomic_h5(Path(store) / STORE_FILE) as file:
        file.attrs["settings"] = _settings_json(settings)
        file.create_dataset("images", data=dataset.images.numpy())
        if dataset.labels is not None:
            file.create_dataset("labels", data=dataset.labels.numpy())


def read_settings(store: Path) -> StoreSettings:
    """The settings of the store at store; a clear error when it is absent, partial or corrupt."""
    path = Path(store) / STORE_FILE
    if path.is_dir():
        raise PatchdbError(f"{store} is not a patch store: its {STORE_FILE} is a folder, not the file that `patchdb "
                           "build-index` writes; give the folder of a store that it built")
    if not path.is_file():
        raise PatchdbError(f"{store} is not a patch store (no {STORE_FILE}); build one with `patchdb build-index --out {store}`")
    check_readable(path)
    try:
        with h5py.File(path, "r") as file:
            raw = json.loads(file.attrs["settings"])
        version = raw.get("format_version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise ValueError(f"its format_version is {version!r}")
        settings = _settings_from(raw) if version == FORMAT_VERSION else None
    except (*H5_ERRORS, AttributeError) as error:
        raise PatchdbError(f"{path} is corrupt or not a patchdb store ({error}); delete {store} and build it again") from None
    if settings is None:
        raise PatchdbError(f"{store} has store format {version}, this patchdb reads format {FORMAT_VERSION}; delete {store} "
                           "and rebuild it with the `patchdb build-index` command that made it (or build into another --out)")
    return settings


def _settings_from(raw: dict) -> StoreSettings:
    """StoreSettings from their JSON object; ValueError when it is not one of them (a missing, extra or mistyped value)."""
    try:
        raw = {**raw, "image_shape": tuple(raw["image_shape"]), "scales": tuple(raw["scales"])}
        raw["labels"] = None if raw["labels"] is None else tuple(raw["labels"])
        settings = StoreSettings(**raw)
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"its settings are damaged: {error!r}") from None
    integers = (settings.num_images, settings.cluster_size, settings.min_indexed_entries, settings.format_version,
                *settings.image_shape, *settings.scales, *(settings.labels or ()))
    texts = (settings.fingerprint, settings.dataset, settings.machine, settings.padding, settings.preprocessing,
             settings.patchdb_version)
    if not (all(isinstance(value, int) and not isinstance(value, bool) for value in integers)
            and all(isinstance(value, str) for value in texts) and isinstance(settings.merge_duplicates, bool)):
        raise ValueError("its settings are damaged: a value of the wrong type")
    return settings


def settings_differences(first: StoreSettings, second: StoreSettings, names: tuple[str, str]) -> str | None:
    """How two settings differ, each side named by names, e.g. "scales (3, 5) stored, (3, 5, 7) asked" for names
    ("stored", "asked"), or None where they do not (the data set's spec only where the data differ: the same images,
    by fingerprint, may be named in several ways)."""
    keys = [key for key in differing_keys(vars(first), vars(second))
            if not (key == "dataset" and first.fingerprint == second.fingerprint)]
    return "; ".join(f"{key} {getattr(first, key)!r} {names[0]}, {getattr(second, key)!r} {names[1]}" for key in keys) or None


def scale_mismatch(store: Path, patch_size: int, settings: StoreSettings) -> str | None:
    """Why the existing scale-PP.h5 of store is not a part of a store with settings (None when it is)."""
    path = scale_file(store, patch_size)
    check_readable(path)
    try:
        with h5py.File(path, "r") as file:
            built = _settings_from(json.loads(file.attrs["settings"]))
            written_size = int(file.attrs["patch_size"])
            absent = [key for key in stored_keys(settings, patch_size) if key not in file]
    except H5_ERRORS as error:
        return f"{path.name} is corrupt or from an older patchdb ({error})"
    if written_size != patch_size:
        return f"{path.name} holds patch size {written_size}, not {patch_size} (a renamed file)"
    differences = settings_differences(built, settings, (f"in {path.name}", f"in {STORE_FILE}"))
    if differences is not None:
        return f"{path.name} was built with other settings ({differences})"
    return f"{path.name} lacks the dictionaries {', '.join(absent)}" if absent else None


def stored_groups(settings: StoreSettings, patch_size: int) -> list[DictionaryGroup]:
    """The boundary classes of the machine of a store with settings whose dictionaries scale-PP.h5 holds: those that
    are not same-location (those are gathered from the images, not stored)."""
    _, height, width = settings.image_shape
    return [group for group in dictionary_groups(settings.machine, patch_size, height, width) if not group.same_location]


def stored_keys(settings: StoreSettings, patch_size: int) -> list[str]:
    """The HDF5 paths (dictionary_key) of the dictionaries in scale-PP.h5 of a store with settings: every label's
    dictionary of every stored group."""
    return [dictionary_key(label, group) for label in (settings.labels or (None,))
            for group in stored_groups(settings, patch_size)]


@dataclass
class StoredDictionary:
    """One dictionary as the store keeps it.

    sources: (n, 3) int64 (image index within the label's images, centre row, centre column) of each
    distinct patch, in cluster order; multiplicity: (n,) int64; num_patches: patches before merging;
    clusters and coarse_quantizer (a serialized FAISS index over the centroids): None when not indexed.
    """

    sources: torch.Tensor
    multiplicity: torch.Tensor
    num_patches: int
    clusters: EntryClusters | None = None
    coarse_quantizer: np.ndarray | None = None


def write_scale(store: Path, patch_size: int, dictionaries: dict[str, StoredDictionary], settings: StoreSettings) -> None:
    """Write scale-PP.h5 with every dictionary of one patch size (HDF5 key -> dictionary) of a store with settings."""
    with atomic_h5(scale_file(store, patch_size)) as file:
        file.attrs["settings"] = _settings_json(settings)
        file.attrs["patch_size"] = patch_size
        for key, stored in dictionaries.items():
            group = file.create_group(key)
            group.attrs["num_patches"] = stored.num_patches
            for name, values in (("sources", stored.sources), ("multiplicity", stored.multiplicity)):
                values = np.ascontiguousarray(values.to(torch.int32).numpy())
                group.create_dataset(name, data=values).attrs["crc32"] = zlib.crc32(values)
            if stored.clusters is not None:
                for name, values in (("offsets", stored.clusters.offsets.numpy()),
                                     ("centroids", stored.clusters.centroids.float().numpy()),
                                     ("radii", stored.clusters.radii.float().numpy()),
                                     ("medoids", stored.clusters.medoids.numpy()), ("coarse_quantizer", stored.coarse_quantizer)):
                    group.create_dataset(name, data=values, fletcher32=True)


class PatchStore:
    """A built store, opened for sampling: checks runs against its settings and loads dictionaries."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.settings = read_settings(self.path)
            missing = [size for size in self.settings.scales if not scale_file(self.path, size).is_file()]
            if missing:
                raise PatchdbError(f"the store {self.path} is incomplete: patch sizes {missing} were never written (the "
                                   f"build was interrupted); rerun the same `patchdb build-index` command to resume it")
            mismatched = [problem for size in self.settings.scales
                          if (problem := scale_mismatch(self.path, size, self.settings))]
            if mismatched:
                raise PatchdbError(f"the store {self.path} has scale files to rebuild: {'; '.join(mismatched)}; rerun the `patchdb "
                                   f"build-index` command that made {STORE_FILE} to rebuild those scales")
        except PatchdbError:
            holder = lock_holder(self.path)  # a build in progress: not interrupted, not to be resumed
            if holder is None:
                raise
            raise PatchdbError(f"the store {self.path} is being written by another patchdb command (pid {holder}), which "
                               "holds its folder; wait for it to finish") from None

    def check_run(self, dataset: Dataset, machine: str, scales: list[int] | None = None, conditional: bool | None = None,
                  labels: torch.Tensor | None = None) -> None:
        """Refuse a run whose data, machine, scales or conditioning differ from the store's, saying which.

        scales: the run's patch sizes; conditional: whether it is class-conditional; labels: its
        labels (N,) when conditional. None leaves that part unchecked.
        """
        settings, problems = self.settings, []
        if dataset.fingerprint != settings.fingerprint:
            problems.append(f"its data fingerprint is {settings.fingerprint[:12]} ({settings.dataset}, {settings.num_images} "
                            f"images) but this run's data ({dataset.name}, {len(dataset)} images) has {dataset.fingerprint[:12]}")
        if machine != settings.machine:
            problems.append(f"it was built for the {settings.machine} machine, not {machine}")
        missing = sorted(set(scales or ()) - set(settings.scales))
        if missing:
            problems.append(f"it has no dictionaries for patch sizes {missing} (it holds {list(settings.scales)})")
        if conditional is not None and conditional != settings.conditional:
            problems.append(f"it holds {'class-conditional' if settings.conditional else 'unconditional'} dictionaries but "
                            f"this run is {'class-conditional' if conditional else 'unconditional'}")
        elif conditional and labels is not None:
            absent = sorted(set(labels.tolist()) - set(settings.labels))
            if absent:
                problems.append(f"it has no dictionaries for labels {absent}")
        if problems:
            raise PatchdbError(f"the store {self.path} does not match this run: " + "; ".join(problems)
                               + ". Build a matching store with `patchdb build-index`.")

    def dictionaries(self, patch_size: int, label: int | None, groups: list[DictionaryGroup], images: torch.Tensor,
                     memory_budget: int) -> list[ClusteredDictionary | PatchDictionary | None]:
        """The stored dictionary of every group at patch_size (None for same-location groups, which are not stored).

        images: (M, C, H, W) the label's training images in the machine's dtype and device; each
        patch is gathered from them by its source. Unclustered dictionaries always hold their patches in
        memory; clustered ones too while the total held fits memory_budget (bytes), and beyond it gather
        them at each access.
        """
        windows = patch_windows(images, patch_size, self.settings.padding)  # (M, C, H, W, P, P)
        norm_maps = squared_norm_maps(windows)
        centre = centre_indices(images.shape[1], patch_size).to(images.device)
        patch_bytes = images.shape[1] * patch_size**2 * images.element_size()
        loaded, held = [], 0
        try:
            with h5py.File(scale_file(self.path, patch_size), "r") as file:
                for group in groups:
                    if group.same_location:
                        loaded.append(None)
                        continue
                    node = file[dictionary_key(label, group)]
                    in_memory = "offsets" not in node or held + node["sources"].shape[0] * patch_bytes <= memory_budget
                    held += node["sources"].shape[0] * patch_bytes if in_memory else 0
                    loaded.append(_read_dictionary(node, windows, norm_maps, centre, in_memory))
        except H5_ERRORS as error:  # ValueError: also a file too short for what it maps
            if not _damaged(error):
                raise
            raise PatchdbError(f"{scale_file(self.path, patch_size)} is corrupt or lacks a dictionary ({error}); "
                               f"delete it and rerun `patchdb build-index` to rebuild that scale") from None
        return loaded

    def training_data(self) -> Dataset:
        """The preprocessed training images and labels the store was built from (kept in store.h5)."""
        path = self.path / STORE_FILE
        try:
            with h5py.File(path, "r") as file:
                dataset = make_dataset(torch.from_numpy(file["images"][...]),
                                       torch.from_numpy(file["labels"][...]) if "labels" in file else None,
                                       self.settings.dataset)
        except (*H5_ERRORS, PatchdbError) as error:  # PatchdbError: images or labels that are not a data set's
            if not _damaged(error):
                raise
            raise PatchdbError(f"the images in {path} are damaged ({error}); delete {self.path} and build it again") from None
        if dataset.fingerprint != self.settings.fingerprint:
            raise PatchdbError(f"the images in {path} do not have the store's fingerprint: the file is damaged; "
                               f"delete {self.path} and build it again")
        return dataset

    def faiss_index(self, patch_size: int, boundary_class: str = "interior", label: int | None = None
                    ) -> tuple[faiss.IndexIVFFlat, torch.Tensor]:
        """One stored dictionary (of class label in a conditional store; label None in an unconditional one) as a FAISS
        IVF index, for querying a store with FAISS directly: the stored coarse quantizer over its cluster centroids,
        and in each cluster's inverted list its distinct patches (C * P * P float32 each, ids 0..n-1 in stored order).
        Returns the index and sources (n, 3) int64: the training image (index in the data set), centre row and column
        of entry id. A patch machine ranks a noisy patch q at alpha_bar by its distance from q / sqrt(alpha_bar). The
        patches are held in memory: n * C * P * P * 4 bytes.
        """
        if patch_size not in self.settings.scales:
            raise PatchdbError(f"the store {self.path} has no patch size {patch_size} (it holds {list(self.settings.scales)})")
        labels = self.settings.labels
        if labels is None and label is not None:
            raise PatchdbError(f"the store {self.path} is unconditional: it has one set of dictionaries, of all images, "
                               f"and none for label {label}; pass label=None, or build a class-conditional store with "
                               "`patchdb build-index --conditional`")
        if labels is not None and label not in labels:
            held = ", ".join(map(str, labels))
            raise PatchdbError(f"the store {self.path} is class-conditional and has no dictionaries "
                               + ("of all images" if label is None else f"for label {label}")
                               + f" (it holds labels {held}); pass one of them as label")
        dataset = self.training_data()
        indices = torch.arange(len(dataset)) if label is None else dataset.indices_of_label(label)
        groups = {group.boundary_class: group
                  for group in dictionary_groups(self.settings.machine, patch_size, *dataset.images.shape[2:])}
        indexed = {name for name, group in groups.items() if not group.same_location}
        if boundary_class not in indexed:
            raise PatchdbError(f"{self.settings.machine} at patch size {patch_size} has no indexed dictionary "
                               f"{boundary_class!r}; its indexed ones are {', '.join(sorted(indexed)) or 'none'}")
        (dictionary,) = self.dictionaries(patch_size, label, [groups[boundary_class]],
                                          dataset.images[indices], memory_budget=0)
        if not isinstance(dictionary, ClusteredDictionary):
            raise PatchdbError(f"the {boundary_class!r} dictionary at patch size {patch_size} has fewer than "
                               f"{self.settings.min_indexed_entries} distinct patches, so it was stored without clusters")
        with h5py.File(scale_file(self.path, patch_size), "r") as file:
            quantizer = faiss.deserialize_index(file[dictionary_key(label, groups[boundary_class])]["coarse_quantizer"][...])
        patches = np.ascontiguousarray(take_entries(dictionary.entries, slice(None)).keys.float().numpy())
        index = faiss.IndexIVFFlat(quantizer, patches.shape[1], len(dictionary.clusters))
        ids = np.arange(len(patches), dtype=np.int64)
        clusters = np.repeat(np.arange(len(dictionary.clusters), dtype=np.int64), dictionary.clusters.sizes.numpy())
        index.add_core(len(patches), faiss.swig_ptr(patches), faiss.swig_ptr(ids), faiss.swig_ptr(clusters))
        sources = dictionary.entries.sources.long()
        return index, torch.cat([indices[sources[:, :1]], sources[:, 1:]], dim=1)

    def verify(self, progress: bool = True) -> None:
        """Read the whole store and check every checksum (the module's docstring) and the stored images' fingerprint;
        a PatchdbError naming each damaged scale file (or store.h5) and how to rebuild it."""
        self.training_data()
        damaged = []
        for size in tqdm(self.settings.scales, desc="verify", unit="scale", disable=not progress):
            path = scale_file(self.path, size)
            patch_dimension = self.settings.image_shape[0] * size**2
            try:
                with h5py.File(path, "r") as file:
                    nodes = []
                    file.visititems(lambda name, node: nodes.append(node) if _is_dictionary(node) else None)
                    problems = [f"it lacks the dictionary {key}" for key in stored_keys(self.settings, size) if key not in file]
                    problems += [problem for node in nodes for problem in _damage(node, patch_dimension)]
            except H5_ERRORS as error:  # OSError: also a Fletcher-32 mismatch
                problems = [str(error)]
            if problems:
                damaged.append(f"{path.name} ({'; '.join(problems)})")
        if damaged:
            raise PatchdbError(f"the store {self.path} is damaged: {', '.join(damaged)}; delete those files and rerun "
                               f"the `patchdb build-index` command that made the store: it rebuilds only what is missing")

    def describe(self) -> dict:
        """Settings, and per scale the file size and each dictionary's patches, distinct entries and clusters."""
        scales = {}
        for size in self.settings.scales:
            path = scale_file(self.path, size)
            dictionaries = {}

            def visit(name, node, dictionaries=dictionaries):
                if _is_dictionary(node):
                    dictionaries[name] = {"patches": int(node.attrs["num_patches"]), "entries": node["sources"].shape[0],
                                          "clusters": node["radii"].shape[0] if "radii" in node else 0}
            try:
                with h5py.File(path, "r") as file:
                    file.visititems(visit)
            except H5_ERRORS as error:
                raise PatchdbError(f"{path} is corrupt ({error}); delete it and rerun the `patchdb build-index` command "
                                   "that made the store: it rebuilds only what is missing") from None
            scales[size] = {"bytes": path.stat().st_size, "dictionaries": dictionaries}
        return {"path": str(self.path), "settings": asdict(self.settings),
                "store_bytes": (self.path / STORE_FILE).stat().st_size, "scales": scales}

    def summary(self) -> str:
        """describe() as the lines `patchdb build-index` and `patchdb info` print."""
        description = self.describe()
        settings = description["settings"]
        lines = [f"store {description['path']}",
                 f"  data: {settings['dataset']}, {settings['num_images']} images of shape {settings['image_shape']}, "
                 f"fingerprint {settings['fingerprint'][:16]}",
                 f"  preprocessing: {settings['preprocessing']}",
                 f"  machine: {settings['machine']} ({settings['padding']} padding), "
                 + (f"class-conditional, labels {', '.join(map(str, settings['labels']))}" if settings["labels"] is not None
                    else "unconditional"),
                 f"  index: k-means clusters of about {settings['cluster_size']} patches (FAISS) for dictionaries of at least "
                 f"{settings['min_indexed_entries']} distinct patches, duplicates "
                 + ("merged" if settings["merge_duplicates"] else "kept"),
                 f"  patchdb {settings['patchdb_version']}, store format {settings['format_version']}",
                 f"  images: {description['store_bytes'] / 1024**2:.1f} MiB"]
        total = description["store_bytes"]
        for size, scale in description["scales"].items():
            total += scale["bytes"]
            dictionaries = scale["dictionaries"].values()
            lines.append(f"  P={size}: {scale['bytes'] / 1024**2:.1f} MiB, {len(dictionaries)} dictionaries, "
                         f"{sum(d['patches'] for d in dictionaries)} patches, "
                         f"{sum(d['entries'] for d in dictionaries)} distinct, "
                         f"{sum(d['clusters'] for d in dictionaries)} clusters"
                         + ("" if dictionaries else " (every pixel's dictionary is same-location at this size: gathered from "
                                                    "the images and scored exactly, nothing to index)"))
        lines.append(f"  total: {total / 1024**2:.1f} MiB")
        return "\n".join(lines)


def _is_dictionary(node: h5py.Group | h5py.Dataset) -> bool:
    return isinstance(node, h5py.Group) and "sources" in node


def _damage(node: h5py.Group, patch_dimension: int) -> list[str]:
    """What is wrong with one stored dictionary of patches of patch_dimension = C * P * P values: arrays that do not
    fit together, or a checksum that does not match (reading each filtered array whole verifies its Fletcher-32)."""
    try:
        _check_shapes(node, patch_dimension)
    except ValueError as error:
        return [str(error)]
    for name in node:
        if name not in MAPPED_ARRAYS:
            node[name][...]
    problems = []
    for name in MAPPED_ARRAYS:
        array, crc = node[name], 0
        rows = max(1, CRC_BLOCK_BYTES // (array.dtype.itemsize * int(np.prod(array.shape[1:]))))
        for start in range(0, array.shape[0], rows):
            crc = zlib.crc32(array[start:start + rows], crc)  # h5py reads a block as a new C-contiguous array
        if crc != array.attrs["crc32"]:
            problems.append(f"{node.name}/{name} does not match its checksum")
    return problems


def stored_array(dataset: h5py.Dataset) -> np.ndarray:
    """A stored dataset's values: mapped from the file (copy on write) where they lie in it contiguously and
    uncompressed, as the store writes them, else read. A mapped page is read when first touched: a run gathers the
    sources of the clusters it scores, a fraction of tens of millions of entries at 60,000 images, and reading them
    all cost about a second per scale."""
    offset = dataset.id.get_offset()
    if dataset.chunks is not None or offset is None or dataset.size == 0:
        return dataset[...]
    return np.memmap(dataset.file.filename, dtype=dataset.dtype, mode="c", offset=offset, shape=dataset.shape)


def _read_dictionary(node: h5py.Group, windows: torch.Tensor, norm_maps: torch.Tensor, centre: torch.Tensor, in_memory: bool
                     ) -> ClusteredDictionary | PatchDictionary:
    _check_shapes(node, windows.shape[1] * windows.shape[-1] ** 2)
    device, dtype = windows.device, windows.dtype
    sources = torch.from_numpy(stored_array(node["sources"])).to(device)  # int32 as stored: int64 would double the largest array
    multiplicity = stored_array(node["multiplicity"])
    counts = PatchCounts.from_multiplicity(node["multiplicity"])  # read in blocks: faulting in all the mapped pages cost more
    entries = GatheredEntries(windows, norm_maps, sources, torch.from_numpy(multiplicity), centre, counts.merged)
    if in_memory:
        entries = take_entries(entries, slice(None))
    if "offsets" not in node:
        return entries
    offsets = torch.from_numpy(node["offsets"][...]).to(device)
    clusters = EntryClusters(offsets, torch.from_numpy(node["centroids"][...]).to(device=device, dtype=dtype),
                             torch.from_numpy(node["radii"][...]).to(device=device, dtype=dtype),
                             cluster_log_mass(offsets, counts, dtype),
                             torch.from_numpy(node["medoids"][...]).to(device))
    return ClusteredDictionary(entries, clusters, counts)


def _check_shapes(node: h5py.Group, patch_dimension: int) -> None:
    """ValueError naming what is wrong where a stored dictionary's arrays do not fit together (a damaged file), for
    patches of patch_dimension = C * P * P values; the entries' sources are checked where they are gathered
    (patchdb.index), not read here in full."""
    num_entries = node["sources"].shape[0]
    problems = [] if node["sources"].shape == (num_entries, 3) else [f"sources of shape {node['sources'].shape}"]
    if node["multiplicity"].shape != (num_entries,):
        problems.append(f"{node['multiplicity'].shape[0]} multiplicities for {num_entries} entries")
    if "offsets" in node:
        offsets = node["offsets"][...]
        num_clusters = len(offsets) - 1
        if num_clusters < 1 or offsets[0] != 0 or offsets[-1] != num_entries or (np.diff(offsets) < 0).any():
            problems.append(f"cluster offsets that do not run from 0 up to the {num_entries} entries")
        for name, shape in (("centroids", (num_clusters, patch_dimension)), ("radii", (num_clusters,)),
                            ("medoids", (num_clusters,))):
            if node[name].shape != shape:
                problems.append(f"{name} of shape {node[name].shape}, not {shape}")
        medoids = node["medoids"][...]
        if len(medoids) and (medoids.min() < 0 or medoids.max() >= num_entries):
            problems.append(f"medoids outside the {num_entries} entries")
        if not (node["radii"][...] >= 0).all():  # a negative radius would certify queries that it should not
            problems.append("cluster radii that are negative or not numbers")
        if not np.isfinite(node["centroids"][...]).all():
            problems.append("centroids that are not finite")
    if problems:
        raise ValueError(f"{node.name} has " + ", ".join(problems))
