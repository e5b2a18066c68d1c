"""The sample job: draw images from an analytic machine and write them with their provenance.

Seeding follows EDM: sample k of a run with seed S has its own generator
``torch.Generator().manual_seed(S + k)``, which draws its noise (C, H, W) and then, with
``conditional``, its label; so sample k of a batch is regenerated alone by seed S + k, num 1 (the top-k backend's
estimator draws alike for every batch: patchdb.topk).
Noise is drawn in float32 on the CPU (the same on every device) and then cast.

A run writes into its output folder (every file atomically: a temporary name, then os.replace; run.json is removed
first and written last, so that a folder without it holds a run interrupted while writing its files):

- samples.npy: (N, C, H, W) float32 in about [-1, 1];
- noise.npy: (N, C, H, W) the starting noise, in the sampling dtype;
- labels.npy: (N,) int64 class of each sample, with ``conditional`` or ``label`` only;
- provenance.npz: ``source`` (N, H, W, 3) int64 (training image index, row, column) of the
  training pixel that each output pixel's dominant dictionary entry placed there at the last step,
  and ``weight`` (N, H, W) float32 posterior weight of that entry;
- grid.png (the samples) and provenance.png (see patchdb.plots);
- run.json: every argument, the schedule, the data set's name and fingerprint, package versions,
  seconds per step and in total; with an index, per step the fraction of pixels per path, the
  entries scored per pixel and the seconds spent searching, re-scoring and estimating;
- paths.npy: with an index, (steps, N, H, W) uint8 path code of every pixel at every step
  (patchdb.topk.PATHS: 0 exact, 1 certified, 2 estimated, 3 truncated).
"""

import contextlib
import os
import platform
import sys
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, fields
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

import patchdb
from patchdb import fused, windows
from patchdb.data import Dataset, load_dataset, numpy_load_problem
from patchdb.engine import DEFAULT_MEMORY_BUDGET, ExactBackend, check_exact_method
from patchdb.errors import PatchdbError
from patchdb.files import folder_lock, save_figure, save_npy, save_npz, write_json
from patchdb.machines import MACHINES, Machine, Posterior, make_machine
from patchdb.patches import PATCH_MACHINES, check_patch_sizes
from patchdb.plots import image_grid_figure, provenance_figure
from patchdb.sampler import sample_ddim
from patchdb.scales import check_scale_spec, parse_scales, scale_at
from patchdb.schedule import MAX_STEPS, full_steps, machine_steps
from patchdb.store import PatchStore
from patchdb.topk import (DEFAULT_ESTIMATE_ERROR, DEFAULT_ESTIMATE_SAMPLES, DEFAULT_FALLBACK, DEFAULT_TOL, DEFAULT_TOPK,
                          ESTIMATING_FALLBACKS, PATHS, TopKBackend)

DEFAULT_SCALES = "paper:fashion-mnist-resnet-zeros-conditional"
RUN_FILE = "run.json"
"""The record of a sample run, written last."""
SAMPLE_PLOTS = ("grid.png", "provenance.png")
"""The pictures sample writes beside RUN_FILE."""
SAMPLE_OUTPUTS = (RUN_FILE, "samples.npy", "noise.npy", "labels.npy", "provenance.npz", "paths.npy", *SAMPLE_PLOTS)
"""Every file that a sample run writes (or removes, as stale) in its output folder."""
LOOPS = {"machine": machine_steps, "full": full_steps}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEVICES = ("cpu", "cuda")
GIB = 1024**3
DEFAULT_NUM = 8
"""Samples drawn when neither --num nor --noise says how many."""
MAX_SAMPLES = 100_000
"""The most samples one run draws (their noise alone: 1.2 GB of 32 x 32 colour images); more come from later seeds."""
MAX_NOISE_MAGNITUDE = 1e3  # 1,000 standard deviations: no draw of N(0, 1) comes near it; 1e6 already costs float32 digits


@dataclass(frozen=True)
class SampleConfig:
    """Every argument of a sample run (run.json records them all).

    dataset: data set spec (None: the embedded default); noise: path of an (N, C, H, W) .npy used
    instead of seeded noise; num: number of samples (None: the noise file's N, else 8);
    memory_budget_gib: the machine's memory bound in GiB; index: a patch store (patchdb build-index)
    whose dictionaries the top-k backend uses, with topk (None: each dictionary's own), tol, fallback,
    estimate_samples, estimate_error and exact_from_patch_size (see patchdb.topk.TopKBackend); None: the exact backend, whose
    method for the patch machines is exact_method (patchdb.engine.EXACT_METHODS), which with an index is the method
    of the dictionaries too small to index (the steps left by exact_from_patch_size slide windows).
    """

    out: str
    dataset: str | None = None
    data_dir: str | None = None
    machine: str = "bbels"
    scales: str = DEFAULT_SCALES
    steps: int = 20
    num: int | None = None
    seed: int = 0
    label: int | None = None
    conditional: bool = False
    noise: str | None = None
    loop: str = "machine"
    device: str = "cpu"
    dtype: str = "float32"
    memory_budget_gib: float = DEFAULT_MEMORY_BUDGET / GIB
    index: str | None = None
    topk: int | None = DEFAULT_TOPK
    tol: float = DEFAULT_TOL
    fallback: str = DEFAULT_FALLBACK
    estimate_samples: int = DEFAULT_ESTIMATE_SAMPLES
    estimate_error: float = DEFAULT_ESTIMATE_ERROR
    exact_from_patch_size: int | None = None
    exact_method: str = "auto"



@dataclass
class Generation:
    """The result of sampling a batch.

    samples: (N, C, H, W) final images; provenance: the machine's posterior at the last step;
    seconds_per_step: wall time of each model call, in sampler order; backend_reports: what the
    machine's backend measured at each call (Machine.take_report); paths: each call's (N, H, W)
    uint8 path codes (patchdb.topk.PATHS), or None for backends that do not choose per pixel.
    """

    samples: torch.Tensor
    provenance: Posterior
    seconds_per_step: list[float]
    backend_reports: list[dict | None]
    paths: list[torch.Tensor | None]


def seeded_inputs(seed: int, count: int, image_shape: tuple[int, ...],
                  classes: torch.Tensor | int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Noise (count, C, H, W) float32 and, if classes is given, labels (count,) int64 drawn from it.

    classes: the labels to draw from, (K,), or an int K for 0..K-1. Sample k draws its noise, then
    its label (uniform over classes), from generator seed + k, so it can be regenerated alone.
    """
    if not 1 <= count <= MAX_SAMPLES:
        raise PatchdbError(f"{count} samples asked for; one run draws 1..{MAX_SAMPLES} (run more with later seeds)")
    if isinstance(classes, int):
        classes = torch.arange(classes)
    noise = torch.empty(count, *image_shape)
    labels = None if classes is None else torch.empty(count, dtype=torch.int64)
    for k in range(count):
        generator = torch.Generator().manual_seed(seed + k)
        noise[k] = torch.randn(image_shape, generator=generator)
        if labels is not None:
            labels[k] = classes[int(torch.randint(len(classes), (1,), generator=generator))]
    return noise, labels


class PosteriorRecorder:
    """A score model around a machine that times each call and keeps the posterior, with its provenance, of
    the last of num_calls calls (earlier calls skip the provenance, which costs time)."""

    def __init__(self, machine: Machine, num_calls: int):
        self.machine = machine
        self.num_calls = num_calls
        self.last: Posterior | None = None
        self.seconds: list[float] = []
        self.reports: list[dict | None] = []
        self.paths: list[torch.Tensor | None] = []

    def __call__(self, x: torch.Tensor, t: float, labels: torch.Tensor | None = None,
                 patch_size: int | None = None) -> torch.Tensor:
        """Score (B, C, H, W) of the machine at x (B, C, H, W), time t, like Machine.__call__."""
        start = time.perf_counter()
        self.last = self.machine.posterior(x, t, labels, patch_size, provenance=len(self.seconds) == self.num_calls - 1)
        score = self.last.score(x, t)
        if score.device.type == "cuda":
            torch.cuda.synchronize(score.device)
        self.seconds.append(time.perf_counter() - start)
        self.reports.append(self.machine.take_report())
        self.paths.append(None if self.last.path is None else self.last.path.cpu())
        return score


def generate(machine: Machine, noise: torch.Tensor, scales: list[int] | None, num_steps: int,
             labels: torch.Tensor | None = None, loop: str = "machine", progress: bool = True) -> Generation:
    """Run the deterministic sampler from noise (N, C, H, W) (already on the machine's device and dtype).

    scales: num_steps patch sizes (entry i at t = i/n; None for IS and ES); loop: 'machine' (t = (n-1)/n ... 1/n) or
    'full' (t = 1 ... 1/n); labels: (N,) int64 for class-conditional sampling.
    """
    steps = LOOPS[loop](num_steps)
    recorder = PosteriorRecorder(machine, len(steps))
    samples = sample_ddim(recorder, noise, steps, num_steps, scales, labels=labels, disable=not progress)
    return Generation(samples, recorder.last, recorder.seconds, recorder.reports, recorder.paths)


def run_sample(config: SampleConfig, progress: bool = True, given: Collection[str] = ()) -> dict:
    """The whole sample job: check the arguments, load data, sample, write config.out; returns run.json's content.

    given: the names of the config fields that the user set (a command line's options): an option the run would ignore
    is refused where it is given, even at its default value, as where it differs from the default."""
    start = time.perf_counter()
    _check_config(config, given)
    scales = parse_scales(config.scales, config.steps, config.machine) if config.machine in PATCH_MACHINES else None
    check_patch_sizes(scales or (), config.machine)  # before the data loads: every data set is loaded at one size
    if config.index is not None and scales is not None:
        _check_steps_searched(config, scales, given)
    dataset = load_dataset(config.dataset, config.data_dir)
    noise, labels = _inputs(config, dataset)
    machine = make_machine(config.machine, dataset, dtype=DTYPES[config.dtype], device=config.device,
                           memory_budget=int(config.memory_budget_gib * GIB), **_backend_options(config, dataset, scales, labels))
    with folder_lock(config.out, outputs=SAMPLE_OUTPUTS) as out:  # held while sampling, so that no other command writes there meanwhile
        device_labels = None if labels is None else labels.to(config.device)
        generation = generate(machine, noise.to(device=config.device, dtype=DTYPES[config.dtype]), scales, config.steps,
                              device_labels, config.loop, progress)
        _write_outputs(out, dataset, generation, noise.to(DTYPES[config.dtype]), labels)
        record = {
            "command": "sample",
            "arguments": asdict(config),
            "num_samples": noise.shape[0],
            "scales": scales,
            "steps": LOOPS[config.loop](config.steps),
            "labels": None if labels is None else labels.tolist(),
            "data": {"name": dataset.name, "fingerprint": dataset.fingerprint, "num_images": len(dataset),
                     "image_shape": list(dataset.images.shape[1:])},
            "versions": versions(),
            "device": device_name(config.device),
            "backend": backend_name(machine),
            "seconds_per_step": generation.seconds_per_step,
            "total_seconds": time.perf_counter() - start,
        }
        if config.index is not None:
            record["index_steps"] = index_steps(generation, LOOPS[config.loop](config.steps), scales, config.steps)
        write_json(out / RUN_FILE, record, indent=2)
    return record


def _backend_options(config: SampleConfig, dataset: Dataset, scales: list[int], labels: torch.Tensor | None) -> dict:
    """make_machine's store and backend options: the top-k backend on a store with --index, else the exact
    backend with the config's method (the ideal and equivariant machines take no options)."""
    if config.index is None:
        return {"backend": ExactBackend(method=config.exact_method)} if config.machine in PATCH_MACHINES else {}
    if config.machine not in PATCH_MACHINES:
        raise PatchdbError(f"--index serves the patch machines ({', '.join(PATCH_MACHINES)}), not {config.machine}; drop --index")
    store = PatchStore(config.index)
    backend = TopKBackend(config.topk, config.tol, config.fallback, config.estimate_samples, config.estimate_error,
                          exact=ExactBackend(method=config.exact_method),
                          exact_from_patch_size=config.exact_from_patch_size)
    read = sorted(size for size in _used_patch_sizes(config, scales) if not backend.leaves_to_exact(size))  # the rest slide
    store.check_run(dataset, config.machine, read, labels is not None, labels)
    return {"store": store, "backend": backend}


def index_steps(generation: Generation, steps: list[int], scales: list[int], num_steps: int) -> list[dict]:
    """Per model call of an indexed run: t, patch size, fraction of pixels per path (from the call's path map: the
    backend counts a pixel at each fold, and a dictionary too large to cache is folded in several blocks), entries
    scored per pixel, the deepenings and estimates' standard errors (patchdb.topk.TopKBackend.take_report), and its
    seconds split into search, rescore, estimate and other (loading dictionaries, same-location groups, the score)."""
    records = []
    for i, report, path, seconds in zip(steps, generation.backend_reports, generation.paths, generation.seconds_per_step):
        pixels = path.numel()
        counts = torch.bincount(path.flatten().long(), minlength=len(PATHS)).tolist()
        split = dict(report["seconds"], other=max(0.0, seconds - sum(report["seconds"].values())))
        records.append({"t": i / num_steps, "patch_size": scale_at(scales, i, num_steps),
                        "fraction_of_pixels": {name: count / pixels for name, count in zip(PATHS, counts) if count},
                        "entries_scored_per_pixel": report["entries_scored"] / pixels,
                        "deepenings_per_pixel": report["deepenings"] / pixels,
                        "estimate_standard_error": report["estimate_standard_error"], "seconds": split})
    return records


def backend_name(machine: Machine) -> str:
    """How the machine scores. Whole images: 'exact: products' (IS) or 'exact: fft' (ES). The patch machines' plain
    dictionaries: 'exact: windows (ISA)', 'exact: fused' or 'exact: products' (the same-location ones by products). With
    an index: 'top-k (SCORING scoring; small dictionaries: exact METHOD[; P >= N: exact windows (ISA)])', SCORING one of
    patchdb.topk.SCORINGS, METHOD the exact backend's for the dictionaries too small to index, and N the patch size
    from which steps are left to the sliding windows (exact_from_patch_size)."""
    backend = getattr(machine, "backend", None)
    if backend is None:
        return "exact: fft" if machine.name == "es" else "exact: products"
    device, dtype = machine.device, machine.dtype
    if isinstance(backend, TopKBackend):
        parts = [f"{backend.scoring_on(device, dtype)} scoring",
                 f"small dictionaries: exact {backend.exact.plain_method(device, dtype)}"]
        if backend.exact_from_patch_size is not None:
            parts.append(f"P >= {backend.exact_from_patch_size}: exact windows ({windows.best_isa()})")
        return f"top-k ({'; '.join(parts)})"
    if backend.uses_windows(device, dtype):
        return f"exact: windows ({windows.best_isa()})"
    return f"exact: {backend.plain_method(device, dtype)}"


def versions() -> dict[str, str | None]:
    """Versions of Python, patchdb, torch, numpy and faiss (None when faiss is not installed)."""
    faiss_version = None
    for distribution in ("faiss-cpu", "faiss-gpu", "faiss"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            faiss_version = metadata.version(distribution)
            break
    return {"python": platform.python_version(), "patchdb": patchdb.__version__, "torch": torch.__version__,
            "numpy": np.__version__, "faiss": faiss_version}


def _check_config(config: SampleConfig, given: Collection[str] = ()) -> None:
    if config.machine not in MACHINES:
        raise PatchdbError(f"unknown machine {config.machine!r}; choose one of {', '.join(MACHINES)}")
    if config.loop not in LOOPS:
        raise PatchdbError(f"unknown loop {config.loop!r}; choose one of {', '.join(LOOPS)}")
    if config.dtype not in DTYPES:
        raise PatchdbError(f"unknown dtype {config.dtype!r}; choose one of {', '.join(DTYPES)}")
    if config.device not in DEVICES:
        raise PatchdbError(f"unknown device {config.device!r}; choose one of {', '.join(DEVICES)}")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise PatchdbError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    def chosen(name: str) -> bool:
        return _chosen(config, name, given)

    if config.label is not None and config.conditional:
        raise PatchdbError("--label L and --conditional exclude each other: give one class for all samples, "
                           "or draw one per sample")
    if config.num is not None and not 1 <= config.num <= MAX_SAMPLES:
        raise PatchdbError(f"--num must lie in 1..{MAX_SAMPLES}, got {config.num}; run more with later --seed")
    if not 2 <= config.steps <= MAX_STEPS:
        raise PatchdbError(f"--steps must lie in 2..{MAX_STEPS}, got {config.steps}")
    check_exact_method(config.exact_method)
    if config.machine not in PATCH_MACHINES and chosen("exact_method"):
        raise PatchdbError(f"--exact-method chooses how patches are scored, and the {config.machine} machine scores whole "
                           "images (matrix products, or FFT correlations for es): drop --exact-method")
    if config.exact_method == "fused" and not fused.available(torch.device(config.device)):
        raise PatchdbError("--exact-method fused needs --device cuda, a CUDA GPU and Triton (which torch's CUDA builds bring); "
                           "choose --exact-method auto or products")
    if config.memory_budget_gib <= 0:
        raise PatchdbError(f"--memory-budget must be positive, got {config.memory_budget_gib} GiB")
    if chosen("scales"):  # the default is no choice: IS and ES run with it
        check_scale_spec(config.machine, config.scales)
    if config.noise is not None and not config.conditional and chosen("seed"):
        raise PatchdbError("--seed draws the starting noise (and, with --conditional, the classes), not the top-k "
                           "estimator's draws (fixed, so that a sample regenerated alone is the same image); with --noise "
                           "and no --conditional it would be ignored: drop --seed")
    if config.index is None:
        ignored = [name for name in INDEX_OPTIONS if chosen(name)]
        if ignored:
            raise PatchdbError(f"without --index STORE the exact backend samples, and {', '.join(map(_option, ignored))} "
                               "(options of the top-k backend) would be ignored: add --index, or drop them")
        return
    if config.exact_from_patch_size is not None and not _slides_windows(config):
        raise PatchdbError("--exact-from-patch-size leaves steps to the exact backend's sliding windows, which need "
                           "--device cpu, --exact-method auto or windows and patchdb's compiled kernel: drop "
                           "--exact-from-patch-size, or choose those")
    if config.fallback not in ESTIMATING_FALLBACKS:
        ignored = [name for name in ("estimate_samples", "estimate_error") if chosen(name)]
        if ignored:
            raise PatchdbError(f"--fallback {config.fallback} does not estimate, so {' and '.join(map(_option, ignored))} "
                               f"would be ignored: drop {'them' if len(ignored) > 1 else 'it'}, or choose --fallback "
                               f"{' or '.join(ESTIMATING_FALLBACKS)}")


def _chosen(config: SampleConfig, name: str, given: Collection[str]) -> bool:
    """Whether the user chose config's field name: gave it (given: the fields set on the command line), or set it to
    other than its default."""
    return name in given or getattr(config, name) != next(field.default for field in fields(SampleConfig)
                                                          if field.name == name)


def _used_patch_sizes(config: SampleConfig, scales: list[int]) -> set[int]:
    """The patch sizes of the steps that config's loop runs."""
    return {scale_at(scales, i, config.steps) for i in LOOPS[config.loop](config.steps)}


def _check_steps_searched(config: SampleConfig, scales: list[int], given: Collection[str]) -> None:
    """With --index, PatchdbError where options would be ignored: --exact-method windows where no step is left to the
    sliding windows (the dictionaries too small to index are scored by products), and the options of the top-k search
    where --exact-from-patch-size leaves every step to the windows (the search never runs)."""
    used, threshold = _used_patch_sizes(config, scales), config.exact_from_patch_size
    if config.exact_method == "windows" and (threshold is None or max(used) < threshold):
        raise PatchdbError("with --index, --exact-method is the method of the dictionaries too small to index, which "
                           "are scored by matrix products (products, or fused on a GPU): the windows slide over whole "
                           "images, as only the steps that --exact-from-patch-size leaves do, and this run leaves none; "
                           "drop --exact-method windows, or give an --exact-from-patch-size P of at most "
                           f"{max(used)}")
    if threshold is None or min(used) < threshold:
        return
    ignored = [name for name in INDEX_OPTIONS if name != "exact_from_patch_size" and _chosen(config, name, given)]
    if ignored:
        raise PatchdbError(f"--exact-from-patch-size {threshold} leaves every step (patch sizes "
                           f"{sorted(used)}) to the sliding windows, so the top-k search "
                           f"never runs and {', '.join(map(_option, ignored))} would be ignored: drop "
                           f"{'them' if len(ignored) > 1 else 'it'}, or raise --exact-from-patch-size")


def _slides_windows(config: SampleConfig) -> bool:
    """Whether the exact backend of config scores by sliding windows (False too where its method 'windows' cannot)."""
    try:
        return ExactBackend(method=config.exact_method).uses_windows(torch.device(config.device), DTYPES[config.dtype])
    except PatchdbError:  # 'windows' asked for where they cannot run: the caller's message names the options
        return False


INDEX_OPTIONS = ("topk", "tol", "fallback", "estimate_samples", "estimate_error", "exact_from_patch_size")
"""The SampleConfig fields that only the top-k backend (--index) reads."""


def _option(field_name: str) -> str:
    """The command-line option of a SampleConfig field."""
    return "--" + field_name.replace("_", "-")


def _inputs(config: SampleConfig, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Starting noise (N, C, H, W) float32 and labels (N,) int64 or None, as the config asks."""
    image_shape = tuple(dataset.images.shape[1:])
    if config.conditional and dataset.labels is None:
        raise PatchdbError(f"--conditional needs class labels but the data set {dataset.name!r} has none; "
                           "drop --conditional or use a labelled data set")
    if config.label is not None:
        dataset.indices_of_label(config.label)  # a clear error for unlabelled data or an absent class
    classes = dataset.classes if config.conditional else None
    if config.noise is None:
        noise, labels = seeded_inputs(config.seed, config.num or DEFAULT_NUM, image_shape, classes)
    else:
        noise = read_noise(Path(config.noise), image_shape)
        if config.num is not None and config.num != noise.shape[0]:
            raise PatchdbError(f"--num {config.num} disagrees with the {noise.shape[0]} noise arrays in {config.noise}; "
                               "drop --num or give a matching noise file")
        # the labels that --seed would draw alongside this many noise arrays
        _, labels = seeded_inputs(config.seed, noise.shape[0], image_shape, classes)
    if config.label is not None:
        labels = torch.full((noise.shape[0],), config.label, dtype=torch.int64)
    return noise, labels


def read_noise(path: Path, image_shape: tuple[int, ...]) -> torch.Tensor:
    """An (N, C, H, W) finite float array from a .npy file, checked against the images' (C, H, W)."""
    if not path.is_file():
        raise PatchdbError(f"noise file {path} does not exist; give an .npy file written by np.save "
                           f"holding an (N, {', '.join(map(str, image_shape))}) float array")
    try:
        noise = np.load(path, allow_pickle=False)
    except ValueError as error:
        raise PatchdbError(f"noise file {path}: {numpy_load_problem(path, error, '.npy')}; save the noise with "
                           "np.save(path, array)") from None
    except (OSError, EOFError) as error:
        raise PatchdbError(f"noise file {path} is not a readable .npy array ({error})") from None
    if not isinstance(noise, np.ndarray):
        raise PatchdbError(f"noise file {path} is an .npz archive, not one array; save the noise alone with np.save")
    if noise.ndim != 4 or tuple(noise.shape[1:]) != image_shape or noise.shape[0] == 0:
        raise PatchdbError(f"noise file {path} holds an array of shape {noise.shape}; the data set needs "
                           f"(N, {', '.join(map(str, image_shape))}) with N >= 1")
    if not np.issubdtype(noise.dtype, np.floating):
        raise PatchdbError(f"noise file {path} holds {noise.dtype} values; save a float32 or float64 array")
    if not np.isfinite(noise).all():
        raise PatchdbError(f"noise file {path} contains NaN or infinite values")
    largest = float(np.abs(noise).max())
    if largest > MAX_NOISE_MAGNITUDE:
        raise PatchdbError(f"noise file {path} holds a value of magnitude {largest:.3g}; the sampler starts from standard "
                           f"normal noise, whose draws stay far below {MAX_NOISE_MAGNITUDE:g} (beyond it float32 loses the "
                           "image to rounding); save N(0, 1) draws, not images or scaled noise")
    return torch.from_numpy(noise.astype(np.float64 if noise.dtype == np.float64 else np.float32))


def _write_outputs(out: Path, dataset: Dataset, generation: Generation, noise: torch.Tensor,
                   labels: torch.Tensor | None) -> None:
    samples = generation.samples.float().cpu().numpy()
    source = generation.provenance.source.cpu().numpy()
    weight = generation.provenance.weight.float().cpu().numpy()
    # run.json goes last: a folder without it holds a run interrupted while writing, whose files may come from two runs
    (out / RUN_FILE).unlink(missing_ok=True)
    save_npy(out / "samples.npy", samples)
    save_npy(out / "noise.npy", noise.cpu().numpy())
    if labels is None:
        (out / "labels.npy").unlink(missing_ok=True)  # a stale file from an earlier conditional run would mislead
    else:
        save_npy(out / "labels.npy", labels.numpy())
    save_npz(out / "provenance.npz", {"source": source, "weight": weight})
    if any(path is not None for path in generation.paths):
        # path codes of every pixel at every step (patchdb.topk.PATHS), in sampler order
        save_npy(out / "paths.npy", torch.stack(generation.paths).numpy())
    else:
        (out / "paths.npy").unlink(missing_ok=True)
    titles = None if labels is None else [f"class {int(label)}" for label in labels]
    for name, figure in (("grid.png", image_grid_figure(samples, titles)),
                         ("provenance.png", provenance_figure(samples, source, dataset.images.numpy()))):
        save_figure(figure, out / name)


def device_name(device: str) -> str:
    """The device in words, as run.json records it: the GPU's name, or the CPU's model (where Linux names it), kind,
    the widest instruction set of the compiled kernels, and cores (figures depend on all of them)."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = _cpu_model()
    isa = f", {windows.best_isa()}" if windows.compiled() else ""
    return (f"cpu ({model + ', ' if model else ''}{platform.processor() or platform.machine()}{isa}, "
            f"{os.cpu_count()} cores, {sys.platform})")


def _cpu_model() -> str | None:
    """The processor's model name from /proc/cpuinfo, or None where there is none."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
