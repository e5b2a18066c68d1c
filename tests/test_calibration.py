"""Calibration: the index convention end to end (a 'network' that is a machine at a known schedule), parsing, files."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from patchdb.calibration import (
    calibrate_scales, check_candidates, check_schedule_path, largest_candidate_warning, median_candidate, score_similarity,
    write_scales,
)
from patchdb.comparison import seeded_inputs
from patchdb.data import load_dataset
from patchdb.errors import PatchdbError
from patchdb.machines import make_machine
from patchdb.scales import paper_scales, parse_patch_sizes, parse_scales, parse_size_list
from tests.conftest import quantised_images, tiny_dataset

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_STEPS = 6
KNOWN = [5, 5, 3, 7, 3, 5]  # entry i at t = i/6; entry 0 must come out as a copy of entry 1


def machine_at_schedule(machine, schedule):
    """A score model that is the machine at schedule[i] when called at t = i/n (the t = 1 step uses entry n-1)."""
    def model(x, t, labels=None, patch_size=None):
        return machine(x, t, labels=labels, patch_size=schedule[min(round(t * NUM_STEPS), NUM_STEPS - 1)])
    return model


@pytest.mark.parametrize("metric", ["cos", "l2"])
@pytest.mark.parametrize("conditional", [False, True])
def test_calibration_recovers_the_schedule_at_the_index_it_was_used(metric, conditional):
    dataset = tiny_dataset(labelled=conditional, num_images=6, side=8, seed=4)
    machine = make_machine("els", dataset, dtype=torch.float64)
    noise, labels = seeded_inputs(7, 3, (1, 8, 8), dataset.num_classes if conditional else None)
    result = calibrate_scales(machine_at_schedule(machine, KNOWN), machine, noise.double(), labels, NUM_STEPS,
                              [3, 5, 7], metric, show_progress=False)
    assert result["scales"][1:] == KNOWN[1:]
    assert result["scales"][0] == KNOWN[1]
    assert all(sizes == [KNOWN[i]] * 3 for i, sizes in enumerate(result["per_sample"]) if i > 0)
    assert result["at_largest_candidate"] == [3]  # KNOWN takes the largest candidate, 7, at t = 3/6 only
    assert "largest candidate, 7, at t = 0.5:" in largest_candidate_warning(result, NUM_STEPS, "els")


def test_calibration_in_batches_equals_calibration_at_once():
    dataset = tiny_dataset(labelled=True, num_images=6, side=8, seed=4)
    machine = make_machine("els", dataset, dtype=torch.float64)
    noise, labels = seeded_inputs(7, 3, (1, 8, 8), dataset.num_classes)
    network = machine_at_schedule(machine, KNOWN)
    whole, batched = (calibrate_scales(network, machine, noise.double(), labels, NUM_STEPS, [3, 5, 7], "l2",
                                       show_progress=False, batch_size=size) for size in (3, 2))
    assert whole["per_sample"] == batched["per_sample"] and whole["similarity"] == batched["similarity"]
    assert torch.equal(whole["samples"], batched["samples"])


def test_median_similarity_of_an_even_number_of_samples_averages_the_middle_two(monkeypatch):
    import patchdb.calibration

    dataset = tiny_dataset(labelled=False, num_images=6, side=8, seed=4)
    machine = make_machine("els", dataset, dtype=torch.float64)
    noise, _ = seeded_inputs(7, 2, (1, 8, 8))
    monkeypatch.setattr(patchdb.calibration, "score_similarity", lambda *arguments: torch.tensor([0.0, 1.0]))
    result = calibrate_scales(machine_at_schedule(machine, KNOWN), machine, noise.double(), None, NUM_STEPS, [3, 5],
                              show_progress=False)
    assert result["similarity"] == [[0.5, 0.5]] * NUM_STEPS


def test_no_warning_below_the_largest_candidate_nor_at_the_largest_patch_size():
    assert largest_candidate_warning({"scales": KNOWN, "at_largest_candidate": []}, NUM_STEPS, "els") is None
    at_63 = {"scales": [63] * 3, "at_largest_candidate": [1, 2]}
    assert largest_candidate_warning(at_63, 3, "bbels") is None  # zero-padded patches stop at 63 on 32x32 images
    assert largest_candidate_warning(at_63, 3, "els").endswith("(e.g. 3,5,...,65)")  # circular ones at 65


def test_a_warning_for_another_command_gives_the_calibrate_command():
    """compare calibrates a run on its own, and has no --candidates: its warning names the command that recalibrates."""
    at_7 = {"scales": [7] * 3, "at_largest_candidate": [2]}
    assert largest_candidate_warning(at_7, 3, "ls", "runs/a b").endswith(
        "calibrate with larger candidates: `patchdb calibrate --model 'runs/a b' --machine ls --steps 3 --candidates "
        "3,5,...,17`")


@pytest.mark.parametrize("architecture, largest", [("resnet", 19), ("unet", 27)])
def test_default_candidates_reach_the_architectures_largest_published_scale(tmp_path, architecture, largest):
    """The authors' calibrated schedules reach 19 for ResNets (CelebA) and 27 for UNets: a default that stopped short
    would cap them."""
    published = json.loads((Path(__file__).parents[1] / "patchdb" / "resources" / "paper-scales.json").read_text())
    assert largest == max(max(schedule) for key, schedule in published["scales"].items() if f"-{architecture}-" in key)
    from click.testing import CliRunner
    from cli.main import main
    from patchdb.networks import NetworkConfig
    from patchdb.training import TrainingConfig, train_network

    np.savez(tmp_path / "train.npz", images=quantised_images(2, 4, 32).numpy())
    spec = f"file:{tmp_path / 'train.npz'}"
    train_network(tmp_path / "run", load_dataset(spec), spec, NetworkConfig(architecture=architecture, width=8, num_hidden_layers=1,
                  embedding_dim=16), TrainingConfig(epochs=1, batch_size=4), show_progress=False)
    result = CliRunner().invoke(main, ["calibrate", "--model", str(tmp_path / "run"), "--machine", "ls", "--samples", "1",
                                       "--steps", "2"])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "run" / "scales.json").read_text())
    assert written["candidates"] == list(range(3, largest + 1, 2))


def test_scales_file_is_read_back_by_every_scale_spec(tmp_path):
    result = {"scales": KNOWN, "per_sample": [[s, s] for s in KNOWN], "similarity": [[1.0] * 3] * NUM_STEPS}
    path = write_scales(tmp_path / "scales.json", result, machine="bbels", metric="cos", candidates=[3, 5, 7],
                        model=tmp_path, seed=0)
    content = json.loads(path.read_text())
    assert content["convention"] == "entry i is the patch size at t = i/n" and content["num_steps"] == NUM_STEPS
    assert parse_scales(f"calibrated:{tmp_path}", NUM_STEPS) == KNOWN
    assert parse_scales(str(path), NUM_STEPS) == KNOWN
    assert (tmp_path / "scales.png").stat().st_size > 0


def test_patch_sizes_of_a_schedule_are_its_distinct_sizes(tmp_path):
    """build-index --scales takes the schedule that sample --scales will read: calibrated:RUN_DIR, FILE.json, paper:KEY."""
    path = write_scales(tmp_path / "scales.json", {"scales": [7, 3, 5, 5], "per_sample": [[7], [3], [5], [5]],
                                                         "similarity": [[1.0]] * 4},
                        machine="bbels", metric="cos", candidates=[3, 5, 7], model=tmp_path, seed=0)
    assert parse_patch_sizes(f"calibrated:{tmp_path}", "bbels") == [3, 5, 7] == parse_patch_sizes(str(path), "bbels")
    with pytest.raises(PatchdbError, match="calibrated for the bbels machine, not ls"):
        parse_patch_sizes(f"calibrated:{tmp_path}", "ls")
    with pytest.raises(PatchdbError, match="does not exist; write it with `patchdb calibrate"):
        parse_patch_sizes(f"calibrated:{tmp_path / 'untrained'}", "bbels")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(PatchdbError, match="the schedule is empty"):
        parse_patch_sizes(str(tmp_path / "empty.json"))
    preset = paper_scales()["fashion-mnist-resnet-zeros-conditional"]
    assert parse_patch_sizes("paper:fashion-mnist-resnet-zeros-conditional") == sorted(set(preset)) != preset
    assert parse_patch_sizes("7,3,7") == [3, 7]


def test_median_candidate_rounds_to_a_candidate():
    assert median_candidate([3, 3, 7, 7], [3, 5, 7]) == 5
    assert median_candidate([3, 5], [3, 5, 7]) == 3  # median 4: tie goes to the smaller size
    assert median_candidate([5, 7, 7], [3, 5, 7]) == 7


def test_score_similarity_prefers_the_closer_score():
    target = torch.randn(2, 1, 4, 4)
    near, far = target + 0.01 * torch.randn_like(target), torch.randn_like(target)
    for metric in ("cos", "l2"):
        assert (score_similarity(near, target, metric) > score_similarity(far, target, metric)).all()
    assert torch.allclose(score_similarity(3 * target, target, "cos"), torch.ones(2, dtype=torch.float64))


def test_size_lists_and_ranges():
    assert parse_size_list("3,5,...,17") == [3, 5, 7, 9, 11, 13, 15, 17] == parse_patch_sizes("3,5,...,17")
    assert parse_size_list("7, 3,5") == [7, 3, 5]
    for bad in ("3,5,...", "3,x", "3,5,...,16", "5,3,...,17"):
        with pytest.raises(PatchdbError, match="cannot read candidates"):
            parse_size_list(bad, "candidates")
    for bad in ([], [4], [3, -1], [3, True]):
        with pytest.raises(PatchdbError):
            check_candidates(bad)


def test_a_range_beyond_every_patch_size_is_refused_before_it_is_expanded():
    assert parse_size_list("3,5,...,65")[-1] == 65  # circular padding's largest on 32x32 images
    for huge in ("3,5,...,67", "3,5,...,999999999999", "-999999999999,-999999999997,...,5"):
        with pytest.raises(PatchdbError, match=r"leave 1\.\.65, the patch sizes that 32x32 images allow"):
            parse_size_list(huge, "candidates")


def test_unknown_metric_is_refused():
    dataset = tiny_dataset(labelled=False)
    machine = make_machine("els", dataset)
    with pytest.raises(PatchdbError):
        calibrate_scales(machine, machine, torch.randn(1, 1, 8, 8), None, 4, [3], metric="dot", show_progress=False)


def test_calibrate_writes_only_over_its_own_schedules(tmp_path):
    """--out may replace a schedule that calibrate wrote (and its plot), never another command's record (run.json,
    compare.json, config.json, FILE.json of another command's FILE.png, even where absent) or another file."""
    from click.testing import CliRunner
    from cli.main import main
    from patchdb.networks import NetworkConfig
    from patchdb.training import TrainingConfig, train_network

    # a run for the command to accept as --model: the refusals come before its data is read
    train_network(tmp_path / "run", tiny_dataset(labelled=False), None, NetworkConfig(width=8, num_hidden_layers=1,
                  embedding_dim=16), TrainingConfig(epochs=1, batch_size=8), show_progress=False)
    result = {"scales": KNOWN, "per_sample": [[s, s] for s in KNOWN], "similarity": [[1.0] * 3] * NUM_STEPS}
    write_scales(tmp_path / "scales.json", result, machine="bbels", metric="cos", candidates=[3, 5, 7], model=tmp_path, seed=0)
    check_schedule_path(tmp_path / "scales.json")  # a schedule of calibrate's, its plot beside it
    check_schedule_path(tmp_path / "new.json")
    (tmp_path / "other.json").write_text(json.dumps({"scales": KNOWN}))
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "grid.png").write_bytes(b"a sample run's picture")
    overwrite = "which would overwrite other commands' files"
    for name, message in (("run.json", overwrite), ("compare.json", overwrite),
                          ("other.json", "exists and is not a schedule written by `patchdb calibrate`"),
                          ("broken.json", "exists and is not a schedule"),
                          ("grid.json", overwrite)):
        with pytest.raises(PatchdbError, match=re.escape(message)):
            check_schedule_path(tmp_path / name)
        outcome = CliRunner().invoke(main, ["calibrate", "--model", str(tmp_path / "run"), "--out", str(tmp_path / name)])
        assert outcome.exit_code == 1 and message in outcome.output, outcome.output
    assert json.loads((tmp_path / "other.json").read_text()) == {"scales": KNOWN}
    assert (tmp_path / "grid.png").read_bytes() == b"a sample run's picture"
    (tmp_path / "scales.json").unlink()
    check_schedule_path(tmp_path / "scales.json")  # a plot left alone by its deleted schedule is calibrate's to replace
    (tmp_path / "figure.png").write_bytes((tmp_path / "grid.png").read_bytes())  # a picture of the user's own
    with pytest.raises(PatchdbError, match="figure.png exists and is not a schedule's plot"):
        check_schedule_path(tmp_path / "figure.json")


@pytest.mark.parametrize("recorded, now, message", [
    (20, 500, "at batch 20, while this one has trained 500 batches (this network before it trained further, or another"),
    (500, 20, "was calibrated on another network than"),  # fewer batches now: not this network trained further
])
def test_a_schedule_of_other_weights_names_only_the_causes_that_fit_the_batch_counts(tmp_path, recorded, now, message):
    from types import SimpleNamespace

    from patchdb.calibration import check_run_schedule
    from patchdb.training import TrainingProgress

    result = {"scales": KNOWN, "per_sample": [[s, s] for s in KNOWN], "similarity": [[1.0] * 3] * NUM_STEPS}
    path = write_scales(tmp_path / "scales.json", result, machine="bbels", metric="cos", candidates=[3, 5, 7],
                        model=tmp_path / "a", seed=0, model_training=TrainingProgress(recorded, 500), model_weights="old")
    network = SimpleNamespace(weights_digest=lambda: "new", training=TrainingProgress(now, 500))
    with pytest.raises(PatchdbError, match=re.escape(message)):
        check_run_schedule(path, tmp_path / "b", network, NUM_STEPS)


def test_a_run_folder_given_as_a_path_is_checked_as_a_named_one(tmp_path):
    """calibrate_run(Path('resnet')) is that folder, never the cached network, and its settings are checked."""
    from patchdb.calibration import calibrate_run
    from patchdb.networks import NetworkConfig
    from patchdb.training import TrainingConfig, train_network

    train_network(tmp_path / "resnet", tiny_dataset(labelled=False), None, NetworkConfig(width=8, num_hidden_layers=1,
                  embedding_dim=16), TrainingConfig(epochs=1, batch_size=8), show_progress=False)
    with pytest.raises(PatchdbError, match="holds a network with zeros padding, not circular; drop --padding"):
        calibrate_run(tmp_path / "resnet", padding="circular", candidates=[3], samples=1, num_steps=2)
