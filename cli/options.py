"""Click options shared by the commands that build machines from a data set."""

import math
import sys
from collections.abc import Callable
from pathlib import Path

import click

from patchdb.engine import DEFAULT_MEMORY_BUDGET
from patchdb.errors import PatchdbError, user_path
from patchdb.generate import DEVICES, GIB, MAX_SAMPLES
from patchdb.networks import ARCHITECTURES, PADDINGS
from patchdb.patches import MAX_PATCH_SIZE, largest_patch_size
from patchdb.schedule import MAX_STEPS
from patchdb.topk import MAX_TOPK
from patchdb.training import TrainingProgress, read_config, train_command, training_progress

SEEDS = click.IntRange(min=0, max=2**62)
"""--seed: sample k's generator is seeded with seed + k, which torch takes up to 2^63 - 1."""
STEPS = click.IntRange(min=2, max=MAX_STEPS)
"""--steps: the sampler's number of steps n."""
SAMPLE_COUNTS = click.IntRange(min=1, max=MAX_SAMPLES)
"""--num, --samples: how many seeds a run samples."""


DEVICE = click.Choice(DEVICES)
"""--device: the torch device of the machines and networks."""


MAX_MEMORY_GIB = 2.0**20
"""The largest memory bound the options take, in GiB (a pebibyte): far above any machine, far below an overflow."""


DATASET = click.option("--dataset", default=None, show_default="the embedded default, 1,000 Fashion-MNIST images",
                       help="Training images: NAME[:SPLIT][:LIMIT] (mnist, fashion-mnist, cifar10, celeba), "
                            "default[:LIMIT] or file:PATH[:LIMIT].")
"""--dataset of the commands that read training images (compare names the run's own)."""
SIZE_LIST_HELP = (f"odd sizes '3,5,7' or a range '3,5,...,17', within 1..{largest_patch_size('zeros')} (zero padding: "
                  f"ls, bbels) or 1..{largest_patch_size('circular')} (circular: els)")
"""How a list of patch sizes is written (patchdb.scales.parse_size_list) and the sizes 32x32 images allow."""


def finite(ctx, param, value):
    """A click callback refusing NaN and infinity (which FloatRange's bounds let through)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx, param)
    return value


def warn_if_unfinished(run_dir: Path, progress: TrainingProgress | None = None) -> None:
    """Say on stderr when run_dir's network has not done all its configured training batches (progress: those of its
    loaded weights; None: read from its checkpoint)."""
    progress = progress or training_progress(run_dir)
    if not progress.finished:
        click.echo(f"warning: {run_dir} has trained {progress.batches_done} of its {progress.batches_configured} batches, "
                   f"so these results describe a partly trained network; finish it with "
                   f"{train_command(run_dir, read_config(run_dir))}", err=True)


def refuse_empty(kind: click.ParamType, text, message: str, param, ctx) -> None:
    """Fail kind's conversion with message where text, a path the user gave, is empty or blank, which Path would take as
    the current folder."""
    if isinstance(text, str) and not text.strip():
        kind.fail(message, param, ctx)


class UserPath(click.Path):
    """A path option's type: a Path with ~ and ~user expanded (patchdb.errors.user_path, as the library expands the
    paths it reads), never an empty string, which would name the current folder; click.Path's checks as given."""

    def __init__(self, **checks):
        super().__init__(path_type=Path, **checks)

    def convert(self, value, param, ctx):
        refuse_empty(self, value, f"is empty; give {'a file' if not self.dir_okay else 'a folder (. for the current one)'}",
                     param, ctx)
        try:
            value = user_path(value, "path")
        except PatchdbError as error:
            self.fail(str(error), param, ctx)
        return super().convert(value, param, ctx)


class ModelName(click.ParamType):
    """compare --model: an architecture's name or a RUN_DIR (expanded by the library), never empty (UserPath)."""

    def __init__(self, architectures: tuple[str, ...]):
        self.architectures = architectures
        self.name = "|".join((*architectures, "RUN_DIR"))

    def convert(self, value, param, ctx):
        refuse_empty(self, value, f"is empty; give {' or '.join(self.architectures)}, or a run folder (. for the current one)",
                     param, ctx)
        return value


class ScaleSpec(click.ParamType):
    """--scales: a scale spec (patchdb.scales.SCALE_SPEC_HELP), read by the library; a calibrated: spec's RUN_DIR is
    never empty (UserPath)."""

    name = "SPEC"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.strip().startswith("calibrated:"):
            refuse_empty(self, value.strip().removeprefix("calibrated:"), f"{value.strip()!r} names no run folder (it "
                         "is empty after calibrated:); give calibrated:RUN_DIR (calibrated:. for the current one)", param, ctx)
        return value


def network_options(command):
    """--model (an architecture's cached cpu-preset network, or a RUN_DIR), --dataset, --padding,
    --conditional/--unconditional and --train: the network of calibrate and compare (patchdb.comparison.resolve_model)."""
    options = [
        click.option("--model", type=ModelName(ARCHITECTURES), required=True,
                     help="'resnet' or 'unet' (the project's cpu-preset network for --dataset, from the model cache) or a "
                          "RUN_DIR (from `patchdb train`)."),
        click.option("--dataset", "dataset_spec", default=None, show_default="the run's own data set",
                     help="Data set spec (NAME[:SPLIT][:LIMIT], default[:LIMIT] or file:PATH[:LIMIT]); picks the cached "
                          "network for --model resnet|unet. The machines always use the network's own training images."),
        click.option("--padding", type=click.Choice(PADDINGS), default=None,
                     show_default="a RUN_DIR's own; zeros for resnet|unet", help="Padding of the network's convolutions."),
        click.option("--conditional/--unconditional", default=None,
                     show_default="a RUN_DIR's own; unconditional for resnet|unet", help="Class-conditional network."),
        click.option("--train", "train_missing", is_flag=True,
                     help="Train a missing cached network with the cpu preset without asking."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def confirm_if_interactive() -> Callable[[str], bool] | None:
    """Where stdin is a terminal, click.confirm, to ask before long work (training a missing cached network); else None."""
    return click.confirm if sys.stdin.isatty() else None


DATA_DIR = click.option("--data-dir", type=UserPath(file_okay=False), default=None,
                        help="Root folder of named data sets (else $PATCHDB_DATA, patchdb's cache and system folders).")
"""--data-dir: where named data sets are looked for first."""


MEMORY_BUDGET = click.option("--memory-budget", "--memory-gb", "memory_gb",
                             type=click.FloatRange(min=0, max=MAX_MEMORY_GIB, min_open=True), callback=finite,
                             default=DEFAULT_MEMORY_BUDGET / GIB,
                             help="Memory bound of the machine's patch dictionaries and logits, in GiB.")
"""--memory-budget (alias --memory-gb): the machines' memory bound in GiB."""


def machine_data_options(command):
    """--data-dir (root of named data sets) and --memory-budget (the machines' memory budget)."""
    return DATA_DIR(MEMORY_BUDGET(command))


def gib_to_bytes(gib: float) -> int:
    """--memory-budget in bytes."""
    return int(gib * GIB)


OUTPUT_FOLDER = UserPath(file_okay=False)
"""--out of the commands that write a folder."""


class TopK(click.ParamType):
    """--topk: a positive number of entries, or 'auto' (None: each dictionary's own, patchdb.topk.DEFAULT_TOPK)."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        if value is None or value == "auto":
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = int(value)
            except ValueError:
                self.fail(f"{value!r} is neither 'auto' nor a whole number", param, ctx)
        if number < 1:
            self.fail(f"{number} is not a positive number of entries", param, ctx)
        if number > MAX_TOPK:
            self.fail(f"{number} is more entries than any dictionary holds (at most {MAX_TOPK}, 2^40)", param, ctx)
        return number


class PatchSize(click.IntRange):
    """An odd patch size, 1..patchdb.patches.MAX_PATCH_SIZE (the largest that IMAGE_SIZE x IMAGE_SIZE images allow)."""

    def __init__(self):
        super().__init__(min=1, max=MAX_PATCH_SIZE)

    def convert(self, value, param, ctx):
        size = super().convert(value, param, ctx)
        if size % 2 == 0:
            self.fail(f"{size} is even; patch sizes are odd (a pixel and as many neighbours on each side)", param, ctx)
        return size
