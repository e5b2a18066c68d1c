"""Training the paper's noise-prediction networks, with resumable checkpoints and the model cache.

A run folder RUN_DIR holds
- ``config.json``: the network config, the training config and the training data set (spec,
  number of images used, fingerprint): everything needed to rebuild the network and its data;
- ``checkpoint.pt``: a plain dict of tensors and numbers (loadable with ``torch.load(weights_only=True)``):
  ``model`` (state dict), ``optimizer`` (state dict), ``batches_done``, ``batch_losses`` (float32);
- ``loss.png``: the training loss against epochs.

Every batch draws its time steps and noise from a generator seeded by (seed, batch number) and every
epoch its shuffle from (seed, epoch), so a run resumed from any checkpoint continues exactly as an
uninterrupted run would.
"""

import dataclasses
import hashlib
import json
import math
import os
import shlex
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from patchdb.data import (DEFAULT_SPEC, Dataset, is_default_spec, load_dataset, make_dataset, portable_spec, spec_file,
                          user_cache_data_dir)
from patchdb.errors import PatchdbError, check_readable, user_path
from patchdb.files import atomic_path, folder_lock, save_figure, write_json
from patchdb.networks import NetworkConfig, NetworkScore, build_network
from patchdb.schedule import alpha_bar_tensor
from patchdb.settings import differing_keys

NUM_TRAINING_TIMES = 1000
"""Training times are drawn uniformly from {0, 1/1000, ..., 999/1000}."""
CHECKPOINT_SECONDS = 300.0
"""A checkpoint is also written mid-epoch when this long has passed since the last one."""
CACHE_ENV_VAR = "PATCHDB_CACHE"
CONFIG_FILE, CHECKPOINT_FILE, LOSS_PLOT_FILE = "config.json", "checkpoint.pt", "loss.png"


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """Optimisation settings. learning_rate is multiplied by lr_decay after every batch;
    max_images caps the training set at its first max_images images (None: all)."""

    epochs: int = 300
    batch_size: int = 128
    learning_rate: float = 1e-4
    lr_decay: float = 0.999965
    weight_decay: float = 0.0
    max_images: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise PatchdbError(f"epochs and batch size must be at least 1, got {self.epochs} and {self.batch_size}")
        if self.learning_rate <= 0 or not 0 < self.lr_decay <= 1 or self.weight_decay < 0:
            raise PatchdbError("the learning rate must be > 0, its decay in (0, 1] and the weight decay >= 0")
        if self.max_images is not None and self.max_images < 1:
            raise PatchdbError(f"max_images must be at least 1, got {self.max_images}")


# The paper's setting, and one that trains within the 20 minutes on a 2-core CPU (7 to 9 minutes on an idle one:
# see README "Training presets"). The cpu preset keeps the architecture's shape (6 hidden layers, so the ResNet's 17x17
# receptive field; the paper's whole UNet) and trades data, batches and the ResNet's width: the ResNet takes about a
# fifth of the UNet's time per batch (399 s for 2,560 batches, 502 s for 640: benchmarks/RESULTS.md, issue 3), so it
# trains for four times the epochs.
PRESETS = {
    "paper": {
        "resnet": dict(width=256, num_hidden_layers=6, embedding_dim=128),
        "unet": dict(width=64, embedding_dim=128),
        "training": dict(learning_rate=1e-4, max_images=None),
        "epochs": {"resnet": 300, "unet": 300},
    },
    "cpu": {
        "resnet": dict(width=32, num_hidden_layers=6, embedding_dim=64),
        "unet": dict(width=64, embedding_dim=128),
        "training": dict(learning_rate=1e-3, max_images=1000),
        "epochs": {"resnet": 320, "unet": 80},
    },
}


def preset_configs(preset: str, architecture: str, dataset: Dataset, *, padding: str = "zeros",
                   conditional: bool = False, epochs: int | None = None) -> tuple[NetworkConfig, TrainingConfig]:
    """Network and training configs of a preset for this architecture and data set."""
    if preset not in PRESETS:
        raise PatchdbError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    if conditional and dataset.labels is None:
        raise PatchdbError(f"data set {dataset.name!r} has no labels: train without --conditional")
    network = NetworkConfig(architecture=architecture, in_channels=dataset.images.shape[1], padding=padding,
                            num_classes=dataset.num_classes if conditional else 0, **PRESETS[preset][architecture])
    training = {**PRESETS[preset]["training"], "epochs": PRESETS[preset]["epochs"][architecture] if epochs is None else epochs}
    return network, TrainingConfig(**training)


def training_subset(dataset: Dataset, max_images: int | None) -> Dataset:
    """The first max_images images of the data set (the whole set if it is smaller or max_images is None)."""
    if max_images is None or len(dataset) <= max_images:
        return dataset
    labels = None if dataset.labels is None else dataset.labels[:max_images]
    return make_dataset(dataset.images[:max_images], labels, f"{dataset.name}:first{max_images}")


def train_network(run_dir: str | os.PathLike, dataset: Dataset, dataset_spec: str | None,
                  network_config: NetworkConfig, training_config: TrainingConfig, *,
                  device: str = "cpu", show_progress: bool = True) -> NetworkScore:
    """Train (or resume training) a network in run_dir and return it as a score model.

    dataset is the full data set named by dataset_spec (recorded so that the run can be reloaded);
    training uses its first training_config.max_images images. A run_dir with a checkpoint of the
    same settings is resumed (a larger epoch count extends it); other settings raise PatchdbError.
    """
    run_dir = Path(run_dir)
    device = _check_device(device)
    data = training_subset(dataset, training_config.max_images)
    if network_config.conditional and data.labels is None:
        raise PatchdbError(f"data set {data.name!r} has no labels: train without --conditional")
    config = {
        "network": dataclasses.asdict(network_config),
        "training": dataclasses.asdict(training_config),
        "dataset": {"spec": portable_spec(dataset_spec), "name": data.name, "num_images": len(data),
                    "fingerprint": data.fingerprint},
    }
    with torch.random.fork_rng(devices=[]):  # seeded initial weights, global generator left untouched
        torch.manual_seed(training_config.seed)
        network = build_network(network_config).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=training_config.learning_rate,
                                  weight_decay=training_config.weight_decay)
    batches_per_epoch = math.ceil(len(data) / training_config.batch_size)
    total_batches = training_config.epochs * batches_per_epoch
    with folder_lock(run_dir) as run_dir:  # from the resume to the last checkpoint, so that no other command writes there
        batches_done, batch_losses = _resume(run_dir, config, network, optimizer)
        if batches_done > total_batches:
            raise PatchdbError(f"{run_dir} has already trained {batches_done} batches ({batches_done / batches_per_epoch:g} "
                               f"epochs), more than --epochs {training_config.epochs}; give at least "
                               f"{math.ceil(batches_done / batches_per_epoch)} epochs, or a new --out folder")
        write_json(run_dir / CONFIG_FILE, config)
        if device.type == "cpu":
            network = network.to(memory_format=torch.channels_last)  # faster CPU convolutions; same numbers
        network.train()
        images = data.images.to(device)
        labels = data.labels.to(device) if network_config.conditional else None
        last_save = time.monotonic()
        bar = tqdm(total=total_batches, initial=batches_done, desc="training", unit="batch", disable=not show_progress)
        while batches_done < total_batches:
            epoch, position = divmod(batches_done, batches_per_epoch)
            order = torch.randperm(len(data), generator=_generator(training_config.seed, "epoch", epoch))
            batch_index = order[position * training_config.batch_size:(position + 1) * training_config.batch_size].to(device)
            loss = _training_step(network, optimizer, images[batch_index], None if labels is None else labels[batch_index],
                                  training_config, batches_done, device)
            batch_losses.append(loss)
            batches_done += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}")
            if batches_done % batches_per_epoch == 0 or batches_done == total_batches or \
                    time.monotonic() - last_save > CHECKPOINT_SECONDS:
                save_checkpoint(run_dir, config, network, optimizer, batches_done, batch_losses)
                last_save = time.monotonic()
        bar.close()
        plot_losses(run_dir / LOSS_PLOT_FILE, batch_losses, batches_per_epoch)
        return NetworkScore(network.to(memory_format=torch.contiguous_format))


def _training_step(network, optimizer, x0: torch.Tensor, labels: torch.Tensor | None,
                   config: TrainingConfig, batch_number: int, device: torch.device) -> float:
    """One AdamW step on the noise-prediction MSE for clean images x0 (B, C, H, W); returns the loss."""
    generator = _generator(config.seed, "batch", batch_number)
    times = torch.randint(NUM_TRAINING_TIMES, (x0.shape[0],), generator=generator).float() / NUM_TRAINING_TIMES
    noise = torch.randn(x0.shape, generator=generator)
    times, noise = times.to(device), noise.to(device)
    alpha_bar = alpha_bar_tensor(times)[:, None, None, None]
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    if device.type == "cpu":
        x_t = x_t.contiguous(memory_format=torch.channels_last)
    for group in optimizer.param_groups:
        group["lr"] = config.learning_rate * config.lr_decay ** batch_number
    loss = torch.mean((network(x_t, times, labels) - noise) ** 2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _generator(seed: int, kind: str, index: int) -> torch.Generator:
    """A CPU generator for one epoch's shuffle or one batch's times and noise."""
    offset = {"epoch": 1, "batch": 2}[kind]
    return torch.Generator().manual_seed(((seed * 1_000_003 + index) * 4 + offset) % 2**63)  # seeds up to 2^62 fit


def _check_device(device: str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PatchdbError("--device cuda was asked for but torch sees no CUDA GPU here; use --device cpu")
    return device


def _resume(run_dir: Path, config: dict, network, optimizer) -> tuple[int, list[float]]:
    """Load run_dir's checkpoint into network and optimizer if it is a run of the same settings (a run folder whose
    config.json has other settings is refused, checkpoint or not: a run stopped before its first checkpoint too)."""
    if not (run_dir / CONFIG_FILE).exists() and not (run_dir / CHECKPOINT_FILE).exists():
        return 0, []
    stored = read_config(run_dir)
    changed = differing_keys(_resumable_settings(stored), _resumable_settings(config))
    if changed:
        raise PatchdbError(f"{run_dir} holds a run with other settings ({', '.join(changed)} differ from "
                           f"{run_dir / CONFIG_FILE}); use a new --out folder, or resume that run: {train_command(run_dir, stored)}")
    if not (run_dir / CHECKPOINT_FILE).exists():
        return 0, []
    checkpoint = _restore(run_dir, stored, network)
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:  # a damaged state dict: torch checks little of it
        raise PatchdbError(f"{run_dir / CHECKPOINT_FILE}: its optimizer state is damaged ({type(error).__name__}: {error}); "
                           "train again into a new --out folder") from None
    return int(checkpoint["batches_done"]), checkpoint["batch_losses"].tolist()


def train_command(run_dir: str | os.PathLike, config: dict) -> str:
    """The `patchdb train` command that trains the run of config (run_dir's config.json), and so resumes it; where its
    settings are no preset's (train_network given its own configs), what to run instead."""
    network, training, spec = config["network"], config["training"], config["dataset"]["spec"]
    for preset, settings in PRESETS.items():
        try:
            expected_network = NetworkConfig(**{**network, **settings[network["architecture"]]})
            expected_training = TrainingConfig(**settings["training"], epochs=training["epochs"], seed=training["seed"])
        except (KeyError, TypeError, PatchdbError):  # no config a preset makes
            continue
        if dataclasses.asdict(expected_network) == network and dataclasses.asdict(expected_training) == training:
            words = ["patchdb", "train", "--model", network["architecture"], *(["--dataset", spec] if spec else []),
                     "--padding", network["padding"], "--conditional" if network["num_classes"] else "--unconditional",
                     "--preset", preset, "--epochs", str(training["epochs"]), "--seed", str(training["seed"]),
                     "--out", str(run_dir)]
            named = not is_default_spec(spec) and not spec.strip().startswith("file:")  # looked for in data folders
            return f"`{shlex.join(words)}`" + (" (with the --data-dir that finds its data, if one did)" if named else "")
    return f"the train_network call that started it (its settings in {Path(run_dir) / CONFIG_FILE} are no preset's)"


def settings_digest(config: dict) -> str:
    """sha256 of a run config's resumable settings: what its checkpoints carry and are checked against."""
    return hashlib.sha256(json.dumps(_resumable_settings(config), sort_keys=True).encode()).hexdigest()


def _resumable_settings(config: dict) -> dict:
    """What must agree for a run to resume: its config minus the epoch count (a larger count extends a run rather
    than starting another) and the data's spec and name (the same images, by fingerprint, under another name)."""
    return {**config, "training": {**config["training"], "epochs": None},
            "dataset": {**config["dataset"], "spec": None, "name": None}}


def save_checkpoint(run_dir: Path, config: dict, network, optimizer, batches_done: int, batch_losses: list[float]) -> None:
    """Write run_dir/checkpoint.pt atomically (temporary name in the same folder, then os.replace), with the digest of
    config's resumable settings, so that a checkpoint is never loaded with another run's config.json."""
    state = {
        "settings_digest": settings_digest(config),
        "model": {name: tensor.contiguous() for name, tensor in network.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "batches_done": batches_done,
        "batch_losses": torch.tensor(batch_losses, dtype=torch.float32),
    }
    with atomic_path(run_dir / CHECKPOINT_FILE) as temporary, temporary.open("wb") as file:
        torch.save(state, file)  # through a Python file, whose OSError (a full disk) torch's error keeps as its context


def _load_checkpoint(path: Path) -> dict:
    check_readable(path)
    try:
        with warnings.catch_warnings():  # torch's warnings about a foreign pickle: the error below says it
            warnings.simplefilter("ignore", UserWarning)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError... for damaged files
        raise PatchdbError(f"{path}: not a readable patchdb checkpoint ({_load_failure(error)}); "
                           "train again into a new --out folder") from None
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict) and "optimizer" in checkpoint
            and isinstance(checkpoint.get("batches_done"), int) and checkpoint["batches_done"] >= 0
            and isinstance(checkpoint.get("batch_losses"), torch.Tensor)):
        raise PatchdbError(f"{path} is a torch file but not a patchdb checkpoint (it needs model, optimizer, batches_done "
                           "and batch_losses); train again into a new --out folder")
    return checkpoint


def _load_failure(error: Exception) -> str:
    """torch.load's error in one line, without its advice to load with weights_only=False (which would run any code
    that the file holds)."""
    text = str(error).split("WeightsUnpickler error:", 1)[-1]
    line = next((line.strip() for line in text.splitlines() if line.strip()), "the file is empty or ends early")
    return f"{type(error).__name__}: {line.split('. ', 1)[0].rstrip('.')}"


def read_config(run_dir: str | os.PathLike) -> dict:
    """The config.json of a run folder (checked to hold what the readers of a run need)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file() and (Path(run_dir) / CHECKPOINT_FILE).exists():
        raise PatchdbError(f"{run_dir} holds a {CHECKPOINT_FILE} without its {CONFIG_FILE}, so the run folder is damaged "
                           "(its settings are lost); train into a new --out folder")
    if not path.is_file():
        raise PatchdbError(f"{run_dir} is not a trained run: {path} is missing; train one with `patchdb train --out {run_dir}`")
    check_readable(path)
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PatchdbError(f"{path} is not valid JSON ({error}); train again into a new --out folder") from None
    missing = [f"{section}.{key}" for section, keys in CONFIG_KEYS.items() for key in keys
               if not isinstance(config, dict) or not isinstance(config.get(section), dict) or key not in config[section]]
    if missing:
        raise PatchdbError(f"{path} is not a patchdb run's config (it lacks {', '.join(missing)}); "
                           "train again into a new --out folder")
    not_counts = [f"{section}.{key}" for section, key in COUNT_KEYS
                  if not isinstance(config[section][key], int) or isinstance(config[section][key], bool)
                     or config[section][key] < 1]
    if not_counts:
        raise PatchdbError(f"{path}: {', '.join(not_counts)} must be positive whole numbers; train again into a new --out folder")
    spec, fingerprint = config["dataset"]["spec"], config["dataset"]["fingerprint"]
    if not (spec is None or isinstance(spec, str)) or not isinstance(fingerprint, str):
        raise PatchdbError(f"{path}: dataset.spec must be a data set spec or null and dataset.fingerprint a digest, not "
                           f"{spec!r} and {fingerprint!r}; train again into a new --out folder")
    return config


CONFIG_KEYS = {"network": ("architecture", "num_classes"), "training": ("batch_size", "epochs"),
               "dataset": ("spec", "num_images", "fingerprint")}
"""What config.json must hold, per section, for a run to be reloaded, resumed and compared."""
COUNT_KEYS = (("training", "batch_size"), ("training", "epochs"), ("dataset", "num_images"))
"""The entries of config.json that are counts (at least 1)."""


def load_network(run_dir: str | os.PathLike, device: str = "cpu") -> NetworkScore:
    """The trained network of a run folder as a score model (weights from its last checkpoint)."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    network = build_network(_network_config(run_dir, config))
    checkpoint = _restore(run_dir, config, network)
    # the progress of these very weights: a training still running may have written a later checkpoint by the end of a job
    return NetworkScore(network.to(_check_device(device)), _progress(config, checkpoint))


def read_network_config(run_dir: str | os.PathLike) -> NetworkConfig:
    """The network settings in a run folder's config.json."""
    return _network_config(run_dir, read_config(run_dir))


def _network_config(run_dir: str | os.PathLike, config: dict) -> NetworkConfig:
    try:
        return NetworkConfig(**config["network"])
    except TypeError as error:
        raise PatchdbError(f"{Path(run_dir) / CONFIG_FILE} has no valid network config ({error})") from None


def _restore(run_dir: Path, config: dict, network) -> dict:
    """run_dir's checkpoint, its weights loaded into network (built from config, run_dir's config.json)."""
    path = _checkpoint_path(run_dir, config)
    checkpoint = _load_checkpoint(path)
    recorded = checkpoint.get("settings_digest")  # absent from checkpoints written before it: only their weights check
    try:
        if recorded is not None and recorded != settings_digest(config):
            raise RuntimeError("it was trained with other settings")
        network.load_state_dict(checkpoint["model"])
    except (KeyError, RuntimeError) as error:  # RuntimeError: missing, unexpected or differently shaped weights
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PatchdbError(f"{path} does not hold the network that {run_dir / CONFIG_FILE} describes ({reason}); "
                           "the two files come from different runs, or from a patchdb whose network differs: train again into a new "
                           "--out folder") from None
    return checkpoint


def load_training_data(run_dir: str | os.PathLike, data_dir=None) -> Dataset:
    """The exact images a run was trained on (its spec, cut to the images used; fingerprint checked)."""
    record = read_config(run_dir)["dataset"]
    spec = record["spec"]
    data = training_subset(load_dataset(spec, data_dir), record["num_images"])
    if data.fingerprint != record["fingerprint"]:
        path = spec_file(spec)
        fix = (f"restore the file {path} the run was trained on" if path is not None else
               "train it again into a new --out folder (this patchdb embeds other images)" if is_default_spec(spec) else
               "point --data-dir at the same files")
        raise PatchdbError(f"the data set {spec or DEFAULT_SPEC!r} found here differs from the one {run_dir} was trained on "
                           f"(fingerprints differ); {fix}")
    return data


class TrainingProgress(NamedTuple):
    """How far a run has trained, in batches."""

    batches_done: int
    batches_configured: int

    @property
    def finished(self) -> bool:
        return self.batches_done >= self.batches_configured


def training_progress(run_dir: str | os.PathLike) -> TrainingProgress:
    """How far run_dir's training has come; PatchdbError where it has no config or checkpoint."""
    config = read_config(run_dir)
    return _progress(config, _load_checkpoint(_checkpoint_path(run_dir, config)))


def _progress(config: dict, checkpoint: dict) -> TrainingProgress:
    batches_per_epoch = math.ceil(config["dataset"]["num_images"] / config["training"]["batch_size"])
    return TrainingProgress(int(checkpoint["batches_done"]), config["training"]["epochs"] * batches_per_epoch)


def _checkpoint_path(run_dir: str | os.PathLike, config: dict) -> Path:
    """run_dir's checkpoint (config: its config.json); PatchdbError where training has not written one yet."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise PatchdbError(f"{run_dir} has no {CHECKPOINT_FILE} yet: finish training with {train_command(run_dir, config)}")
    return path


def is_trained(run_dir: str | os.PathLike) -> bool:
    """Whether run_dir holds a finished run (all its configured batches done)."""
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT_FILE).is_file() or not (run_dir / CONFIG_FILE).is_file():
        return False
    return training_progress(run_dir).finished


def model_cache_dir() -> Path:
    """Where `--model resnet|unet` runs live: $PATCHDB_CACHE/models, else beside the data cache
    ($XDG_CACHE_HOME/patchdb/models, by default ~/.cache/patchdb/models)."""
    root = os.environ.get(CACHE_ENV_VAR)
    return (user_path(root, f"${CACHE_ENV_VAR}") if root else user_cache_data_dir().parent) / "models"


def cached_run_dir(architecture: str, dataset: Dataset, *, padding: str = "zeros", conditional: bool = False) -> Path:
    """The cache folder of the project's network (cpu preset) for this architecture, data set and setting. Its name holds
    the fingerprint of the images the preset trains on (so that one network serves every spec of them: fashion-mnist,
    fashion-mnist:train, fashion-mnist:train:1000) and ends in a digest of the preset's configs and of the network's
    weight names and shapes, so that a network cached under an earlier version of the preset (another width, say) or of
    the architecture is neither taken for this one nor resumed."""
    network, training = preset_configs("cpu", architecture, dataset, padding=padding, conditional=conditional)
    weight_shapes = {name: list(weight.shape) for name, weight in build_network(network).state_dict().items()}
    configs = json.dumps([dataclasses.asdict(network), dataclasses.asdict(training), weight_shapes], sort_keys=True)
    digest = hashlib.sha256(configs.encode()).hexdigest()[:8]
    kind = "conditional" if conditional else "unconditional"
    images = training_subset(dataset, training.max_images).fingerprint[:12]
    return model_cache_dir() / f"{architecture}-{images}-{padding}-{kind}-cpu-{digest}"


def plot_losses(path: Path, batch_losses: list[float], batches_per_epoch: int) -> None:
    """loss.png: per-batch loss and its per-epoch mean against epochs (written atomically)."""
    from matplotlib.figure import Figure

    losses = torch.tensor(batch_losses)
    epochs = torch.arange(1, len(losses) + 1) / batches_per_epoch
    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    axis.plot(epochs, losses, lw=0.5, alpha=0.4, label="batch")
    full = len(losses) // batches_per_epoch
    if full:
        means = losses[:full * batches_per_epoch].reshape(full, batches_per_epoch).mean(1)
        axis.plot(torch.arange(1, full + 1), means, marker="o", ms=3, label="epoch mean")
    axis.set(xlabel="epoch", ylabel="noise-prediction MSE", yscale="log", title="training loss")
    axis.legend()
    figure.tight_layout()
    save_figure(figure, path)


def train_cached(architecture: str, dataset: Dataset, dataset_spec: str | None, *, padding: str = "zeros",
                 conditional: bool = False, device: str = "cpu", show_progress: bool = True) -> Path:
    """Train (or finish training) the project's cpu-preset network for this setting in its cache folder."""
    run_dir = cached_run_dir(architecture, dataset, padding=padding, conditional=conditional)
    network_config, training_config = preset_configs("cpu", architecture, dataset, padding=padding, conditional=conditional)
    train_network(run_dir, dataset, dataset_spec, network_config, training_config, device=device,
                  show_progress=show_progress)
    return run_dir
