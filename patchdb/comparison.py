"""Seed-by-seed comparison of a trained network with analytic machines (the paper's Table 1, Fig. 10).

Sample k of a comparison with seed S draws its noise (C, H, W), then (when conditional) its label,
from its own generator ``torch.Generator().manual_seed(S + k)``, so any sample can be regenerated
alone. The network runs its full loop (t = 1, ..., 1/n); the machines and the Gaussian baseline run
the machines' loop (t = (n-1)/n, ..., 1/n) from the same noise and label.

Statistics of a machine's image y_hat against the network's image y (both (C, H, W), per seed):
- pearson_r: centre each image (subtract its mean), divide by its L2 norm, dot product: the
  Pearson correlation of the pixels, the number the paper's code calls "r^2";
- r_squared: the coefficient of determination 1 - sum (y - y_hat)^2 / sum (y - mean y)^2;
- mse: mean (y - y_hat)^2.
"""

import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from patchdb.errors import PatchdbError, user_path
from patchdb.files import folder_lock, save_figure, save_npz, write_json
from patchdb.generate import seeded_inputs
from patchdb.sampler import ScoreModel, sample_ddim
from patchdb.schedule import alpha_bar, beta, full_steps, machine_steps

if TYPE_CHECKING:
    from patchdb.data import Dataset
    from patchdb.networks import NetworkScore
    from patchdb.training import TrainingProgress

STATISTICS = ("pearson_r", "r_squared", "mse")
COMPARE_FILE = "compare.json"
"""The record of a comparison, written last."""
COMPARE_PLOTS = ("scatter.png", "pairs.png", "single_step.png")
"""The pictures compare writes beside COMPARE_FILE."""
COMPARE_OUTPUTS = (COMPARE_FILE, "outputs.npz", *COMPARE_PLOTS)
"""Every file that a comparison writes (or removes, as stale) in its output folder."""


def image_statistics(prediction: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """pearson_r, r_squared and mse (each (B,) float64) of predictions against targets, both (B, ...); NaN where
    undefined: pearson_r where either image is constant, r_squared where the target is."""
    if prediction.shape != target.shape:
        raise PatchdbError(f"cannot compare images of shapes {tuple(prediction.shape)} and {tuple(target.shape)}")
    y_hat = prediction.reshape(prediction.shape[0], -1).double()
    y = target.reshape(target.shape[0], -1).double()
    y_hat_centred, y_centred = y_hat - y_hat.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    norms = torch.linalg.vector_norm(y_hat_centred, dim=1) * torch.linalg.vector_norm(y_centred, dim=1)
    target_variation = y_centred.square().sum(1)
    squared_error = (y - y_hat).square()
    nan = torch.tensor(math.nan, dtype=torch.float64)
    return {
        "pearson_r": torch.where(norms > 0, (y_hat_centred * y_centred).sum(1) / norms, nan),
        "r_squared": torch.where(target_variation > 0, 1.0 - squared_error.sum(1) / target_variation, nan),
        "mse": squared_error.mean(1),
    }


def summarize(values: list[float]) -> dict[str, float | int | None]:
    """Median, quartiles (inclusive method), mean, min and max of the defined (not NaN) numbers of a list, None where
    there are none, and how many are undefined."""
    defined = [float(value) for value in values if not math.isnan(value)]
    summary = {"undefined": len(values) - len(defined)}
    if len(defined) < 2:
        value = defined[0] if defined else None
        return {"median": value, "q1": value, "q3": value, "mean": value, "min": value, "max": value, **summary}
    q1, median, q3 = statistics.quantiles(defined, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "mean": statistics.fmean(defined), "min": min(defined),
            "max": max(defined), **summary}


def generate_images(model: ScoreModel, noise: torch.Tensor, labels: torch.Tensor | None, num_steps: int, *,
                    full_loop: bool, scales: list[int] | None = None, batch_size: int = 10,
                    bar: tqdm | None = None) -> torch.Tensor:
    """The model's images (N, C, H, W) from noise (N, C, H, W), batch_size samples at a time."""
    steps = full_steps(num_steps) if full_loop else machine_steps(num_steps)
    # Samples of one label go together, so a machine builds each label's dictionaries once per batch.
    order = torch.arange(noise.shape[0]) if labels is None else torch.sort(labels, stable=True).indices
    outputs = torch.empty_like(noise)
    for start in range(0, noise.shape[0], batch_size):
        members = order[start:start + batch_size]
        outputs[members] = sample_ddim(model, noise[members], steps, num_steps, scales=scales,
                                       labels=None if labels is None else labels[members], disable=True).float()
        if bar is not None:
            bar.update(len(members))
    return outputs


def compare_models(network: ScoreModel, models: dict[str, tuple[ScoreModel, list[int] | None]],
                   noise: torch.Tensor, labels: torch.Tensor | None, num_steps: int, *,
                   batch_size: int = 10, show_progress: bool = True) -> dict:
    """Run the network (full loop) and each model (machine loop, its scale schedule) from the same
    noise and labels. models: name -> (score model, scales or None). Returns {"images": name ->
    (N, C, H, W) including "network", "seconds": name -> wall seconds, "statistics": name -> STATISTICS
    -> (N,) of the model against the network}."""
    images, seconds = {}, {}
    runs = [("network", network, None, True)] + [(name, model, scales, False) for name, (model, scales) in models.items()]
    for name, model, scales, full_loop in runs:
        with tqdm(total=noise.shape[0], desc=f"sampling {name}", unit="sample", disable=not show_progress) as bar:
            start = time.perf_counter()
            images[name] = generate_images(model, noise, labels, num_steps, full_loop=full_loop, scales=scales,
                                           batch_size=batch_size, bar=bar)
            seconds[name] = time.perf_counter() - start
    stats = {name: image_statistics(images[name], images["network"]) for name in models}
    return {"images": images, "seconds": seconds, "statistics": stats}


def comparison_summary(result: dict, machine: str, baseline: str = "is") -> dict:
    """compare.json's statistics: per model and statistic the summary over seeds, and the fraction
    of seeds where the machine's pearson_r beats the baseline's (ties count half; over the seeds where both are
    defined, None where none is; absent when the machine is the baseline)."""
    stats = result["statistics"]
    summary = {name: {key: summarize(values.tolist()) for key, values in per_model.items()}
               for name, per_model in stats.items()}
    if machine == baseline:
        return {"summary": summary}
    fraction = None
    if machine in stats and baseline in stats:
        machine_r, baseline_r = stats[machine]["pearson_r"], stats[baseline]["pearson_r"]
        defined = ~(machine_r.isnan() | baseline_r.isnan())
        machine_r, baseline_r = machine_r[defined], baseline_r[defined]
        if defined.any():
            fraction = float(((machine_r > baseline_r).double() + 0.5 * (machine_r == baseline_r).double()).mean())
    return {"summary": summary, f"fraction_{machine}_beats_{baseline}": fraction}


def single_step_agreement(network: ScoreModel, models: dict[str, tuple[ScoreModel, list[int] | None]],
                          clean_images: torch.Tensor, labels: torch.Tensor | None, num_steps: int, seed: int, *,
                          batch_size: int = 10, show_progress: bool = True) -> dict:
    """At each t = i/n (i = n..1), give the network and each model the same x_t = sqrt(alpha_bar) x_0 +
    sqrt(beta) eps of held-out clean images (N, C, H, W) and correlate their scores (pearson_r per
    image). eps of image k is drawn from seed + k. Each model uses entry min(i, n-1) of its scales.
    Returns {"t": [...], name: {"median": [...], "q1": [...], "q3": [...]}}."""
    noise, _ = seeded_inputs(seed, clean_images.shape[0], tuple(clean_images.shape[1:]))
    steps = full_steps(num_steps)
    result = {"t": [i / num_steps for i in steps], **{name: {"median": [], "q1": [], "q3": []} for name in models}}
    bar = tqdm(total=len(steps) * len(models), desc="single-step", unit="model step", disable=not show_progress)
    for i in steps:
        t = i / num_steps
        x_t = alpha_bar(t) ** 0.5 * clean_images + beta(t) ** 0.5 * noise
        per_model = {name: [] for name in models}
        for start in range(0, x_t.shape[0], batch_size):
            batch = x_t[start:start + batch_size]
            batch_labels = None if labels is None else labels[start:start + batch_size]
            network_score = network(batch, t, labels=batch_labels)
            for name, (model, scales) in models.items():
                patch_size = None if scales is None else scales[min(i, num_steps - 1)]
                score = model(batch, t, labels=batch_labels, patch_size=patch_size)
                per_model[name].extend(image_statistics(score, network_score)["pearson_r"].tolist())
        for name, values in per_model.items():
            described = summarize(values)
            for key in ("median", "q1", "q3"):
                result[name][key].append(described[key])
            bar.update(1)
    bar.close()
    return result


# ---------------------------------------------------------------- outputs


def save_arrays(path: Path, arrays: dict[str, torch.Tensor | None]) -> None:
    """An .npz of the given tensors (None entries left out), written atomically."""
    save_npz(path, {name: value.cpu().numpy() for name, value in arrays.items() if value is not None})


def _defined(value: torch.Tensor) -> float | None:
    """A statistic as JSON holds it: None where undefined (NaN)."""
    return None if value.isnan() else float(value)


def statistic_text(value: float | None, places: int = 3) -> str:
    """A summary statistic (summarize) to the given decimal places, or 'undefined' where no seed defines it."""
    return "undefined" if value is None else f"{value:.{places}f}"


def _median_text(values: torch.Tensor) -> str:
    """The median of values as compare.json gives it (summarize), to 3 decimals, or 'undefined'."""
    return statistic_text(summarize(values.tolist())["median"])


SCATTER_MARGIN = 0.03
"""scatter.png's axes reach this fraction of their range beyond the lowest r and beyond r = 1."""


def plot_scatter(path: Path, machine_r: torch.Tensor, baseline_r: torch.Tensor, machine: str, baseline: str = "is") -> None:
    """scatter.png: the machine's r against the baseline's r, one dot per seed (the paper's Fig. 10; seeds where either
    is undefined are left out)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 5))
    axis = figure.subplots()
    axis.scatter(baseline_r.numpy(), machine_r.numpy(), s=12, alpha=0.7)
    low, high = min(float(torch.cat([machine_r, baseline_r]).nan_to_num(nan=0.0).min()), 0.0), 1.0
    margin = SCATTER_MARGIN * (high - low)  # so that the dots at the limits (r = 1, the lowest r) are drawn whole
    axis.plot([low, high], [low, high], color="grey", lw=1, ls="--")
    axis.set(xlabel=f"{baseline.upper()} r (vs network)", ylabel=f"{machine} r (vs network)",
             title=f"median r: {machine} {_median_text(machine_r)}, {baseline.upper()} {_median_text(baseline_r)}",
             xlim=(low - margin, high + margin), ylim=(low - margin, high + margin), aspect="equal")
    figure.tight_layout()
    save_figure(figure, path)


PAIRS_PER_GROUP = 4
"""pairs.png shows this many seeds from the best, the median and the worst by r."""


def ranked_seeds(r: torch.Tensor) -> list[int]:
    """Indices of r (S,) from the highest r to the lowest, undefined (NaN) ones last."""
    return torch.argsort(r.nan_to_num(nan=-math.inf), descending=True, stable=True).tolist()


def plot_pairs(path: Path, machine_images: torch.Tensor, network_images: torch.Tensor, machine_r: torch.Tensor,
               seeds: list[int], machine: str) -> None:
    """pairs.png: machine | network side by side for the best, median and worst seeds by r (ranked_seeds)."""
    from matplotlib.figure import Figure

    from patchdb.plots import display_image

    order = ranked_seeds(machine_r)
    middle = max(0, len(order) // 2 - PAIRS_PER_GROUP // 2)
    chosen = list(dict.fromkeys(order[:PAIRS_PER_GROUP] + order[middle:middle + PAIRS_PER_GROUP] + order[-PAIRS_PER_GROUP:]))
    figure = Figure(figsize=(4 * 1.1, 1.2 * len(chosen) / 2 + 0.5))
    columns = 4
    rows = (len(chosen) + 1) // 2
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for position, index in enumerate(chosen):
        row, pair = divmod(position, 2)
        for offset, (name, image) in enumerate(((machine, machine_images[index]), ("network", network_images[index]))):
            axis = axes[row, 2 * pair + offset]
            axis.imshow(display_image(image.float().numpy()), cmap="gray", vmin=0, vmax=1)
            r = _defined(machine_r[index])
            title = (f"seed {seeds[index]} " + ("r undefined" if r is None else f"r={r:.2f}")) if offset == 0 else name
            axis.set_title(title, fontsize=6)
    figure.suptitle(f"{machine} | network: best, median and worst seeds", fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)


def plot_single_step(path: Path, agreement: dict) -> None:
    """single_step.png: median (and quartile band) score correlation with the network against t."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    for name, values in agreement.items():
        if name == "t":
            continue
        axis.plot(agreement["t"], values["median"], marker="o", ms=3, label=name)
        axis.fill_between(agreement["t"], values["q1"], values["q3"], alpha=0.2)
    axis.set(xlabel="t", ylabel="r of scores (vs network)", title="single-step agreement on held-out x_t")
    axis.legend()
    figure.tight_layout()
    save_figure(figure, path)


# ---------------------------------------------------------------- a whole comparison run


def held_out_spec(training_spec: str | None, count: int) -> str:
    """The test split of a named data set spec (NAME[:SPLIT][:LIMIT]), cut to count images."""
    from patchdb.data import NAMED_DATASETS

    name = (training_spec or "").split(":")[0].lower()
    if name not in NAMED_DATASETS:
        raise PatchdbError(f"no held-out split is known for the data set {training_spec or 'default'!r}: "
                           "give --test-dataset SPEC for --single-step")
    return f"{name}:test:{count}"


def run_comparison(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, machine: str = "bbels",
                   scales: list[int] | None, scales_source: str | None, num_steps: int = 20, num: int = 100, seed: int = 0,
                   batch_size: int = 10, test_dataset: str | None = None, single_step: bool = False,
                   data_dir=None, device: str = "cpu", memory_budget: int | None = None,
                   show_progress: bool = True) -> dict:
    """Compare a run's network with the machine (at the given scale schedule; None for IS and ES, which
    have no patch size), the IS machine and the Gaussian baseline, all over the run's own training images, on num
    seeds; write to out_dir compare.json, outputs.npz (noise, labels, each model's images), scatter.png, pairs.png and,
    with single_step, single_step.png (held-out images from test_dataset or the data set's test split).
    memory_budget: the machines' memory bound in bytes (None: their default). Every file is written after all the
    sampling, compare.json last (removed first), so that a folder without it holds an interrupted run. Returns the
    content of compare.json."""
    from patchdb.training import load_network

    with folder_lock(out_dir, outputs=COMPARE_OUTPUTS) as out_dir:
        network = load_network(run_dir, device)
        dataset, held_out = comparison_data(run_dir, network, single_step=single_step, test_dataset=test_dataset,
                                            num=num, data_dir=data_dir)
        return _compare(run_dir, network, dataset, held_out, out_dir, machine=machine, scales=scales,
                        scales_source=scales_source, num_steps=num_steps, num=num, seed=seed, batch_size=batch_size,
                        device=device, memory_budget=memory_budget, show_progress=show_progress)


def compare_model(model: str, out_dir: str | os.PathLike, *, dataset_spec: str | None = None, padding: str | None = None,
                  conditional: bool | None = None, train_missing: bool = False, machine: str = "bbels",
                  scale_spec: str | None = None, num_steps: int = 20, num: int = 100, test_dataset: str | None = None,
                  single_step: bool = False, data_dir=None, device: str = "cpu",
                  memory_budget: int | None = None, confirm: Callable[[str], bool] | None = None,
                  announce: Callable[[str], None] | None = None,
                  on_run: "Callable[[Path, TrainingProgress], None] | None" = None, **options) -> dict:
    """`patchdb compare`: the run that model names (resolve_model; trained first where asked), its machine's schedule
    (comparison_scales; calibrated first where missing) and their comparison (as run_comparison's, with its other
    options in options), with out_dir locked throughout, so that a folder another command is writing to is refused before
    any training or calibration. The network is loaded once: the schedule is checked against the weights compared.
    on_run(run_dir, progress) is called once the run is found. The held-out images of single_step are checked before
    any calibration. Returns the content of compare.json."""
    from patchdb.training import load_network

    with folder_lock(out_dir, outputs=COMPARE_OUTPUTS) as out_dir:
        run_dir = resolve_model(model, dataset_spec, padding=padding, conditional=conditional,
                                train_missing=train_missing, data_dir=data_dir, device=device, confirm=confirm)
        network = load_network(run_dir, device)
        if on_run is not None:
            on_run(run_dir, network.training)
        dataset, held_out = comparison_data(run_dir, network, single_step=single_step, test_dataset=test_dataset,
                                            num=num, data_dir=data_dir)
        scales_source, scales = comparison_scales(run_dir, network, machine, scale_spec, num_steps, data_dir=data_dir,
                                                  device=device, memory_budget=memory_budget, announce=announce)
        return _compare(run_dir, network, dataset, held_out, out_dir, machine=machine, scales=scales,
                        scales_source=scales_source, num_steps=num_steps, num=num, device=device,
                        memory_budget=memory_budget, **options)


def comparison_data(run_dir: str | os.PathLike, network: "NetworkScore", *, single_step: bool, test_dataset: str | None,
                    num: int, data_dir=None) -> "tuple[Dataset, Dataset | None]":
    """The run's training images, and with single_step the held-out images (test_dataset's, or the first num of the run
    data set's test split), checked against the network: found before any long work, so that a missing or unfit test
    set fails fast."""
    from patchdb.data import load_dataset
    from patchdb.training import load_training_data, read_config

    dataset = load_training_data(run_dir, data_dir)
    if not single_step:
        return dataset, None
    held_out = load_dataset(test_dataset or held_out_spec(read_config(run_dir)["dataset"]["spec"], num), data_dir)
    if held_out.images.shape[1:] != dataset.images.shape[1:]:
        raise PatchdbError(f"the held-out images of {held_out.name!r} are {tuple(held_out.images.shape[1:])} but the "
                           f"network was trained on {tuple(dataset.images.shape[1:])}; choose a --test-dataset of "
                           "that shape")
    conditional = network.config.conditional
    if conditional and held_out.labels is None:
        raise PatchdbError(f"the held-out data set {held_out.name!r} has no labels but the network is conditional")
    if conditional:  # a class the training images lack (beyond num_classes or not) has no dictionary, no embedding
        absent = sorted(set(held_out.labels[:num].tolist()) - set(dataset.classes.tolist()))
        if absent:
            raise PatchdbError(f"the held-out data set {held_out.name!r} has labels {absent} that the network's training "
                               f"images lack (they hold {dataset.classes.tolist()}; the network has "
                               f"{network.config.num_classes} classes); "
                               "choose a --test-dataset of those classes")
    return dataset, held_out


def _compare(run_dir: str | os.PathLike, network: "NetworkScore", dataset: "Dataset", held_out: "Dataset | None",
             out_dir: Path, *, machine: str = "bbels", scales: list[int] | None, scales_source: str | None,
             num_steps: int = 20, num: int = 100, seed: int = 0, batch_size: int = 10, device: str = "cpu",
             memory_budget: int | None = None, show_progress: bool = True) -> dict:
    """run_comparison of run_dir's loaded network, over its training images dataset (and held_out, from
    comparison_data), into out_dir, a folder this process holds locked."""
    import patchdb
    from patchdb.gaussian import GaussianScore
    from patchdb.machines import make_machine
    from patchdb.patches import check_patch_sizes
    from patchdb.training import read_config

    config = read_config(run_dir)
    check_patch_sizes(scales or (), machine, dataset.images.shape[1:])  # before the network's sampling
    conditional = network.config.conditional
    noise, labels = seeded_inputs(seed, num, tuple(dataset.images.shape[1:]), dataset.classes if conditional else None)
    options = {"device": device} if memory_budget is None else {"device": device, "memory_budget": memory_budget}
    models = {machine: (make_machine(machine, dataset, **options), scales)}
    if machine != "is":
        models["is"] = (make_machine("is", dataset, **options), None)
    models["gaussian"] = (GaussianScore(dataset), None)
    result = compare_models(network, models, noise, labels, num_steps, batch_size=batch_size, show_progress=show_progress)
    stats = result["statistics"]
    seeds = list(range(seed, seed + num))
    report = {
        "model": str(run_dir), "network": config["network"], "training": network.training._asdict(),
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint, "num_images": len(dataset)},
        "machine": machine, "scales": scales, "scales_source": scales_source,
        "scale_convention": "entry i is the patch size at t = i/n",
        "num_steps": num_steps, "num": num, "seed": seed, "conditional": conditional,
        "loops": {"network": "full (t = 1 ... 1/n)", "machines": "machine (t = (n-1)/n ... 1/n)"},
        "seconds": result["seconds"],
        **comparison_summary(result, machine),
        "per_seed": [{"seed": s, "label": None if labels is None else int(labels[k]),
                      **{key: {name: _defined(stats[name][key][k]) for name in stats} for key in STATISTICS}}
                     for k, s in enumerate(seeds)],
        "versions": {"patchdb": patchdb.__version__, "torch": torch.__version__},
    }
    if held_out is not None:
        held_out_labels = held_out.labels if conditional else None
        agreement = single_step_agreement(network, models, held_out.images[:num], None if held_out_labels is None
                                          else held_out_labels[:num], num_steps, seed, batch_size=batch_size,
                                          show_progress=show_progress)
        report["single_step"] = {"dataset": held_out.name, **agreement}
    # compare.json goes last: a folder without it holds a run interrupted while writing its files
    (out_dir / COMPARE_FILE).unlink(missing_ok=True)
    save_arrays(out_dir / "outputs.npz", {"noise": noise, "labels": labels, **result["images"]})
    if machine != "is":
        plot_scatter(out_dir / "scatter.png", stats[machine]["pearson_r"], stats["is"]["pearson_r"], machine)
    else:
        (out_dir / "scatter.png").unlink(missing_ok=True)
    plot_pairs(out_dir / "pairs.png", result["images"][machine], result["images"]["network"],
               stats[machine]["pearson_r"], seeds, machine)
    if held_out is not None:
        plot_single_step(out_dir / "single_step.png", agreement)
    else:
        (out_dir / "single_step.png").unlink(missing_ok=True)  # an earlier run's would not belong to these results
    write_json(out_dir / COMPARE_FILE, report)
    return report


def resolve_model(model: "str | Path", dataset_spec: str | None = None, *, padding: str | None = None, conditional: bool | None = None,
                  train_missing: bool = False, data_dir=None, device: str = "cpu",
                  confirm: Callable[[str], bool] | None = None) -> Path:
    """The run folder that `compare --model` names (a Path is always a folder): the project's cached cpu-preset network
    for resnet|unet on dataset_spec (trained first where train_missing, or where confirm(question) says so), else the
    RUN_DIR model, checked against the dataset_spec, padding and conditional given (None: unchecked)."""
    from patchdb.data import load_dataset
    from patchdb.networks import ARCHITECTURES
    from patchdb.training import cached_run_dir, is_trained, read_config, read_network_config, train_cached

    if isinstance(model, Path) or model not in ARCHITECTURES:
        run_dir = user_path(model, "--model")
        if train_missing:
            raise PatchdbError(f"--train trains the cached {' or '.join(ARCHITECTURES)} network; {run_dir} is a run folder, "
                               "trained with `patchdb train`: drop --train")
        if dataset_spec is not None:
            check_run_data(run_dir, read_config(run_dir)["dataset"], dataset_spec, data_dir)
        network = read_network_config(run_dir)
        if conditional is not None and conditional != network.conditional:
            raise PatchdbError(f"{run_dir} holds {'an un' if conditional else 'a '}conditional network; "
                               "drop --conditional/--unconditional")
        if padding is not None and padding != network.padding:
            raise PatchdbError(f"{run_dir} holds a network with {network.padding} padding, not {padding}; drop --padding")
        return run_dir
    padding = padding or "zeros"
    dataset = load_dataset(dataset_spec, data_dir)
    run_dir = cached_run_dir(model, dataset, padding=padding, conditional=bool(conditional))
    try:
        trained = is_trained(run_dir)
    except PatchdbError as error:
        raise PatchdbError(f"the cached {model} network in {run_dir} is damaged: delete that folder, then rerun with --train "
                           f"to train it again (what is wrong: {error})") from None
    if not trained:
        question = (f"no trained {model} for {dataset.name} in the cache ({run_dir}); train one now with the cpu preset "
                    "(7 to 10 minutes on two idle cores)?")
        if not (train_missing or (confirm is not None and confirm(question))):
            raise PatchdbError(f"no trained {model} for {dataset.name} ({padding} padding) in {run_dir}: pass --train "
                               "to train it with the cpu preset, or `patchdb train ... --out DIR` and --model DIR")
        train_cached(model, dataset, dataset_spec, padding=padding, conditional=bool(conditional), device=device)
    return run_dir


def check_run_data(run_dir: Path, trained: dict, dataset_spec: str, data_dir=None) -> None:
    """A PatchdbError where dataset_spec does not name the images that the run in run_dir was trained on (trained: the
    dataset of its config.json): its own spec (a null one is the embedded default), or data whose first
    trained["num_images"] images have the run's fingerprint (the same images named otherwise: fashion-mnist and
    fashion-mnist:train)."""
    from patchdb.data import DEFAULT_SPEC, load_dataset, portable_spec
    from patchdb.training import training_subset

    trained_spec = trained["spec"] or DEFAULT_SPEC
    if portable_spec(dataset_spec) == trained_spec:
        return
    given = training_subset(load_dataset(dataset_spec, data_dir), trained["num_images"])
    if given.fingerprint != trained["fingerprint"]:
        raise PatchdbError(f"{run_dir} was trained on {trained_spec!r} ({trained['num_images']} images, fingerprint "
                           f"{trained['fingerprint'][:12]}), not on the images of {dataset_spec!r} ({len(given)} used, "
                           f"fingerprint {given.fingerprint[:12]}); drop --dataset (the machines use the network's own "
                           "training images)")


def comparison_scales(run_dir: Path, network: "NetworkScore", machine: str, scale_spec: str | None, num_steps: int, *,
                      data_dir=None,
                      device: str = "cpu", memory_budget: int | None = None,
                      announce: Callable[[str], None] | None = None) -> tuple[str | None, list[int] | None]:
    """(spec, schedule) of the machine for a comparison: scale_spec's, or the run's calibrated one (calibrated first,
    saying so through announce, where RUN_DIR/scales.json is missing); (None, None) for IS and ES. The run's own
    calibrated schedule (calibrated:RUN_DIR, given or by default) must have been calibrated on network's weights, the
    run's loaded network (calibration.check_run_schedule); a schedule named as a file is taken as it is."""
    from patchdb.calibration import calibrate_run, check_run_schedule, largest_candidate_warning
    from patchdb.patches import PATCH_MACHINES
    from patchdb.scales import calibrated_run, check_scale_spec, parse_scales

    check_scale_spec(machine, scale_spec)
    if machine not in PATCH_MACHINES:
        return None, None
    own_schedule = Path(run_dir) / "scales.json"
    if scale_spec is None:
        scale_spec = f"calibrated:{run_dir}"
        if not own_schedule.is_file():
            if announce is not None:
                announce(f"{run_dir} has no scales.json: calibrating {machine} first (patchdb calibrate defaults)")
            _, result = calibrate_run(Path(run_dir), machine=machine, num_steps=num_steps, data_dir=data_dir, device=device,
                                      memory_budget=memory_budget)
            warning = largest_candidate_warning(result, num_steps, machine, run_dir)
            if warning is not None and announce is not None:
                announce(f"warning: {warning}")
    scales = parse_scales(scale_spec, num_steps, machine)
    calibrated = calibrated_run(scale_spec)
    if calibrated is not None and calibrated.resolve() == Path(run_dir).resolve():
        check_run_schedule(own_schedule, run_dir, network, num_steps)
    return scale_spec, scales
