"""Click options shared by the commands that build machines from a data set."""

import math
from pathlib import Path

import click

from patchdb.engine import DEFAULT_MEMORY_BUDGET
from patchdb.errors import PatchdbError, user_path
from patchdb.generate import DEVICES, MAX_SAMPLES
from patchdb.schedule import MAX_STEPS
from patchdb.topk import MAX_TOPK
from patchdb.training import TrainingProgress, training_progress

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
                   "so these results describe a partly trained network; rerun its `patchdb train` command to finish it",
                   err=True)


class UserPath(click.Path):
    """A path option's type: a Path with ~ and ~user expanded (patchdb.errors.user_path, as the library expands the
    paths it reads), never an empty string, which would name the current folder; click.Path's checks as given."""

    def __init__(self, **checks):
        super().__init__(path_type=Path, **checks)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail(f"is empty; give a {'file' if not self.dir_okay else 'folder (. for the current one)'}", param, ctx)
        try:
            value = user_path(value, "path")
        except PatchdbError as error:
            self.fail(str(error), param, ctx)
        return super().convert(value, param, ctx)


DATA_DIR = click.option("--data-dir", type=UserPath(file_okay=False), default=None,
                        help="Root folder of named data sets (else $PATCHDB_DATA and system folders).")
"""--data-dir: where named data sets are looked for first."""


def machine_data_options(command):
    """--data-dir (root of named data sets) and --memory-gb (the machines' memory budget)."""
    command = click.option("--memory-gb", "--memory-budget", type=click.FloatRange(min=0.1, max=MAX_MEMORY_GIB), default=None,
                           callback=finite,
                           show_default=f"the machine's default ({DEFAULT_MEMORY_BUDGET / 1024**3:g})",
                           help="Memory bound of the machine's patch dictionaries and logits, in GiB.")(command)
    return DATA_DIR(command)


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
