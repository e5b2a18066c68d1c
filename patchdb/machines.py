"""The analytic score machines: ideal (IS), equivariant (ES), local (LS), equivariant local (ELS)
and boundary-broken ELS (bbELS), all on one engine (patchdb.engine).

Every machine computes a posterior over training entries and returns, per pixel, the posterior
mean of the entries' centre pixels: ``Posterior.mean`` is the machine's estimate of x_0, and the
score is ``(sqrt(alpha_bar) * mean - x) / beta`` (paper eq. for M_t). What differs is the
dictionary each pixel sees:

- IS: whole training images (one posterior per sample).
- ES: every circular translate of every training image; FFT cross-correlation gives all
  translates' logits at once.
- LS / ELS / bbELS: patches, with a dictionary per pixel group (patchdb.patches).

Class-conditional use: pass ``labels``; each sample then sees only its class's training images.
A machine is a score model: ``machine(x, t, labels=None, patch_size=None) -> score``.
"""

import math
import time
from dataclasses import dataclass

import torch

from patchdb.data import Dataset, label_groups
from patchdb.engine import (DEFAULT_MEMORY_BUDGET, ExactBackend, PatchDictionary, PosteriorSummary, RegionKeys,
                            SoftmaxAccumulator, logit_chunk_bytes)
from patchdb.errors import PatchdbError
from patchdb.patches import (PATCH_MACHINES, centre_indices, check_patch_size, dictionary_groups, extracted_bytes_per_image,
                             gather_patches, padding_mode, patch_windows, same_location_regions)
from patchdb.schedule import alpha_bar
from patchdb.store import PatchStore
from patchdb.topk import PATHS, TopKBackend
from patchdb.windows import LaneImages, lane_image_bytes, lanes, window_posterior, window_tasks

MACHINES = ("is", "es", "ls", "els", "bbels")


@dataclass
class Posterior:
    """A machine's answer for a batch at one time t.

    mean: (B, C, H, W) posterior mean of each pixel's centre value: the machine's x_0 estimate.
    source: (B, H, W, 3) int64 (training image index in the full data set, row, column) of the pixel
        in the training set that the dominant dictionary entry places at this pixel; None when the
        provenance was not asked for (Machine.posterior).
    weight: (B, H, W) posterior weight of that dominant entry; None likewise.
    path: (B, H, W) uint8 code (patchdb.topk.PATHS) of how each pixel's posterior was computed, for
        backends that choose per pixel; None otherwise.
    """

    mean: torch.Tensor
    source: torch.Tensor | None
    weight: torch.Tensor | None
    path: torch.Tensor | None = None

    def score(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """The machine's score at x (B, C, H, W): (sqrt(alpha_bar) * mean - x) / beta."""
        return (math.sqrt(alpha_bar(t)) * self.mean - x) / (1.0 - alpha_bar(t))


class Machine:
    """Shared plumbing: input checks, per-label training subsets, score from posterior."""

    name = "machine"

    def __init__(self, dataset: Dataset, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 memory_budget: int = DEFAULT_MEMORY_BUDGET):
        self.dataset = dataset
        self.dtype = dtype
        self.device = torch.device(device)
        self.memory_budget = memory_budget
        self.images = dataset.images.to(device=self.device, dtype=dtype)
        self.image_shape = tuple(dataset.images.shape[1:])

    def __call__(self, x: torch.Tensor, t: float, labels: torch.Tensor | None = None,
                 patch_size: int | None = None) -> torch.Tensor:
        """Score (B, C, H, W) of the machine at noisy batch x (B, C, H, W) and time t in (0, 1], computed on the
        machine's device and dtype and returned in x's."""
        x_machine = x.to(device=self.device, dtype=self.dtype)
        score = self.posterior(x_machine, t, labels, patch_size, provenance=False).score(x_machine, t)
        return score.to(device=x.device, dtype=x.dtype)

    def posterior(self, x: torch.Tensor, t: float, labels: torch.Tensor | None = None, patch_size: int | None = None,
                  provenance: bool = True) -> Posterior:
        """Posterior mean, and with provenance the dominant source and its weight, of every pixel of x (B, C, H, W) at time t.

        Without provenance, source and weight are None: finding the dominant entry costs the sliding-window
        method 10-45 % more time per call (benchmarks/RESULTS.md), and a sampler needs it at its last step only.
        """
        self._check_inputs(x, t, labels, patch_size)
        x = x.to(device=self.device, dtype=self.dtype)
        batch = x.shape[0]
        height, width = self.image_shape[1:]
        mean = torch.empty_like(x)
        source = torch.empty(batch, height, width, 3, dtype=torch.int64, device=self.device)
        weight = torch.empty(batch, height, width, dtype=self.dtype, device=self.device)
        path = None
        for label, members in label_groups(labels, batch, self.device):
            images, global_index = self._training_images(label)
            part = self._posterior(x[members], alpha_bar(t), patch_size, images, label, provenance)
            mean[members] = part.mean
            if provenance:
                source[members] = torch.cat([global_index[part.source[..., :1]], part.source[..., 1:]], dim=-1)
                weight[members] = part.weight
            if part.path is not None:
                if path is None:
                    path = torch.zeros(batch, height, width, dtype=torch.uint8, device=self.device)
                path[members] = part.path
        return Posterior(mean, source, weight, path) if provenance else Posterior(mean, None, None, path)

    def _posterior(self, x: torch.Tensor, alpha_bar: float, patch_size: int | None, images: torch.Tensor, label,
                   provenance: bool) -> Posterior:
        """The machine's posterior for x against training images (source indices local to images); without
        provenance, source and weight may be None."""
        raise NotImplementedError

    def take_report(self) -> dict | None:
        """What the machine's backend measured since the last call (paths taken, time split), or None."""
        return None

    def _training_images(self, label: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training images (M, C, H, W) a sample of this label may use, and their indices in the full set."""
        if label is None:
            return self.images, torch.arange(self.images.shape[0], device=self.device)
        index = self.dataset.indices_of_label(label).to(self.device)
        return self.images[index], index

    def _check_inputs(self, x, t, labels, patch_size) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise PatchdbError(f"the noisy batch has shape {tuple(x.shape)} but the training images are {self.image_shape}: "
                               f"pass (B, {', '.join(map(str, self.image_shape))})")
        if not torch.isfinite(x).all():
            raise PatchdbError("the noisy batch contains NaN or infinite values")
        if not 0.0 < t <= 1.0:
            raise PatchdbError(f"time t must lie in (0, 1], got {t}")
        if patch_size is not None and (isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size <= 0
                                       or patch_size % 2 == 0):
            raise PatchdbError(f"patch size {patch_size!r} is invalid: "
                               "patch sizes must be positive odd integers (check --scales)")
        if labels is not None:
            if self.dataset.labels is None:
                raise PatchdbError(f"labels were given but the data set {self.dataset.name} has none; sample unconditionally")
            if labels.shape != (x.shape[0],):
                raise PatchdbError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
            known = set(self.dataset.labels.unique().tolist())
            unknown = sorted(set(labels.tolist()) - known)
            if unknown:
                raise PatchdbError(f"labels {unknown} do not occur in the data set {self.dataset.name} (it has {sorted(known)})")


class IdealMachine(Machine):
    """IS: the exact score of the training set's Gaussian mixture; it memorises."""

    name = "is"

    def __init__(self, dataset: Dataset, **options):
        super().__init__(dataset, **options)
        self._dictionaries: dict[int | None, PatchDictionary] = {}  # by label: duplicates are merged once per machine

    def _posterior(self, x, alpha_bar, patch_size, images, label, provenance):
        batch = x.shape[0]
        if label not in self._dictionaries:
            keys = images.reshape(images.shape[0], -1)
            sources = torch.zeros(images.shape[0], 3, dtype=torch.int64, device=self.device)
            sources[:, 0] = torch.arange(images.shape[0], device=self.device)
            self._dictionaries[label] = PatchDictionary.from_entries(keys, keys, sources)
        dictionary = self._dictionaries[label]
        # by products on every device, as run.json says (generate.backend_name): the fused kernel is kept to the
        # patch machines' dictionaries, the ones it was tested and tuned on
        summary = ExactBackend(method="products").summarize(x.reshape(batch, -1), [dictionary], alpha_bar)
        return _whole_image_posterior(summary, x.shape)


def _whole_image_posterior(summary: PosteriorSummary, shape: torch.Size) -> Posterior:
    """The Posterior (images of shape (B, C, H, W)) of a machine whose entries are whole training images, translated
    circularly by (row, column) = summary.best_source[:, 1:] (0 for IS): each pixel's source is the dominant image's
    pixel that the translation moved there, its weight the image's."""
    batch, _, height, width = shape
    rows, cols = _pixel_grid(height, width, summary.mean.device)
    shift_row, shift_col = summary.best_source[:, 1, None, None], summary.best_source[:, 2, None, None]
    source = torch.stack([summary.best_source[:, 0, None, None].expand(batch, height, width),
                          (rows - shift_row) % height, (cols - shift_col) % width], dim=-1)
    return Posterior(summary.mean.reshape(shape), source, summary.best_weight[:, None, None].expand(batch, height, width))


class EquivariantMachine(Machine):
    """ES: the ideal score of every circular translate of every training image (FFT cross-correlation)."""

    name = "es"

    def _posterior(self, x, alpha_bar, patch_size, images, label, provenance):
        batch, channels, height, width = x.shape
        pixels = height * width
        signal, noise_variance = math.sqrt(alpha_bar), 1.0 - alpha_bar
        x_spectrum = torch.fft.rfft2(x)
        accumulator = SoftmaxAccumulator(batch, channels * pixels, x.dtype, x.device)
        step = max(1, logit_chunk_bytes(x.device) // (batch * pixels * x.element_size()))
        shifts = torch.arange(pixels, device=self.device)
        for start in range(0, images.shape[0], step):
            chunk = images[start:start + step]
            chunk_spectrum = torch.fft.rfft2(chunk)  # (n, C, H, W//2+1)
            # correlation[b, n, d] = <x_b, roll(image_n, d)> for every circular shift d = (dr, dc)
            correlation = torch.fft.irfft2(torch.einsum("bchw,nchw->bnhw", x_spectrum, chunk_spectrum.conj()), s=(height, width))
            squared_norms = chunk.square().sum(dim=(1, 2, 3))
            logits = (signal * correlation - (alpha_bar / 2) * squared_norms[None, :, None, None]) / noise_variance
            image_index = torch.arange(start, start + chunk.shape[0], device=self.device)
            sources = torch.stack([image_index.repeat_interleave(pixels), (shifts // width).repeat(chunk.shape[0]),
                                   (shifts % width).repeat(chunk.shape[0])], dim=1)

            def contract(weights, rows, spectrum=chunk_spectrum, n=chunk.shape[0]):
                # sum over n, d of w[n, d] * roll(image_n, d): a circular convolution per image
                weight_spectrum = torch.fft.rfft2(weights.reshape(-1, n, height, width))
                mixed = torch.einsum("bnhw,nchw->bchw", weight_spectrum, spectrum)
                return torch.fft.irfft2(mixed, s=(height, width)).reshape(weights.shape[0], -1)

            accumulator.update(logits.reshape(batch, -1), contract, sources)
        return _whole_image_posterior(accumulator.summary(), x.shape)


class PatchMachine(Machine):
    """LS, ELS and boundary-broken ELS: each pixel's posterior over its group's patch dictionary."""

    def __init__(self, name: str, dataset: Dataset, *, backend=None, merge_duplicates: bool = True,
                 store: PatchStore | None = None, **options):
        super().__init__(dataset, **options)
        self.name = name
        self.padding = padding_mode(name)
        self.backend = backend or (ExactBackend() if store is None else TopKBackend())
        self.merge_duplicates = merge_duplicates
        self.store = store
        if store is not None:
            if not isinstance(self.backend, TopKBackend):
                raise PatchdbError("a patch store serves the top-k backend; give backend=TopKBackend(...) with store, "
                                   "or no store for the exact backend")
            store.check_run(dataset, name)
        self._cache_scale: int | None = None
        self._cache: dict[int | None, list[PatchDictionary]] = {}  # by label, for the scale _cache_scale
        self._stored: dict[int | None, list] = {}  # the store's dictionaries (None: not stored), likewise
        self._lanes: dict[int | None, LaneImages] = {}  # the images laid out for sliding windows, likewise
        self._tasks: torch.Tensor | None = None  # the sliding windows' tasks at the scale _cache_scale

    def _posterior(self, x, alpha_bar, patch_size, images, label, provenance):
        if patch_size is None:
            raise PatchdbError(f"the {self.name} machine needs a patch size: give --scales")
        batch, channels, height, width = x.shape
        check_patch_size(patch_size, self.padding, height, width)
        windows = self._windows_backend(x, patch_size)
        if windows is not None:
            start = time.perf_counter()
            tasks = self._window_tasks(patch_size)
            mean, source, weight = window_posterior(x, self._lane_blocks(images, label, patch_size), tasks, alpha_bar, patch_size,
                                                    self.padding, torch.get_num_threads(), provenance)
            if windows is not self.backend:  # a step the top-k backend left to the exact one
                pairs = int(((tasks[:, 1] - tasks[:, 0]) * (tasks[:, 3] - tasks[:, 2])).sum()) * images.shape[0] * batch
                self.backend.count_exact(batch * height * width, pairs, time.perf_counter() - start)
                path = torch.full((batch, height, width), PATHS.index("exact"), dtype=torch.uint8, device=x.device)
                return Posterior(mean, source, weight, path)
            return Posterior(mean, source, weight)
        groups = dictionary_groups(self.name, patch_size, height, width)
        query_windows = patch_windows(x, patch_size, self.padding)
        queries = [_group_queries(query_windows, group) for group in groups]
        accumulators = [SoftmaxAccumulator(batch * len(group.query_pixels), channels, x.dtype, x.device) for group in groups]
        paths = [None] * len(groups)
        for block in self._dictionary_blocks(images, label, patch_size, groups):
            for index, (accumulator, group_queries, dictionary) in enumerate(zip(accumulators, queries, block)):
                if dictionary is None:
                    continue
                path = self.backend.fold(accumulator, group_queries, dictionary, alpha_bar)
                if path is not None:
                    paths[index] = path if paths[index] is None else torch.maximum(paths[index], path)
        mean = torch.empty(batch, channels, height * width, dtype=x.dtype, device=x.device)
        source = torch.empty(batch, height * width, 3, dtype=torch.int64, device=x.device)
        weight = torch.empty(batch, height * width, dtype=x.dtype, device=x.device)
        path = (None if all(group_path is None for group_path in paths)
                else torch.zeros(batch, height * width, dtype=torch.uint8, device=x.device))
        for group, accumulator, group_path in zip(groups, accumulators, paths):
            summary = accumulator.summary()
            pixels = group.query_pixels.to(x.device)
            # rows are (sample, pixel) pairs, or (pixel, sample) pairs in a same-location group
            order = (len(pixels), batch) if group.same_location else (batch, len(pixels))
            swap = (lambda t: t.transpose(0, 1)) if group.same_location else (lambda t: t)
            mean[:, :, pixels] = swap(summary.mean.reshape(*order, channels)).transpose(1, 2)
            source[:, pixels] = swap(summary.best_source.reshape(*order, 3))
            weight[:, pixels] = swap(summary.best_weight.reshape(*order))
            if group_path is not None:
                path[:, pixels] = swap(group_path.reshape(*order))
        return Posterior(mean.reshape(x.shape), source.reshape(batch, height, width, 3), weight.reshape(batch, height, width),
                         None if path is None else path.reshape(batch, height, width))

    def take_report(self) -> dict | None:
        take = getattr(self.backend, "take_report", None)
        return None if take is None else take()

    def _windows_backend(self, x: torch.Tensor, patch_size: int) -> ExactBackend | None:
        """The exact backend that scores this call by sliding windows (patchdb.windows), or None: the machine's own
        exact backend where it slides windows on x's device and dtype, or the top-k backend's at the patch sizes it
        leaves to it (TopKBackend.exact_from_patch_size), which need the windows."""
        if isinstance(self.backend, ExactBackend):
            return self.backend if self.backend.uses_windows(x.device, x.dtype) else None  # no store: __init__ refuses one
        if not (isinstance(self.backend, TopKBackend) and self.backend.leaves_to_exact(patch_size)):
            return None
        if not self.backend.exact.uses_windows(x.device, x.dtype):
            raise PatchdbError("--exact-from-patch-size leaves steps to the exact backend's sliding windows, which need a CPU, "
                               "float32 or float64 and patchdb's compiled kernel; drop the option here")
        return self.backend.exact

    def _lane_blocks(self, images, label, patch_size):
        """The training images laid out for sliding windows (patchdb.windows.LaneImages), in blocks.

        Like the dictionaries (_dictionary_blocks): cached for this scale while every label's layouts
        fit in 3/4 of the memory budget, else laid out at every call in blocks that fit a quarter of it.
        """
        self._check_scale(patch_size)
        if label in self._lanes:
            return [self._lanes[label]]
        per_image = lane_image_bytes(*self.image_shape, patch_size, images.dtype)
        cached_images = sum(cached.count for cached in self._lanes.values())
        if (cached_images + images.shape[0]) * per_image <= self.memory_budget * 3 // 4:
            self._lanes[label] = LaneImages.from_images(images, patch_size, self.padding)
            return [self._lanes[label]]
        group = lanes(images.dtype)
        block = max(1, self.memory_budget // 4 // per_image // group) * group  # whole lane groups: sources count in groups
        return (LaneImages.from_images(images[start:start + block], patch_size, self.padding)
                for start in range(0, images.shape[0], block))

    def _window_tasks(self, patch_size: int) -> torch.Tensor:
        """The sliding-window tasks of this scale's dictionary groups (patchdb.windows.window_tasks), made once per scale."""
        self._check_scale(patch_size)
        if self._tasks is None:
            height, width = self.image_shape[1:]
            self._tasks = window_tasks(dictionary_groups(self.name, patch_size, height, width), width)
        return self._tasks

    def _check_scale(self, patch_size: int) -> None:
        """Free the previous scale's cached dictionaries, layouts and tasks when the patch size changes."""
        if self._cache_scale != patch_size:
            self._cache_scale, self._cache, self._stored, self._lanes, self._tasks = patch_size, {}, {}, {}, None

    def _dictionary_blocks(self, images, label, patch_size, groups):
        """The groups' dictionaries, one list (a dictionary per group, None where a group has no
        entries in that block) per block of training images.

        Stored dictionaries (with a store) are loaded once per scale and label, their patches held within what 3/4 of
        the memory budget leaves after the labels loaded before (patchdb.store). The others are extracted from the
        images: while those of this scale (for every label seen so far) fit in what is left of that 3/4, they are
        built once and cached as a single block (the sampler uses each scale for several consecutive steps);
        otherwise they are re-extracted at every call from blocks of images that fit a quarter of the budget.
        """
        self._check_scale(patch_size)
        if label in self._cache:
            return [self._cache[label]]
        if self.store is not None and label not in self._stored:
            self._stored[label] = self._stored_dictionaries(images, label, patch_size, groups)
        stored = self._stored.get(label, [None] * len(groups))
        extract = [group for group, dictionary in zip(groups, stored) if dictionary is None]
        channels, _, width = self.image_shape
        image_bytes = max(1, sum(extracted_bytes_per_image(group, patch_size, channels, width, images.element_size())
                                 for group in extract))
        cached_images = sum(self._training_images(cached)[0].shape[0] for cached in self._cache)
        if (cached_images + images.shape[0]) * image_bytes <= self.memory_budget * 3 // 4 - self._stored_bytes():
            self._cache[label] = next(self._with_stored(stored, images, patch_size, extract, images.shape[0]))
            return [self._cache[label]]
        return self._with_stored(stored, images, patch_size, extract, max(1, self.memory_budget // 4 // image_bytes))

    def _with_stored(self, stored, images, patch_size, extract, images_per_block):
        """Blocks of dictionaries: the groups extract extracted from images_per_block images at a time,
        the stored ones (where stored is not None) in the first block only."""
        for number, block in enumerate(self._extract_blocks(images, patch_size, extract, images_per_block) if extract else [[]]):
            extracted = iter(block)
            yield [next(extracted) if dictionary is None else (dictionary if number == 0 else None) for dictionary in stored]

    def _stored_dictionaries(self, images, label, patch_size, groups):
        """The groups' dictionaries from the store; None for same-location groups (not stored). Their patches are
        held in memory (within 3/4 of the budget) unless the backend reads them in place from the images."""
        self.store.check_run(self.dataset, self.name, [patch_size], label is not None,
                             None if label is None else torch.tensor([label]))
        in_place = isinstance(self.backend, TopKBackend) and self.backend.reads_patches_in_place(images.device, images.dtype)
        budget = 0 if in_place else max(0, self.memory_budget * 3 // 4 - self._stored_bytes())
        return self.store.dictionaries(patch_size, label, groups, images, budget)

    def _stored_bytes(self) -> int:
        """Bytes of the patches that the stored dictionaries loaded so far hold in memory."""
        held = [getattr(dictionary, "entries", dictionary) for dictionaries in self._stored.values()
                for dictionary in dictionaries if dictionary is not None]
        # the fused exact method replaces a dictionary's keys by its float16 operand (patchdb.fused.FusedKeys.parts)
        return sum(getattr(entries.keys, "parts", entries.keys).nbytes for entries in held
                   if isinstance(entries, PatchDictionary))

    def _extract_blocks(self, images, patch_size, groups, images_per_block):
        """Yield, per block of images_per_block training images, a PatchDictionary per group."""
        centre = centre_indices(self.image_shape[0], patch_size).to(images.device)
        width = self.image_shape[2]
        for start in range(0, images.shape[0], images_per_block):
            block = images[start:start + images_per_block]
            windows = None  # padded and unfolded only if a group gathers patches: corners kept as regions do not
            dictionaries = []
            for group in groups:
                key_pixels = group.key_pixels.to(images.device)
                image_index = torch.arange(start, start + block.shape[0],
                                           device=images.device)[:, None].expand(-1, key_pixels.shape[0])
                pixel = key_pixels[None, :].expand(block.shape[0], -1)
                sources = torch.stack([image_index, pixel // width, pixel % width], dim=-1)  # (n, K, 3)
                regions = same_location_regions(block, key_pixels, patch_size, self.padding) if group.same_location else None
                if regions is not None:
                    keys = RegionKeys(*regions)
                    values = keys.regions[:, keys.embedding[:, centre]].transpose(0, 1).contiguous()  # (K, n, C)
                    dictionaries.append(PatchDictionary.stacked(keys, values, sources.transpose(0, 1)))
                    continue
                if windows is None:
                    windows = patch_windows(block, patch_size, self.padding)
                keys = gather_patches(windows, key_pixels)  # (n, K, D)
                if group.same_location:
                    keys, sources = keys.transpose(0, 1), sources.transpose(0, 1)  # one dictionary per pixel
                    dictionaries.append(PatchDictionary.stacked(keys, keys[..., centre], sources))
                else:
                    keys, sources = keys.flatten(0, 1), sources.flatten(0, 1)
                    dictionaries.append(PatchDictionary.from_entries(keys, keys[:, centre], sources, self.merge_duplicates))
            yield dictionaries


def _group_queries(windows: torch.Tensor, group) -> torch.Tensor:
    """A group's query patches from a patch_windows view of the batch: (B * Q, D), or (Q, B, D) same-location."""
    patches = gather_patches(windows, group.query_pixels)  # (B, Q, D)
    return patches.transpose(0, 1).contiguous() if group.same_location else patches.flatten(0, 1)


def _pixel_grid(height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(height, device=device)[None, :, None].expand(1, height, width)
    cols = torch.arange(width, device=device)[None, None, :].expand(1, height, width)
    return rows, cols


def make_machine(name: str, dataset: Dataset, **options) -> Machine:
    """The machine called name (one of MACHINES) over dataset's training images.

    options: dtype (torch.float32 or torch.float64), device, memory_budget (bytes), and for the
    patch machines backend, merge_duplicates and store (a PatchStore, which the top-k backend needs).
    """
    if name == "is":
        return IdealMachine(dataset, **options)
    if name == "es":
        return EquivariantMachine(dataset, **options)
    if name in PATCH_MACHINES:
        return PatchMachine(name, dataset, **options)
    raise PatchdbError(f"unknown machine {name!r}; choose one of {', '.join(MACHINES)}")
