"""Locality-scale schedules: which patch size P the machines use at each sampling step.

Convention (used by ``sample``, ``calibrate`` and the shipped presets alike): a schedule for an
n-step sampler is a list of n odd patch sizes; entry i is the patch size at t = i/n, i = 0..n-1.
The machine loop evaluates i = n-1..1, so entry 0 (t = 0) is never used; the full loop's first
step (t = 1, i = n) uses entry n-1.
"""

import json
import shlex
from importlib import resources
from pathlib import Path

from patchdb.errors import PatchdbError, user_path
from patchdb.data import IMAGE_SIZE
from patchdb.networks import ARCHITECTURES
from patchdb.patches import MAX_PATCH_SIZE, PATCH_MACHINES

SCALE_SPEC_HELP = (
    "'paper:KEY' (a calibrated schedule of the paper's authors), 'calibrated:RUN_DIR' "
    "(RUN_DIR/scales.json written by `patchdb calibrate`), a comma list '3,3,5,...' with one odd "
    "size per step, a JSON file, or one odd size for every step"
)


def scale_at(scales: list[int], i: int, num_steps: int) -> int:
    """The patch size of step i (t = i / num_steps) in an n-step schedule (the convention above)."""
    return scales[min(i, num_steps - 1)]


def paper_scales() -> dict[str, list[int]]:
    """The authors' calibrated 20-step schedules, by key (e.g. 'fashion-mnist-resnet-zeros-conditional')."""
    text = resources.files("patchdb").joinpath("resources/paper-scales.json").read_text()
    return json.loads(text)["scales"]


def parse_scales(spec: str | int, num_steps: int, machine: str | None = None) -> list[int]:
    """Turn a scale spec (see SCALE_SPEC_HELP) into a list of num_steps odd patch sizes; machine: the patch machine
    that will use them, which a calibrated schedule must have been calibrated for (None: unchecked)."""
    spec = str(spec).strip()
    if spec.startswith("paper:"):
        return check_scales(_paper_preset(spec), num_steps, source=spec)
    run_dir = calibrated_run(spec)
    if run_dir is not None:
        return _read_scale_file(run_dir / "scales.json", num_steps, machine, run_dir)
    if spec.endswith(".json"):
        return _read_scale_file(user_path(spec, "--scales"), num_steps, machine)
    try:
        sizes = [int(item) for item in spec.split(",")]
    except ValueError:
        raise PatchdbError(f"cannot read the scale schedule {spec!r}: expected {SCALE_SPEC_HELP}") from None
    if len(sizes) == 1:
        sizes = sizes * num_steps
    return check_scales(sizes, num_steps, source=spec)


def check_scale_spec(machine: str, scale_spec: str | None) -> None:
    """PatchdbError where a scale schedule is given to a machine without a patch size (IS, ES)."""
    if scale_spec is not None and machine not in PATCH_MACHINES:
        raise PatchdbError(f"the {machine} machine has no patch size, so --scales would be ignored: drop it")


def _read_scale_file(path: Path, num_steps: int | None, machine: str | None, run_dir: Path | None = None) -> list[int]:
    """The schedule in a JSON file, of num_steps entries (None: of any length); run_dir: the run whose calibrated
    schedule it is (calibrated:RUN_DIR), whose recalibration a wrong length suggests."""
    if not path.is_file():
        raise PatchdbError(f"scale file {path} does not exist; write it with `patchdb calibrate --model RUN_DIR --out "
                           f"{shlex.quote(str(path))}` "
                           "(by default RUN_DIR/scales.json, which --scales calibrated:RUN_DIR reads) or give another --scales")
    rewrite = (f"write it again with `patchdb calibrate --model RUN_DIR --out {shlex.quote(str(path))}`" if run_dir is None else
               f"recalibrate: `{calibrate_command(run_dir, machine, num_steps)}`")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PatchdbError(f"scale file {path} is not valid JSON ({error}); {rewrite}") from None
    sizes = content.get("scales") if isinstance(content, dict) else content
    if not isinstance(sizes, list):
        raise PatchdbError(f"scale file {path} must hold a list of sizes or an object with a 'scales' list; {rewrite}")
    calibrated_for = content.get("machine") if isinstance(content, dict) else None
    if machine is not None and calibrated_for is not None and calibrated_for != machine:
        raise PatchdbError(f"scale file {path} was calibrated for the {calibrated_for} machine, not {machine}; calibrate one "
                           f"with `patchdb calibrate --model RUN_DIR --machine {machine} --out FILE.json` "
                           "and give --scales FILE.json")
    remedy = "change --steps" if run_dir is None else \
        f"change --steps, or recalibrate for {num_steps} steps: `{calibrate_command(run_dir, machine, num_steps)}`"
    return check_scales(sizes, num_steps, source=str(path), remedy=remedy)


def calibrated_run(spec: str) -> Path | None:
    """The run folder of a 'calibrated:RUN_DIR' spec (~ expanded), None for any other spec."""
    spec = str(spec).strip()
    if not spec.startswith("calibrated:"):
        return None
    return user_path(spec.removeprefix("calibrated:"), "--scales calibrated:")


def calibrate_command(run_dir: "str | Path", machine: str | None, num_steps: int | None) -> str:
    """The `patchdb calibrate` command that writes run_dir/scales.json, which --scales calibrated:RUN_DIR reads, for the
    machine and num_steps (None: calibrate's defaults)."""
    machine_option = "" if machine is None else f" --machine {machine}"
    steps_option = "" if num_steps is None else f" --steps {num_steps}"
    return f"patchdb calibrate --model {model_argument(run_dir)}{machine_option}{steps_option}"


def model_argument(run_dir: "str | Path") -> str:
    """run_dir as --model (calibrate's and compare's) reads it back from a shell: quoted, and a folder named as an
    architecture written ./NAME, which --model would take for the project's cached network."""
    text = str(run_dir)
    return shlex.quote(f"./{text}" if text in ARCHITECTURES else text)


def check_scales(sizes: list, num_steps: int | None, source: str = "scales", remedy: str = "change --steps") -> list[int]:
    """Validate a schedule: exactly num_steps (None: one or more) positive odd integers; remedy: the fix a wrong length
    suggests besides a schedule of that length."""
    if num_steps is None and not sizes:
        raise PatchdbError(f"{source}: the schedule is empty; it needs one patch size per sampling step")
    if num_steps is not None and len(sizes) != num_steps:
        raise PatchdbError(
            f"{source}: the schedule has {len(sizes)} entries but the sampler has {num_steps} steps; "
            f"give one patch size per step (entry i is used at t = i/{num_steps}) or {remedy}"
        )
    for index, size in enumerate(sizes):
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % 2 == 0:
            raise PatchdbError(f"{source}: entry {index} is {size!r}; patch sizes must be positive odd integers")
    return list(sizes)


PATCH_SIZES_HELP = "'paper:KEY', 'calibrated:RUN_DIR' or FILE.json (the sizes of that schedule)"
"""The schedules whose patch sizes parse_patch_sizes takes besides a list of sizes."""


def parse_patch_sizes(spec: str, machine: str | None = None) -> list[int]:
    """The distinct patch sizes, ascending, of a list ('3,5,7' or '3,5,...,17', see parse_size_list) or of every step of
    a schedule (PATCH_SIZES_HELP: what a store serving that schedule needs); machine: the patch machine the sizes are
    for, which a calibrated schedule must have been calibrated for (None: unchecked). Sizes are checked by their user."""
    spec = str(spec).strip()
    run_dir = calibrated_run(spec)
    if spec.startswith("paper:"):
        sizes = _paper_preset(spec)
    elif run_dir is not None:
        sizes = _read_scale_file(run_dir / "scales.json", None, machine, run_dir)
    elif spec.endswith(".json"):
        sizes = _read_scale_file(user_path(spec, "--scales"), None, machine)
    else:
        sizes = parse_size_list(spec, "the patch sizes", f"or {PATCH_SIZES_HELP}")
    return sorted(set(sizes))


def parse_size_list(text: str, what: str = "the sizes", alternatives: str = "") -> list[int]:
    """'3,5,7' or an arithmetic range written '3,5,...,17' -> list of ints; what and alternatives name them in errors."""
    items = [item.strip() for item in text.split(",")]
    try:
        if "..." in items:
            if len(items) != 4 or items[2] != "...":
                raise ValueError
            first, second, last = int(items[0]), int(items[1]), int(items[3])
            if second <= first or (last - first) % (second - first):
                raise ValueError
            if first < 1 or last > MAX_PATCH_SIZE:  # before the range is expanded: a huge one would not fit in memory
                raise PatchdbError(f"{what} {text!r} leave 1..{MAX_PATCH_SIZE}, the patch sizes that {IMAGE_SIZE}x{IMAGE_SIZE} "
                                   f"images allow; keep the range within them")
            return list(range(first, last + 1, second - first))
        return [int(item) for item in items]
    except ValueError:
        raise PatchdbError(f"cannot read {what} {text!r}: write a comma list '3,5,7' or a range '3,5,...,17' "
                           f"{alternatives}".rstrip()) from None


def _paper_preset(spec: str) -> list[int]:
    """The schedule of a 'paper:KEY' spec; an unknown key is an error listing the known ones."""
    key, presets = spec.removeprefix("paper:"), paper_scales()
    if key not in presets:
        raise PatchdbError(f"unknown paper scale preset {key!r}; choose one of: {', '.join(sorted(presets))}")
    return presets[key]
