"""Comparison statistics on constructed pairs, seeded inputs, the Gaussian baseline, and a tiny whole run."""

import json
import math
import re

import numpy as np
import pytest
import torch

from patchdb.comparison import (
    compare_model, comparison_summary, held_out_spec, image_statistics, run_comparison, seeded_inputs, summarize,
)
from patchdb.errors import PatchdbError
from patchdb.gaussian import GaussianScore
from patchdb.networks import NetworkConfig
from patchdb.schedule import alpha_bar
from patchdb.training import TrainingConfig, train_network
from tests.conftest import quantised_images, tiny_dataset

pytestmark = pytest.mark.usefixtures("single_thread")


def test_pearson_r_r_squared_and_mse_on_constructed_pairs():
    image = torch.randn(1, 1, 6, 6, dtype=torch.float64)
    affine = image_statistics(2 * image + 1, image)
    assert affine["pearson_r"].item() == pytest.approx(1.0)
    assert affine["r_squared"].item() < 0.5  # a perfect correlation is not a perfect prediction
    assert image_statistics(-image, image)["pearson_r"].item() == pytest.approx(-1.0)
    same = image_statistics(image, image)
    assert same["r_squared"].item() == pytest.approx(1.0) and same["mse"].item() == 0.0
    prediction, target = torch.randn(3, 1, 5, 5), torch.randn(3, 1, 5, 5)
    stats = image_statistics(prediction, target)
    for k in range(3):
        y_hat, y = prediction[k].flatten().double().numpy(), target[k].flatten().double().numpy()
        assert stats["pearson_r"][k].item() == pytest.approx(np.corrcoef(y_hat, y)[0, 1])
        assert stats["r_squared"][k].item() == pytest.approx(1 - ((y - y_hat) ** 2).sum() / ((y - y.mean()) ** 2).sum())
        assert stats["mse"][k].item() == pytest.approx(((y - y_hat) ** 2).mean())
    with pytest.raises(PatchdbError):
        image_statistics(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 5, 5))


def test_statistics_of_constant_images_are_undefined_not_extreme():
    """A constant network image has no R^2 (its variance is 0) and no r; a constant prediction has no r, only R^2."""
    image, constant = torch.randn(1, 1, 6, 6), torch.full((1, 1, 6, 6), -1.0)
    of_constant_target = image_statistics(image, constant)
    assert of_constant_target["pearson_r"].isnan().all() and of_constant_target["r_squared"].isnan().all()
    of_constant_prediction = image_statistics(constant, image)
    assert of_constant_prediction["pearson_r"].isnan().all()
    assert of_constant_prediction["r_squared"].item() == pytest.approx(1 - ((image + 1) ** 2).sum() /
                                                                        ((image - image.mean()) ** 2).sum())


def test_summary_and_fraction_beating_the_baseline():
    assert summarize([1, 2, 3, 4, 5]) == {"median": 3, "q1": 2, "q3": 4, "mean": 3, "min": 1, "max": 5, "undefined": 0}
    stats = {"bbels": {"pearson_r": torch.tensor([0.9, 0.5, 0.7, 0.6])},
             "is": {"pearson_r": torch.tensor([0.1, 0.6, 0.7, 0.2])}}
    summary = comparison_summary({"statistics": stats}, "bbels")
    assert summary["fraction_bbels_beats_is"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert summary["summary"]["bbels"]["pearson_r"]["median"] == pytest.approx(0.65)


def test_plots_take_seeds_whose_r_is_undefined(tmp_path):
    """A constant image's r is NaN: the scatter leaves it out, pairs.png ranks it worst."""
    from patchdb.comparison import plot_pairs, plot_scatter, ranked_seeds

    assert ranked_seeds(torch.tensor([0.5, float("nan"), 0.9, 0.1])) == [2, 0, 3, 1]
    nan = float("nan")
    plot_scatter(tmp_path / "scatter.png", torch.tensor([0.9, nan, 0.5]), torch.tensor([0.5, 0.6, 0.4]), "bbels")
    images = torch.zeros(4, 1, 8, 8)
    plot_pairs(tmp_path / "pairs.png", images, images, torch.tensor([0.5, nan, 0.9, 0.1]), [0, 1, 2, 3], "bbels")
    assert (tmp_path / "scatter.png").stat().st_size > 0 and (tmp_path / "pairs.png").stat().st_size > 0


def test_undefined_statistics_are_counted_and_left_out():
    nan = float("nan")
    assert summarize([1.0, nan, 3.0]) == {"median": 2, "q1": 1.5, "q3": 2.5, "mean": 2, "min": 1, "max": 3,
                                          "undefined": 1}
    assert summarize([nan])["median"] is None
    stats = {"bbels": {"pearson_r": torch.tensor([0.9, nan, 0.1])}, "is": {"pearson_r": torch.tensor([0.5, 0.6, nan])}}
    assert comparison_summary({"statistics": stats}, "bbels")["fraction_bbels_beats_is"] == 1.0  # seed 0 alone
    stats["is"]["pearson_r"][0] = nan
    assert comparison_summary({"statistics": stats}, "bbels")["fraction_bbels_beats_is"] is None


def test_each_sample_regenerates_alone_from_its_seed():
    noise, labels = seeded_inputs(10, 4, (1, 8, 8), 10)
    alone_noise, alone_labels = seeded_inputs(12, 1, (1, 8, 8), 10)
    assert torch.equal(noise[2], alone_noise[0]) and labels[2] == alone_labels[0]
    assert not torch.equal(noise[0], noise[1])
    unlabelled_noise, none = seeded_inputs(10, 4, (1, 8, 8))
    assert none is None and torch.equal(unlabelled_noise, noise)


@pytest.mark.parametrize("conditional", [False, True])
def test_gaussian_score_equals_the_direct_float64_formula(conditional):
    dataset = tiny_dataset(labelled=True, num_images=12, side=4, seed=3)
    model = GaussianScore(dataset)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0]) if conditional else None
    for t in (0.1, 0.5, 1.0):
        score = model(x, t, labels)
        signal = alpha_bar(t)
        for k in range(3):
            images = dataset.images if labels is None else dataset.images[dataset.labels == labels[k]]
            flat = images.reshape(images.shape[0], -1).double()
            mean = flat.mean(0)
            covariance = (flat - mean).T @ (flat - mean) / flat.shape[0]
            system = signal * covariance + (1 - signal) * torch.eye(16, dtype=torch.float64)
            direct = -torch.linalg.solve(system, x[k].flatten() - math.sqrt(signal) * mean)
            assert torch.allclose(score[k].flatten(), direct, atol=1e-9)


def test_commands_report_bad_inputs_without_traceback(tmp_path):
    from click.testing import CliRunner
    from cli.main import main

    runner = CliRunner()
    np.savez(tmp_path / "noise.npz", noise=np.zeros((1, 1, 32, 32)))
    (tmp_path / "afile").write_text("a file, not a folder")
    for arguments in (["compare", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
                      ["calibrate", "--model", str(tmp_path / "missing")],
                      ["calibrate", "--model", str(tmp_path), "--candidates", "3,4"],
                      ["calibrate", "--model", str(tmp_path), "--machine", "es"],
                      ["calibrate", "--model", str(tmp_path), "--device", "bogus"],
                      ["sample", "--seed", str(10**20), "--out", str(tmp_path / "out")],
                      ["sample", "--memory-budget", "nan", "--out", str(tmp_path / "out")],
                      ["sample", "--memory-budget", "1e300", "--out", str(tmp_path / "out")],
                      ["sample", "--out", ""], ["train", "--out", " "],
                      ["calibrate", "--model", str(tmp_path), "--memory-gb", "1e300"],
                      ["sample", "--scales", "999999", "--out", str(tmp_path / "out")],
                      ["sample", "--scales", "99999999999999999999", "--out", str(tmp_path / "out")],
                      ["build-index", "--scales", "999999", "--out", str(tmp_path / "store")],
                      ["build-index", "--scales", "3,5,...,99999999999", "--out", str(tmp_path / "store")],
                      ["compare", "--model", str(tmp_path), "--machine", "is", "--scales", "3", "--out", str(tmp_path / "out")],
                      ["compare", "--model", str(tmp_path), "--test-dataset", "mnist", "--out", str(tmp_path / "out")],
                      ["compare", "--model", str(tmp_path), "--train", "--out", str(tmp_path / "out")],
                      ["sample", "--noise", str(tmp_path / "noise.npz"), "--out", str(tmp_path / "out")],
                      ["build-index", "--machine", "els", "--scales", "99", "--out", str(tmp_path / "store")],
                      ["build-index", "--scales", "3", "--out", str(tmp_path / "afile" / "store")],
                      ["train", "--dataset", "file:" + str(tmp_path / "none.npz"), "--out", str(tmp_path / "run")]):
        result = runner.invoke(main, arguments)
        assert result.exit_code != 0 and "Error:" in result.output and result.exception is not None
        assert not isinstance(result.exception, (AttributeError, KeyError, TypeError, ValueError)), result.exception


def test_held_out_split_of_named_and_unknown_specs():
    assert held_out_spec("fashion-mnist:train:1000", 50) == "fashion-mnist:test:50"
    with pytest.raises(PatchdbError):
        held_out_spec("file:/tmp/x.npz", 5)


def test_tiny_comparison_run_writes_every_output(tmp_path):
    images = quantised_images(5, 8, 32)
    np.savez(tmp_path / "train.npz", images=images.numpy(), labels=np.array([0, 1] * 4))
    spec = f"file:{tmp_path / 'train.npz'}"
    from patchdb.data import load_dataset
    dataset = load_dataset(spec)
    network_config = NetworkConfig(width=8, num_hidden_layers=1, embedding_dim=16, num_classes=2)
    train_network(tmp_path / "run", dataset, spec, network_config, TrainingConfig(epochs=1, batch_size=8),
                  show_progress=False)
    report = run_comparison(tmp_path / "run", tmp_path / "out", machine="bbels", scales=[3, 3, 5], scales_source="3,3,5",
                            num_steps=3, num=3, seed=4, batch_size=2, show_progress=False)
    assert set(report["summary"]) == {"bbels", "is", "gaussian"}
    assert report["training"] == {"batches_done": 1, "batches_configured": 1}
    assert 0.0 <= report["fraction_bbels_beats_is"] <= 1.0
    assert [entry["seed"] for entry in report["per_seed"]] == [4, 5, 6]
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["scales"] == [3, 3, 5]
    outputs = np.load(tmp_path / "out" / "outputs.npz")
    assert outputs["network"].shape == outputs["bbels"].shape == (3, 1, 32, 32)
    regenerated, labels = seeded_inputs(5, 1, (1, 32, 32), 2)
    assert np.array_equal(outputs["noise"][1], regenerated[0].numpy()) and outputs["labels"][1] == labels[0]
    for name in ("scatter.png", "pairs.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0

    from click.testing import CliRunner
    from cli.main import main

    # IS has no patch size: compare runs it without calibrating a schedule first
    result = CliRunner().invoke(main, ["compare", "--model", str(tmp_path / "run"), "--machine", "is", "--steps", "3",
                                       "--num", "2", "--seed", "4", "--batch-size", "2", "--out", str(tmp_path / "out-is")])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "run" / "scales.json").exists()
    ideal = json.loads((tmp_path / "out-is" / "compare.json").read_text())
    assert set(ideal["summary"]) == {"is", "gaussian"} and "fraction_is_beats_is" not in ideal
    assert not (tmp_path / "out-is" / "scatter.png").exists()  # IS against itself
    assert ideal["per_seed"][0]["pearson_r"]["is"] == pytest.approx(report["per_seed"][0]["pearson_r"]["is"])


def test_compare_calibrating_on_its_own_says_so_on_stderr_with_the_command_for_larger_candidates(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from cli.main import main

    np.savez(tmp_path / "train.npz", images=quantised_images(6, 8, 16).numpy())
    spec = f"file:{tmp_path / 'train.npz'}"
    from patchdb.data import load_dataset
    train_network(tmp_path / "run", load_dataset(spec), spec, NetworkConfig(width=8, num_hidden_layers=1, embedding_dim=16),
                  TrainingConfig(epochs=1, batch_size=8), show_progress=False)
    monkeypatch.setattr("patchdb.calibration.default_candidates", lambda architecture: [3])  # every step at the largest
    result = CliRunner().invoke(main, ["compare", "--model", str(tmp_path / "run"), "--steps", "2", "--num", "1",
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "has no scales.json: calibrating bbels first" in result.stderr
    assert f"`patchdb calibrate --model {tmp_path / 'run'} --machine bbels --steps 2 --candidates 3,5,...,13`" in result.stderr
    assert "warning" not in result.stdout and "bbels beats IS" in result.stdout

def test_single_step_agreement_is_one_for_the_model_itself_and_uses_each_step_scale():
    from patchdb.comparison import single_step_agreement
    from patchdb.machines import make_machine

    dataset = tiny_dataset(labelled=False, num_images=6, side=8, seed=2)
    machine = make_machine("els", dataset, dtype=torch.float64)
    scales = [3, 3, 5, 7]
    used = []

    def network(x, t, labels=None, patch_size=None):
        used.append(round(t * 4))
        return machine(x, t, labels, patch_size=scales[min(round(t * 4), 3)])

    result = single_step_agreement(network, {"els": (machine, scales), "wrong": (machine, [7, 7, 7, 3])},
                                   dataset.images[:3].double(), None, 4, seed=0, show_progress=False)
    assert result["t"] == [1.0, 0.75, 0.5, 0.25] and used == [4, 3, 2, 1]
    assert result["els"]["median"] == pytest.approx([1.0] * 4)
    assert result["wrong"]["median"][1] < 0.999  # t = 3/4 used entry 3, where the schedules differ


def test_partly_trained_and_mismatched_runs_are_flagged_before_the_long_work(tmp_path):
    """A partly trained network is compared with a warning (and its progress recorded); a --padding that is not the
    run's own, and held-out images of another shape, are refused before any sampling."""
    from click.testing import CliRunner
    from cli.main import main

    np.savez(tmp_path / "train.npz", images=quantised_images(6, 8, 16).numpy())
    np.savez(tmp_path / "colour.npz", images=np.zeros((4, 16, 16, 3), np.uint8))
    spec = f"file:{tmp_path / 'train.npz'}"
    from patchdb.data import load_dataset
    train_network(tmp_path / "run", load_dataset(spec), spec, NetworkConfig(width=8, num_hidden_layers=1, embedding_dim=16),
                  TrainingConfig(epochs=1, batch_size=8), show_progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())  # as if a 3-epoch run had been stopped after one
    (tmp_path / "run" / "config.json").write_text(json.dumps({**config, "training": {**config["training"], "epochs": 3}}))
    runner = CliRunner()
    result = runner.invoke(main, ["calibrate", "--model", str(tmp_path / "run"), "--candidates", "3,5", "--samples", "1",
                                  "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert "warning: " in result.stderr and "trained 1 of its 3 batches" in result.stderr
    assert "finish it with the train_network call that started it" in result.stderr  # no preset's settings: no command
    assert json.loads((tmp_path / "run" / "scales.json").read_text())["model_training"] == {
        "batches_done": 1, "batches_configured": 3}
    for name in ("schedule.png", "config.json", "loss.json"):  # names whose writing would destroy the schedule or the run
        result = runner.invoke(main, ["calibrate", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "run" / name)])
        assert result.exit_code == 1 and "name the schedule FILE.json" in result.output, result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["training"]["epochs"] == 3
    for arguments, message in ((["--padding", "circular"], "zeros padding, not circular; drop --padding"),
                               (["--single-step", "--test-dataset", f"file:{tmp_path / 'colour.npz'}"],
                                r"are \(3, \d+, \d+\) but the network was trained on \(1, ")):
        result = runner.invoke(main, ["compare", "--model", str(tmp_path / "run"), "--steps", "2", "--num", "1",
                                      "--out", str(tmp_path / "out"), *arguments])
        assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
        assert re.search(message, result.output), result.output
        assert not (tmp_path / "out" / "outputs.npz").exists()


def test_classes_with_gaps_are_drawn_as_sample_draws_them_and_a_rerun_leaves_no_stale_file(tmp_path, monkeypatch):
    """Labels {1, 3}: compare draws each seed's label from the classes present (sample's draw), not from 0..3; a rerun
    without --single-step removes the earlier single_step.png, and one interrupted while writing leaves no compare.json."""
    import patchdb.comparison
    from patchdb.data import load_dataset

    np.savez(tmp_path / "train.npz", images=quantised_images(7, 8, 16).numpy(), labels=np.array([1, 3] * 4))
    spec = f"file:{tmp_path / 'train.npz'}"
    dataset = load_dataset(spec)
    train_network(tmp_path / "run", dataset, spec, NetworkConfig(width=8, num_hidden_layers=1, embedding_dim=16, num_classes=4),
                  TrainingConfig(epochs=1, batch_size=8), show_progress=False)
    options = dict(machine="els", scales=[3, 3], scales_source="3", num_steps=2, num=6, seed=0, batch_size=6,
                   show_progress=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "single_step.png").write_bytes(b"an earlier run's")
    report = run_comparison(tmp_path / "run", tmp_path / "out", **options)
    _, drawn = seeded_inputs(0, 6, (1, 32, 32), dataset.classes)
    assert [entry["label"] for entry in report["per_seed"]] == drawn.tolist() and set(drawn.tolist()) == {1, 3}
    assert not (tmp_path / "out" / "single_step.png").exists()

    def interrupted(*arguments):
        raise KeyboardInterrupt

    monkeypatch.setattr(patchdb.comparison, "plot_pairs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_comparison(tmp_path / "run", tmp_path / "out", **{**options, "seed": 6})
    assert not (tmp_path / "out" / "compare.json").exists()


def test_a_calibrated_schedule_of_another_network_or_of_fewer_batches_is_refused(tmp_path):
    """compare takes a run's own scales.json only where calibrate wrote it for that network's present weights: a copied
    or renamed run keeps its schedule; one calibrated on another network, or before the network trained further, is
    refused with the command that recalibrates it; the same file named with --scales FILE.json is taken as it is."""
    import shutil

    from click.testing import CliRunner
    from cli.main import main

    np.savez(tmp_path / "train.npz", images=quantised_images(8, 8, 16).numpy())
    spec = f"file:{tmp_path / 'train.npz'}"
    from patchdb.data import load_dataset
    dataset, network_config = load_dataset(spec), NetworkConfig(width=8, num_hidden_layers=1, embedding_dim=16)
    train_network(tmp_path / "run", dataset, spec, network_config, TrainingConfig(epochs=1, batch_size=8), show_progress=False)
    train_network(tmp_path / "other", dataset, spec, network_config, TrainingConfig(epochs=1, batch_size=8, seed=1),
                  show_progress=False)
    runner = CliRunner()
    calibrate = ["calibrate", "--model", str(tmp_path / "run"), "--candidates", "3,5", "--samples", "1", "--steps", "2"]
    compare = ["compare", "--steps", "2", "--num", "1", "--out", str(tmp_path / "out")]
    assert runner.invoke(main, [*calibrate, "--out", str(tmp_path / "other" / "scales.json")]).exit_code == 0
    result = runner.invoke(main, [*compare, "--model", str(tmp_path / "other")])
    assert result.exit_code == 1, result.output
    assert f"was calibrated on another network than {tmp_path / 'other'}'s (recorded: {tmp_path / 'run'}); calibrate " \
           f"this run: `patchdb calibrate --model {tmp_path / 'other'} --machine bbels --steps 2`" in result.output
    # once this one has trained more batches than that one had, the message names both possibilities
    train_network(tmp_path / "other", dataset, spec, network_config, TrainingConfig(epochs=2, batch_size=8, seed=1),
                  show_progress=False)
    result = runner.invoke(main, [*compare, "--model", str(tmp_path / "other")])
    assert result.exit_code == 1 and f"on the network of {tmp_path / 'run'} at batch 1, while this one has trained 2 " \
        "batches (this network before it trained further, or another one)" in result.output
    assert runner.invoke(main, calibrate).exit_code == 0
    shutil.copytree(tmp_path / "run", tmp_path / "renamed")  # the same weights: the schedule is still theirs
    assert runner.invoke(main, [*compare, "--model", str(tmp_path / "renamed")]).exit_code == 0
    train_network(tmp_path / "run", dataset, spec, network_config, TrainingConfig(epochs=2, batch_size=8), show_progress=False)
    (tmp_path / "out" / "compare.json").unlink()
    result = runner.invoke(main, [*compare, "--model", str(tmp_path / "run")])
    assert result.exit_code == 1, result.output
    assert "at batch 1, while this one has trained 2 batches (this network before it trained further, or another one); " \
        "recalibrate it: `patchdb calibrate --model" in result.output
    assert not (tmp_path / "out" / "compare.json").exists()
    result = runner.invoke(main, [*compare, "--model", str(tmp_path / "run"), "--scales", str(tmp_path / "run" / "scales.json")])
    assert result.exit_code == 0, result.output


def test_compare_reads_the_checkpoint_once_for_the_warning_the_schedule_check_and_the_comparison(tmp_path,
                                                                                                  monkeypatch):
    from click.testing import CliRunner
    from cli.main import main

    np.savez(tmp_path / "train.npz", images=quantised_images(8, 8, 16).numpy())
    spec = f"file:{tmp_path / 'train.npz'}"
    from patchdb.data import load_dataset
    train_network(tmp_path / "run", load_dataset(spec), spec, NetworkConfig(width=8, num_hidden_layers=1, embedding_dim=16),
                  TrainingConfig(epochs=1, batch_size=8), show_progress=False)
    runner = CliRunner()
    assert runner.invoke(main, ["calibrate", "--model", str(tmp_path / "run"), "--candidates", "3,5", "--samples", "1",
                                "--steps", "2"]).exit_code == 0
    loads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(args) or load(*args, **kwargs))
    result = runner.invoke(main, ["compare", "--model", str(tmp_path / "run"), "--steps", "2", "--num", "1",
                                  "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert len(loads) == 1  # one set of weights: the schedule is checked against the network compared


def test_held_out_labels_the_training_images_lack_are_refused_before_sampling(tmp_path, monkeypatch):
    """--single-step with held-out labels outside the network's classes (7 of 4) or absent from its training images (2)
    is refused before any sampling, not by the embedding or the machine after all of it."""
    import patchdb.comparison
    from patchdb.data import load_dataset

    np.savez(tmp_path / "train.npz", images=quantised_images(7, 8, 16).numpy(), labels=np.array([1, 3] * 4))
    np.savez(tmp_path / "test.npz", images=quantised_images(8, 4, 16).numpy(), labels=np.array([1, 2, 7, 3]))
    spec = f"file:{tmp_path / 'train.npz'}"
    train_network(tmp_path / "run", load_dataset(spec), spec,
                  NetworkConfig(width=8, num_hidden_layers=1, embedding_dim=16, num_classes=4),
                  TrainingConfig(epochs=1, batch_size=8), show_progress=False)

    def sampled(*arguments, **options):
        raise AssertionError("sampled before the held-out labels were checked")

    monkeypatch.setattr(patchdb.comparison, "compare_models", sampled)
    refusal = (r"has labels \[2, 7\] that the network's training images lack \(they hold \[1, 3\]; the network has 4 "
               r"classes\); choose a --test-dataset")
    with pytest.raises(PatchdbError, match=refusal):
        run_comparison(tmp_path / "run", tmp_path / "out", machine="els", scales=[3, 3], scales_source="3", num_steps=2,
                       num=4, single_step=True, test_dataset=f"file:{tmp_path / 'test.npz'}", show_progress=False)
    assert not (tmp_path / "out" / "compare.json").exists()

    import patchdb.calibration
    monkeypatch.setattr(patchdb.calibration, "calibrate_scales", sampled)  # `patchdb compare` without a scales.json
    with pytest.raises(PatchdbError, match=refusal):
        compare_model(str(tmp_path / "run"), tmp_path / "out", machine="els", num_steps=2, num=4, single_step=True,
                      test_dataset=f"file:{tmp_path / 'test.npz'}", show_progress=False)


def test_a_damaged_cached_network_says_to_delete_its_cache_folder(tmp_path, monkeypatch):
    """The fix a run folder's damage suggests (train into a new --out) does not apply to the model cache."""
    from patchdb.comparison import resolve_model

    cached = tmp_path / "cache" / "resnet"
    train_network(cached, tiny_dataset(num_images=8, side=8), None, NetworkConfig(width=8, num_hidden_layers=1,
                  embedding_dim=16), TrainingConfig(epochs=1, batch_size=8), show_progress=False)
    (cached / "checkpoint.pt").write_bytes(b"damaged")
    monkeypatch.setattr("patchdb.training.cached_run_dir", lambda architecture, dataset, **setting: cached)
    with pytest.raises(PatchdbError, match=f"the cached resnet network in {cached} is damaged: delete that folder, then "
                                           r"rerun with --train to train it again \(what is wrong: .*checkpoint.pt: not a "):
        resolve_model("resnet", "default:10")

def test_a_conditional_flag_that_is_not_the_runs_own_is_refused_in_plain_words(tmp_path):
    from patchdb.comparison import resolve_model

    dataset = tiny_dataset(labelled=True, num_images=8, side=8)
    for name, classes in (("conditional", 3), ("unconditional", 0)):
        train_network(tmp_path / name, dataset, None, NetworkConfig(width=8, num_hidden_layers=1, embedding_dim=16,
                      num_classes=classes), TrainingConfig(epochs=1, batch_size=8), show_progress=False)
    with pytest.raises(PatchdbError, match="holds a conditional network; drop --conditional/--unconditional"):
        resolve_model(str(tmp_path / "conditional"), conditional=False)
    with pytest.raises(PatchdbError, match="holds an unconditional network; drop"):
        resolve_model(str(tmp_path / "unconditional"), conditional=True)


def test_a_dataset_naming_the_runs_images_is_accepted_however_it_is_written(tmp_path):
    """compare --dataset with a RUN_DIR: a run on the embedded default (spec null) matches 'default', and a run on a file
    matches the same images under another spec (a LIMIT that keeps them all, a copy); other images are refused, naming
    both data sets (never None)."""
    from patchdb.comparison import resolve_model
    from patchdb.data import load_dataset

    network_config, training_config = NetworkConfig(width=8, num_hidden_layers=1, embedding_dim=16), TrainingConfig(
        epochs=1, batch_size=8, max_images=8)
    train_network(tmp_path / "default-run", load_dataset(None), None, network_config, training_config, show_progress=False)
    assert resolve_model(str(tmp_path / "default-run"), "default") == tmp_path / "default-run"
    images = quantised_images(3, 8, 32).numpy()
    for name in ("train.npz", "copy.npz"):
        np.savez(tmp_path / name, images=images)
    np.savez(tmp_path / "other.npz", images=quantised_images(4, 8, 32).numpy())
    spec = f"file:{tmp_path / 'train.npz'}"
    train_network(tmp_path / "run", load_dataset(spec), spec, network_config, training_config, show_progress=False)
    for same in (f"{spec}:8", f"file:{tmp_path / 'copy.npz'}"):
        assert resolve_model(str(tmp_path / "run"), same) == tmp_path / "run"
    with pytest.raises(PatchdbError, match=r"was trained on 'default' \(8 images, fingerprint [0-9a-f]{12}\), not on the "
                                           r"images of 'file:.*other\.npz'.*; drop --dataset"):
        resolve_model(str(tmp_path / "default-run"), f"file:{tmp_path / 'other.npz'}")


def test_a_folder_named_as_an_output_and_a_patch_size_too_large_are_refused_before_the_network_samples(tmp_path):
    from click.testing import CliRunner
    from cli.main import main
    from patchdb.data import load_dataset

    np.savez(tmp_path / "train.npz", images=quantised_images(7, 8, 32).numpy())
    spec = f"file:{tmp_path / 'train.npz'}"
    train_network(tmp_path / "run", load_dataset(spec), spec, NetworkConfig(width=8, num_hidden_layers=1, embedding_dim=16),
                  TrainingConfig(epochs=1, batch_size=8), show_progress=False)
    compare = ["compare", "--model", str(tmp_path / "run"), "--steps", "2", "--num", "1", "--scales", "3"]
    for name in ("compare.json", "single_step.png"):  # written last; removed as stale
        (tmp_path / name / name).mkdir(parents=True)
        result = CliRunner().invoke(main, [*compare, "--out", str(tmp_path / name)])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert (f"Error: {tmp_path / name / name} is a folder, where this command writes its file {name}; choose another "
                "--out") in result.output
        assert "sampling network" not in result.output and list((tmp_path / name).iterdir()) == [tmp_path / name / name]
    result = CliRunner().invoke(main, [*compare[:-1], "65", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Error: patch size 65 is larger than a 32x32 image's patches" in result.output
    assert "sampling network" not in result.output


def test_the_scatter_draws_the_dots_at_its_limits_whole(monkeypatch, tmp_path):
    from patchdb.comparison import plot_scatter

    figures = []
    monkeypatch.setattr("patchdb.comparison.save_figure", lambda figure, path, **options: figures.append(figure))
    plot_scatter(tmp_path / "scatter.png", torch.tensor([0.95, 1.0]), torch.tensor([-0.213, 0.4]), "bbels")
    (axis,) = figures[0].axes
    for low, high in (axis.get_xlim(), axis.get_ylim()):
        assert low < -0.24 and high > 1.03  # beyond the lowest r and r = 1 by 3% of the range
