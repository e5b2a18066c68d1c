"""Calibrating a machine's locality scale to a trained network (the paper's appendix method).

Index convention (the project's one convention, shared with ``patchdb.scales`` and the sampler):
a scale schedule for an n-step sampler is a list of n odd patch sizes; **entry i is the patch size
used at t = i/n**, i = 0..n-1. The machine loop evaluates i = n-1..1; the full loop's extra first
step (t = 1, i = n) uses entry n-1; entry 0 (t = 0) is never evaluated.

Calibration follows the network's own reverse trajectory (the full loop, t = 1, ..., 1/n). At
every step i = n-1..1 it evaluates, at the same x_t, the machine's score for each candidate patch
size and compares it with the network's score (cosine similarity, or L2 distance); each sample
keeps its best candidate, and entry i is the median of the samples' best sizes (rounded to the
nearest candidate, ties to the smaller). The t = 1 step only advances the trajectory (it would
share entry n-1) and entry 0 is copied from entry 1. Unlike the authors' code, step i is stored
at entry i, the entry the sampler reads at step i.
"""

import contextlib
import json
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from patchdb.errors import PatchdbError, output_folder, user_path
from patchdb.files import figure_software, folder_lock, save_figure, write_json
from patchdb.sampler import ScoreModel, sample_ddim
from patchdb.schedule import full_steps

if TYPE_CHECKING:
    from patchdb.networks import NetworkScore
    from patchdb.training import TrainingProgress

SCALES_PLOT_SOFTWARE = "patchdb calibrate"
"""The Software text of a schedule's plot, by which calibrate knows the pictures it may replace."""
METRICS = ("cos", "l2")
CONVENTION = "entry i is the patch size at t = i/n"
BATCH_SIZE = 100
"""Samples whose network trajectories calibrate_scales holds at once."""
DEFAULT_SEED = 1000
"""Calibration noise seeds start here, clear of comparison seeds 0-999."""


def default_candidates(architecture: str) -> list[int]:
    """The candidate patch sizes for a network architecture ('resnet' or 'unet'): 3, 5, ..., the largest scale of the
    authors' calibrated schedules for that architecture (paper-scales.json: 19 for ResNets, 27 for UNets)."""
    from patchdb.scales import paper_scales

    largest = max(max(schedule) for key, schedule in paper_scales().items() if f"-{architecture}-" in f"{key}-")
    return list(range(3, largest + 1, 2))


def score_similarity(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-sample agreement (B,) of two score batches (B, C, H, W), higher is better:
    cosine similarity for "cos", minus the L2 distance for "l2"."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    if metric == "cos":
        return torch.nn.functional.cosine_similarity(a, b, dim=1)
    if metric == "l2":
        return -torch.linalg.vector_norm(a - b, dim=1)
    raise PatchdbError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")


def median_candidate(sizes: list[int], candidates: list[int]) -> int:
    """The median of sizes, rounded to the nearest candidate (ties to the smaller)."""
    median = statistics.median(sizes)
    return min(sorted(candidates), key=lambda candidate: abs(candidate - median))


def check_candidates(candidates: list[int]) -> list[int]:
    """Candidates as a sorted list of distinct positive odd sizes, or PatchdbError."""
    if not candidates:
        raise PatchdbError("give at least one candidate patch size, e.g. --candidates 3,5,...,17")
    for size in candidates:
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % 2 == 0:
            raise PatchdbError(f"candidate patch size {size!r} is not a positive odd integer")
    return sorted(set(candidates))


def calibrate_scales(network: ScoreModel, machine: ScoreModel, noise: torch.Tensor, labels: torch.Tensor | None,
                     num_steps: int, candidates: list[int], metric: str = "cos",
                     show_progress: bool = True, batch_size: int = BATCH_SIZE) -> dict:
    """Calibrate the machine's scale schedule to the network from noise (S, C, H, W) (+ labels (S,)), batch_size
    samples at a time (their trajectories, n - 1 steps of x and score each, are held until the machine has scored them).

    Returns {"scales": n ints (the convention above), "per_sample": n lists of S best sizes
    (entries 1..n-1 measured, entry 0 a copy of entry 1), "similarity": n lists of the
    median similarity of each candidate, "samples": network outputs (S, C, H, W),
    "at_largest_candidate": the steps i (1..n-1) whose scale is the largest candidate}.
    """
    candidates = check_candidates(candidates)
    if metric not in METRICS:
        raise PatchdbError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    trajectory = []  # (i, t, x_t, network score) of steps i = n-1..1 of the batch

    def record_step(state: dict) -> None:
        if state["i"] < num_steps:  # the t = 1 step has no entry of its own
            trajectory.append((state["i"], state["t"], state["x"], state["score"]))

    agreement = torch.empty(num_steps, noise.shape[0], len(candidates), dtype=torch.float64)
    samples = []
    starts = range(0, noise.shape[0], batch_size)
    with tqdm(total=len(starts) * (num_steps - 1) * len(candidates), desc="calibrating", unit="machine call",
              disable=not show_progress) as bar:
        for start in starts:
            members = slice(start, start + batch_size)
            batch_labels = None if labels is None else labels[members]
            trajectory.clear()
            samples.append(sample_ddim(network, noise[members], full_steps(num_steps), num_steps, labels=batch_labels,
                                       callback=record_step, disable=True))
            # Candidates outermost: the machine builds each scale's patch dictionaries once for all steps.
            for column, size in enumerate(candidates):
                for i, t, x, network_score in trajectory:
                    machine_score = machine(x, t, labels=batch_labels, patch_size=size)
                    agreement[i, members, column] = score_similarity(machine_score, network_score, metric)
                    bar.update(1)
    agreement[0] = agreement[1]
    per_sample = [[candidates[k] for k in step.argmax(dim=1).tolist()] for step in agreement]
    similarity = [step.quantile(0.5, dim=0).tolist() for step in agreement]  # the mean of the middle two, as statistics
    scales = [median_candidate(sizes, candidates) for sizes in per_sample]
    at_largest = [i for i in range(1, num_steps) if scales[i] == candidates[-1]]
    return {"scales": scales, "per_sample": per_sample, "similarity": similarity, "samples": torch.cat(samples),
            "at_largest_candidate": at_largest}


def largest_candidate_warning(result: dict, num_steps: int, machine: str, run_dir: "str | os.PathLike | None" = None
                              ) -> str | None:
    """A warning where calibrate_scales' result for the machine takes its largest candidate at some step (the network
    may be less local there than any candidate, so the schedule is capped) and a larger one exists, else None.
    run_dir: the run calibrated, whose `patchdb calibrate` command with larger candidates the warning then gives (for
    a caller other than that command, which calibrated on its own)."""
    from patchdb.patches import largest_patch_size, padding_mode
    from patchdb.scales import calibrate_command

    steps, limit = result["at_largest_candidate"], largest_patch_size(padding_mode(machine))
    if not steps or result["scales"][steps[0]] >= limit:
        return None
    largest = result["scales"][steps[0]]
    times = ", ".join(f"{i / num_steps:g}" for i in sorted(steps, reverse=True))
    candidates = f"3,5,...,{min(largest + 10, limit)}"
    fix = (f"calibrate with larger --candidates (e.g. {candidates})" if run_dir is None else
           f"calibrate with larger candidates: `{calibrate_command(run_dir, machine, num_steps)} --candidates {candidates}`")
    return (f"the schedule takes the largest candidate, {largest}, at t = {times}: the network may be less local "
            f"there than any candidate; {fix}")


def calibrate_run(model: str | Path, *, machine: str = "bbels", candidates: Sequence[int] | None = None,
                  samples: int = 10, metric: str = "cos", num_steps: int = 20, seed: int = DEFAULT_SEED,
                  data_dir=None, device: str = "cpu", out: str | os.PathLike | None = None,
                  memory_budget: int | None = None, show_progress: bool = True, dataset_spec: str | None = None,
                  padding: str | None = None, conditional: bool | None = None, train_missing: bool = False,
                  confirm: "Callable[[str], bool] | None" = None,
                  on_run: "Callable[[Path, TrainingProgress], None] | None" = None) -> tuple[Path, dict]:
    """Calibrate a machine over a run's own training images to the run's network; write scales.json
    (default RUN_DIR/scales.json) and scales.png. Sample k's noise and label come from seed + k.

    model: a run folder as a Path (even one named resnet); or --model's text, the architecture of the project's cached
    network for dataset_spec or a run folder (patchdb.comparison.resolve_model, which trains the cached network where
    train_missing or confirm(question) says so, and checks dataset_spec, padding and conditional against a run
    folder). out, where given, is checked and locked first, so that an unusable or busy --out fails before any
    training. on_run(run_dir, progress) is called once the network is loaded. candidates: None for the network
    architecture's default_candidates. memory_budget: the machine's memory bound in bytes (None: its default)."""
    from patchdb.comparison import resolve_model
    from patchdb.generate import seeded_inputs
    from patchdb.machines import make_machine
    from patchdb.patches import PATCH_MACHINES, check_patch_sizes
    from patchdb.training import load_network, load_training_data

    if machine not in PATCH_MACHINES:
        raise PatchdbError(f"machine {machine!r} has no patch size to calibrate: choose one of {', '.join(PATCH_MACHINES)}")
    if candidates is not None:
        candidates = check_candidates(candidates)
        check_patch_sizes(candidates, machine)  # before the data loads: every data set is loaded at one size

    def locked(path: Path):
        # before the long run, so that an unusable or busy --out fails fast; the file alone, as train may hold its folder
        check_schedule_path(path)
        return stack.enter_context(folder_lock(path.parent, path.name)) / path.name

    with contextlib.ExitStack() as stack:
        path = None if out is None else locked(user_path(out, "--out"))
        run_dir = resolve_model(model, dataset_spec, padding=padding, conditional=conditional,  # a Path is no name
                                train_missing=train_missing, data_dir=data_dir, device=device, confirm=confirm)
        path = path or locked(run_dir / "scales.json")
        network = load_network(run_dir, device)
        if on_run is not None:
            on_run(run_dir, network.training)
        if candidates is None:
            candidates = default_candidates(network.config.architecture)
        dataset = load_training_data(run_dir, data_dir)
        noise, labels = seeded_inputs(seed, samples, tuple(dataset.images.shape[1:]),
                                      dataset.classes if network.config.conditional else None)
        options = {} if memory_budget is None else {"memory_budget": memory_budget}
        result = calibrate_scales(network, make_machine(machine, dataset, device=device, **options), noise, labels, num_steps,
                                  candidates, metric, show_progress)
        path = write_scales(path, result, machine=machine, metric=metric,
                            candidates=candidates, model=Path(run_dir).resolve(), seed=seed,
                            model_training=network.training, model_weights=network.weights_digest())
        return path, result


def check_run_schedule(path: Path, run_dir: Path, network: "NetworkScore", num_steps: int) -> None:
    """PatchdbError unless the schedule at path (a scales.json from write_scales) was calibrated on the weights of
    run_dir's network as they are now (their digest, NetworkScore.weights_digest: the same network however its folder
    is named, moved or copied; a larger configured count of batches alone changes nothing)."""
    from patchdb.scales import calibrate_command

    content = json.loads(path.read_text())  # readable: parse_scales read it first
    recorded = content if isinstance(content, dict) else {}
    machine, weights, training = recorded.get("machine"), recorded.get("model_weights"), recorded.get("model_training")
    command = calibrate_command(run_dir, machine if isinstance(machine, str) else None, num_steps)
    if not isinstance(weights, str):
        raise PatchdbError(f"{path} does not record which network's weights it was calibrated on (a schedule of an "
                           f"older patchdb, or written by hand); recalibrate it: `{command}` (or give --scales {path} to "
                           "use it as it is)")
    if weights == network.weights_digest():
        return
    batches = training.get("batches_done") if isinstance(training, dict) else None
    if isinstance(batches, int) and network.training is not None and batches < network.training.batches_done:
        # the weights alone cannot tell this network trained further (or a copy of it) from another network
        raise PatchdbError(f"{path} was calibrated on other weights than {run_dir}'s network has now: on the network of "
                           f"{recorded.get('model')} at batch {batches}, while this one has trained "
                           f"{network.training.batches_done} batches (this network before it trained further, or another "
                           f"one); recalibrate it: `{command}` (or give --scales {path} to use it as it is)")
    raise PatchdbError(f"{path} was calibrated on another network than {run_dir}'s (recorded: {recorded.get('model')}); "
                       f"calibrate this run: `{command}`")


def check_schedule_path(path: Path) -> None:
    """PatchdbError unless write_scales may write a schedule at path (FILE.json) and its plot beside it (FILE.png):
    neither may be a name that another command writes (even where absent), nor the schedule replace a file that is
    not one."""
    from patchdb.comparison import COMPARE_FILE, COMPARE_PLOTS
    from patchdb.generate import RUN_FILE, SAMPLE_PLOTS
    from patchdb.training import CONFIG_FILE, LOSS_PLOT_FILE

    taken = (CONFIG_FILE, RUN_FILE, COMPARE_FILE,
             *(str(Path(plot).with_suffix(".json")) for plot in (LOSS_PLOT_FILE, *SAMPLE_PLOTS, *COMPARE_PLOTS)))
    if path.suffix != ".json" or path.name in taken:
        raise PatchdbError(f"--out {path}: name the schedule FILE.json (its plot goes beside it as FILE.png), and not "
                           f"{', '.join(taken)}, which would overwrite other commands' files")
    if path.exists() and not is_schedule(path):
        raise PatchdbError(f"--out {path} exists and is not a schedule written by `patchdb calibrate`; choose another "
                           "--out, or delete the file")
    plot = path.with_suffix(".png")
    if plot.exists() and figure_software(plot) != SCALES_PLOT_SOFTWARE:
        raise PatchdbError(f"--out {path}: {plot} exists and is not a schedule's plot of `patchdb calibrate`; choose "
                           "another --out, or delete the picture")


def is_schedule(path: Path) -> bool:
    """Whether path holds a schedule as write_scales writes it: a JSON object with its convention, scales, machine,
    candidates, per-sample sizes and model."""
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(content, dict) and content.get("convention") == CONVENTION and \
        all(key in content for key in ("scales", "machine", "candidates", "per_sample", "model"))


def write_scales(path: str | os.PathLike, result: dict, *, machine: str, metric: str, candidates: list[int],
                 model: str, seed: int, model_training: "TrainingProgress | None" = None,
                 model_weights: str | None = None) -> Path:
    """Write the schedule as scales.json (readable by --scales FILE.json and calibrated:RUN_DIR)
    and scales.png beside it; both atomically. model_training: how far the model's network was trained, and
    model_weights: the digest of its weights (NetworkScore.weights_digest), where known. Returns the JSON path."""
    path = Path(path)
    output_folder(path.parent)
    content = {
        "scales": result["scales"], "num_steps": len(result["scales"]), "convention": CONVENTION,
        "machine": machine, "metric": metric, "candidates": check_candidates(candidates),
        "per_sample": result["per_sample"], "median_similarity": result["similarity"],
        "model": str(model), "model_training": None if model_training is None else model_training._asdict(),
        "model_weights": model_weights,
        "seed": seed, "num_samples": len(result["per_sample"][1]),
    }
    write_json(path, content)
    plot_scales(path.with_suffix(".png"), result["scales"], result["per_sample"])
    return path


def plot_scales(path: Path, scales: list[int], per_sample: list[list[int]]) -> None:
    """scales.png: calibrated patch size against t, with each sample's best size as faint dots."""
    from matplotlib.figure import Figure

    n = len(scales)
    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    for i in range(1, n):
        jitter = torch.linspace(-0.15, 0.15, len(per_sample[i])) / n
        axis.scatter([i / n + float(d) for d in jitter], per_sample[i], s=6, alpha=0.3, color="grey")
    axis.step([i / n for i in range(1, n)], scales[1:], where="mid", marker="o", color="C0", label="median (schedule)")
    axis.set(xlabel="t (entry i at t = i/n)", ylabel="patch size P", title="calibrated locality scale")
    axis.legend()
    figure.tight_layout()
    save_figure(figure, path, software=SCALES_PLOT_SOFTWARE)
