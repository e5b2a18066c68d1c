"""The ``patchdb`` command line: ``patchdb sample`` end to end, and user errors shown as messages."""

import json
import re
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
from cli.main import PatchdbGroup, main
from patchdb import fused
from patchdb.errors import PatchdbError
from patchdb.generate import MAX_NOISE_MAGNITUDE
from patchdb.topk import default_scoring

from conftest import quantised_images

NUM_IMAGES = 12
NUM_CLASSES = 3


def write_npz(path, labelled: bool = True):
    """NUM_IMAGES 32x32 uint8 images (32x32, so preprocessing does not resize), labels k mod NUM_CLASSES."""
    images = ((quantised_images(0, NUM_IMAGES, 32)[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    if labelled:
        np.savez(path, images=images, labels=np.arange(NUM_IMAGES) % NUM_CLASSES)
    else:
        np.savez(path, images=images)
    return path


@pytest.fixture(scope="module")
def data_specs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return {"labelled": f"file:{write_npz(folder / 'labelled.npz')}",
            "unlabelled": f"file:{write_npz(folder / 'unlabelled.npz', labelled=False)}"}


def sample(spec: str, out, *options: str):
    """Invoke `patchdb sample` on spec with small settings (bbELS, 3x3 patches, 4 steps) plus options."""
    arguments = ["sample", "--dataset", spec, "--machine", "bbels", "--scales", "3", "--steps", "4", "--out", str(out),
                 *options]
    return CliRunner().invoke(main, arguments)


@pytest.fixture(scope="module")
def batch(data_specs, tmp_path_factory):
    """A conditional batch of 3 samples with seed 5."""
    out = tmp_path_factory.mktemp("batch")
    result = sample(data_specs["labelled"], out, "--num", "3", "--seed", "5", "--conditional")
    assert result.exit_code == 0, result.output
    return out


def test_sample_writes_every_output_with_its_shape(batch, data_specs):
    samples = np.load(batch / "samples.npy")
    assert samples.shape == (3, 1, 32, 32) and samples.dtype == np.float32
    assert np.isfinite(samples).all() and np.abs(samples).max() <= 1.0 + 1e-4
    assert np.load(batch / "noise.npy").shape == (3, 1, 32, 32)
    labels = np.load(batch / "labels.npy")
    assert labels.shape == (3,) and labels.dtype == np.int64 and set(labels.tolist()) <= set(range(NUM_CLASSES))
    with np.load(batch / "provenance.npz") as provenance:
        source, weight = provenance["source"], provenance["weight"]
    assert source.shape == (3, 32, 32, 3) and source.dtype == np.int64 and weight.shape == (3, 32, 32)
    assert ((weight > 0) & (weight <= 1 + 1e-6)).all()
    # conditional sampling: every pixel comes from a training image of the sample's class
    assert (source[..., 0] % NUM_CLASSES == labels[:, None, None]).all()
    assert ((source[..., 1:] >= 0) & (source[..., 1:] < 32)).all()
    for picture in ("grid.png", "provenance.png"):
        assert (batch / picture).read_bytes().startswith(b"\x89PNG")


def test_run_json_records_arguments_data_versions_and_times(batch, data_specs):
    record = json.loads((batch / "run.json").read_text())
    arguments = record["arguments"]
    assert arguments["dataset"] == data_specs["labelled"] and arguments["machine"] == "bbels"
    assert arguments["seed"] == 5 and arguments["num"] == 3 and arguments["conditional"] is True
    assert arguments["steps"] == 4 and arguments["scales"] == "3" and arguments["dtype"] == "float32"
    assert record["scales"] == [3, 3, 3, 3] and record["steps"] == [3, 2, 1]
    assert record["labels"] == np.load(batch / "labels.npy").tolist()
    assert record["data"]["name"] == data_specs["labelled"] and len(record["data"]["fingerprint"]) == 64
    assert record["data"]["num_images"] == NUM_IMAGES
    assert set(record["versions"]) >= {"patchdb", "torch", "numpy", "faiss"}
    assert len(record["seconds_per_step"]) == 3 and record["total_seconds"] >= sum(record["seconds_per_step"])
    assert arguments["exact_method"] == "auto" and record["backend"].startswith("exact: windows (")


def test_exact_methods_give_the_same_samples_and_provenance(batch, data_specs, tmp_path):
    result = sample(data_specs["labelled"], tmp_path, "--num", "3", "--seed", "5", "--conditional", "--exact-method", "products",
                    "--memory-gb", "2")  # calibrate's and compare's name of --memory-budget
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["backend"] == "exact: products" and record["arguments"]["memory_budget_gib"] == 2
    np.testing.assert_allclose(np.load(tmp_path / "samples.npy"), np.load(batch / "samples.npy"), rtol=0, atol=1e-4)
    with np.load(tmp_path / "provenance.npz") as products, np.load(batch / "provenance.npz") as windows:
        np.testing.assert_allclose(products["weight"], windows["weight"], rtol=0, atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU may run the fused method")
def test_fused_method_without_a_gpu_is_refused_before_sampling(data_specs, tmp_path):
    result = sample(data_specs["labelled"], tmp_path, "--num", "1", "--exact-method", "fused")
    assert result.exit_code == 1 and "--exact-method fused needs --device cuda" in result.output
    assert not (tmp_path / "samples.npy").exists()


def test_sample_k_regenerates_alone_from_seed_plus_k(batch, data_specs, tmp_path):
    result = sample(data_specs["labelled"], tmp_path, "--num", "1", "--seed", "7", "--conditional")
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.load(tmp_path / "noise.npy")[0], np.load(batch / "noise.npy")[2])
    assert np.load(tmp_path / "labels.npy")[0] == np.load(batch / "labels.npy")[2]
    np.testing.assert_allclose(np.load(tmp_path / "samples.npy")[0], np.load(batch / "samples.npy")[2], atol=1e-5)


def test_noise_file_is_the_starting_noise(batch, data_specs, tmp_path):
    # the batch's own noise with its seed gives the batch back; other noise gives other samples
    same = sample(data_specs["labelled"], tmp_path / "same", "--noise", str(batch / "noise.npy"), "--seed", "5",
                  "--conditional")
    assert same.exit_code == 0, same.output
    np.testing.assert_allclose(np.load(tmp_path / "same" / "samples.npy"), np.load(batch / "samples.npy"), atol=1e-5)
    other_noise = np.flip(np.load(batch / "noise.npy")[:2], axis=-1).copy()
    np.save(tmp_path / "other.npy", other_noise)
    other = sample(data_specs["labelled"], tmp_path / "other", "--noise", str(tmp_path / "other.npy"), "--label", "1")
    assert other.exit_code == 0, other.output
    assert np.array_equal(np.load(tmp_path / "other" / "noise.npy"), other_noise)
    assert np.load(tmp_path / "other" / "samples.npy").shape == (2, 1, 32, 32)
    assert np.load(tmp_path / "other" / "labels.npy").tolist() == [1, 1]


@pytest.mark.parametrize("spec_key, options, message", [
    ("labelled", ["--scales", "3,3,5"], "3 entries but the sampler has 4 steps"),
    ("labelled", ["--scales", "4"], "positive odd"),
    ("labelled", ["--scales", "paper:no-such-key"], "unknown paper scale preset"),
    ("labelled", ["--label", "1", "--conditional"], "exclude each other"),
    ("labelled", ["--label", "7"], "no images of class 7"),
    ("unlabelled", ["--label", "1"], "has no labels"),
    ("unlabelled", ["--conditional"], "needs class labels"),
    ("labelled", ["--noise", "BAD_NOISE"], "shape"),
    ("labelled", ["--noise", "BAD_NOISE", "--num", "3"], "shape"),
    ("missing", [], "file not found"),
    ("labelled", ["--topk", "many"], "neither 'auto' nor a whole number"),
    ("labelled", ["--topk", "0"], "not a positive number"),
    ("labelled", ["--topk", "99999999999999999999"], "more entries than any dictionary holds"),
    ("labelled", ["--steps", "100000000"], "2<=x<=10000"),
    ("labelled", ["--num", "100000000"], "1<=x<=100000"),
    ("labelled", ["--estimate-samples", "100000000"], "1<=x<=1048576"),
    ("labelled", ["--estimate-error", "nan"], "not a finite number"),
    ("labelled", ["--tol", "nan"], "not a finite number"),
    ("labelled", ["--machine", "is", "--exact-method", "windows"], "drop --exact-method"),
    ("labelled", ["--machine", "es", "--exact-method", "products"], "drop --exact-method"),
    ("labelled", ["--exact-from-patch-size", "2"], "2 is even; patch sizes are odd"),
    ("labelled", ["--exact-from-patch-size", "99"], "99 is not in the range 1<=x<=65"),
    # options the run would ignore are refused even where they are typed at their defaults
    ("labelled", ["--tol", "0.01"], "the exact backend samples, and --tol (options of the top-k backend) would be ignored"),
    ("labelled", ["--machine", "is", "--exact-method", "auto"], "drop --exact-method"),
    ("labelled", ["--machine", "es", "--scales", "paper:fashion-mnist-resnet-zeros-conditional"], "--scales would be ignored"),
    ("labelled", ["--noise", "BAD_NOISE", "--seed", "0"], "drop --seed"),
])
def test_bad_input_is_a_message_not_a_traceback(data_specs, tmp_path, spec_key, options, message):
    np.save(tmp_path / "bad.npy", np.zeros((2, 1, 16, 16), np.float32))
    options = [str(tmp_path / "bad.npy") if option == "BAD_NOISE" else option for option in options]
    spec = data_specs.get(spec_key, f"file:{tmp_path / 'absent.npz'}")
    result = sample(spec, tmp_path / "out", *options)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output and "Error:" in result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()  # nothing is written for bad input


def test_num_disagreeing_with_the_noise_file_is_refused(data_specs, tmp_path):
    np.save(tmp_path / "noise.npy", np.zeros((2, 1, 32, 32), np.float32))
    result = sample(data_specs["labelled"], tmp_path / "out", "--noise", str(tmp_path / "noise.npy"), "--num", "3")
    assert result.exit_code == 1 and "--num 3 disagrees with the 2 noise arrays" in result.output


@pytest.mark.parametrize("magnitude, refused", [(MAX_NOISE_MAGNITUDE, False), (2 * MAX_NOISE_MAGNITUDE, True)])
def test_noise_far_beyond_a_standard_normal_draw_is_refused(data_specs, tmp_path, magnitude, refused):
    # images in 0..255, or noise scaled by 1e20, saved as noise: float32 rounding would lose the sample
    noise = np.zeros((1, 1, 32, 32), np.float32)
    noise[0, 0, 3, 4] = -magnitude
    np.save(tmp_path / "noise.npy", noise)
    result = sample(data_specs["labelled"], tmp_path / "out", "--noise", str(tmp_path / "noise.npy"))
    assert (result.exit_code == 1) == refused
    assert ("magnitude 2e+03" in result.output and "standard normal" in result.output) == refused


def test_sample_help_shows_the_defaults():
    result = CliRunner().invoke(main, ["sample", "--help"], terminal_width=400)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for default in ("default: bbels", "paper:fashion-mnist-resnet-zeros-conditional", "default: 20", "default: machine",
                    "default: float32", "the embedded default"):
        assert default in text


def test_group_turns_any_patchdb_error_into_a_message():
    @click.group(cls=PatchdbGroup)
    def group():
        pass

    @group.command()
    def fails():
        raise PatchdbError("the problem; the fix")

    result = CliRunner().invoke(group, ["fails"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.strip() == "Error: the problem; the fix"


def test_ctrl_c_while_the_libraries_load_is_not_a_traceback(monkeypatch, capsys):
    class Interrupted:
        """Ctrl-C arriving while cli.main is imported."""

        def find_spec(self, name, path=None, target=None):
            if name == "cli.main":
                raise KeyboardInterrupt

    monkeypatch.delitem(sys.modules, "cli.main")
    monkeypatch.setattr(sys, "meta_path", [Interrupted(), *sys.meta_path])
    with pytest.raises(SystemExit) as stopped:
        cli.run()
    assert stopped.value.code == 130 and capsys.readouterr().err.strip() == "Aborted!"


def test_every_command_keeps_freed_memory(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("cli.main.retain_freed_memory", lambda large_blocks: calls.append(large_blocks))
    CliRunner().invoke(main, ["info", str(tmp_path / "missing")])
    CliRunner().invoke(main, ["build-index", "--out", str(tmp_path / "store"), "--scales", "nonsense"])
    assert calls == [True, False]  # a build keeps large blocks out of the heap: fragmented, it outgrew the memory budget


def test_build_index_info_and_indexed_sampling(data_specs, batch, tmp_path):
    store = tmp_path / "store"
    built = CliRunner().invoke(main, ["build-index", "--dataset", data_specs["labelled"], "--scales", "3", "--conditional",
                                      "--cluster-size", "16", "--min-indexed-entries", "256", "--out", str(store)])
    assert built.exit_code == 0, built.output
    shown = CliRunner().invoke(main, ["info", str(store)])
    assert shown.exit_code == 0 and "class-conditional, labels 0, 1, 2" in shown.output
    assert "P=3: " in shown.output and " 0 clusters" not in shown.output
    # tol 0 and room for every entry: the indexed run draws the exact run's samples
    out = tmp_path / "indexed"
    result = sample(data_specs["labelled"], out, "--num", "3", "--seed", "5", "--conditional", "--index", str(store),
                    "--topk", "1000000", "--tol", "0")
    assert result.exit_code == 0, result.output
    assert np.allclose(np.load(out / "samples.npy"), np.load(batch / "samples.npy"), atol=1e-4)
    record = json.loads((out / "run.json").read_text())
    assert record["arguments"]["index"] == str(store) and len(record["index_steps"]) == 3
    scoring = default_scoring(torch.device("cpu"), torch.float32)
    assert record["backend"] == f"top-k ({scoring} scoring; small dictionaries: exact products)"
    for step in record["index_steps"]:
        assert (abs(sum(step["fraction_of_pixels"].values()) - 1) < 1e-9
                and set(step["seconds"]) == {"search", "rescore", "estimate", "other"})
        # every entry fit topk: nothing estimated
        assert step["estimate_standard_error"] is None and step["deepenings_per_pixel"] == 0
    assert np.load(out / "paths.npy").shape == (3, 3, 32, 32)
    # steps left to the exact backend (every step here): the exact run's samples, every pixel on the exact path
    left = tmp_path / "left"
    result = sample(data_specs["labelled"], left, "--num", "3", "--seed", "5", "--conditional", "--index", str(store),
                    "--exact-from-patch-size", "3")
    assert result.exit_code == 0, result.output
    assert np.allclose(np.load(left / "samples.npy"), np.load(batch / "samples.npy"), atol=1e-4)
    record = json.loads((left / "run.json").read_text())
    assert record["arguments"]["exact_from_patch_size"] == 3
    assert record["backend"].startswith(f"top-k ({scoring} scoring; small dictionaries: exact products; P >= 3: exact "
                                        "windows (")
    assert all(step["fraction_of_pixels"] == {"exact": 1.0} for step in record["index_steps"])
    # a store built for other data or another machine is refused with the reason
    mismatched = sample(data_specs["unlabelled"], tmp_path / "refused", "--index", str(store))
    assert mismatched.exit_code == 1 and "fingerprint" in mismatched.output and "Traceback" not in mismatched.output
    wrong_machine = CliRunner().invoke(main, ["sample", "--dataset", data_specs["labelled"], "--machine", "is", "--conditional",
                                              "--steps", "4", "--index", str(store), "--out", str(tmp_path / "refused")])
    assert wrong_machine.exit_code == 1 and "--index serves the patch machines" in wrong_machine.output
    ignored_scales = sample(data_specs["labelled"], tmp_path / "refused", "--machine", "is")  # sample() passes --scales 3
    assert ignored_scales.exit_code == 1 and "no patch size, so --scales would be ignored" in ignored_scales.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the GPU path runs where there is one")
def test_sample_on_the_gpu_gives_the_cpu_batch(batch, data_specs, tmp_path):
    """Exact (float32: rounding differs between devices) and indexed (default top-k settings, estimator
    included; float64, so that every pixel takes the same path on both devices), end to end on CUDA."""
    store = tmp_path / "store"
    built = CliRunner().invoke(main, ["build-index", "--dataset", data_specs["labelled"], "--scales", "3", "--conditional",
                                      "--cluster-size", "16", "--min-indexed-entries", "256", "--out", str(store)])
    assert built.exit_code == 0, built.output
    indexed = ["--index", str(store), "--dtype", "float64"]
    runs = {"exact": ["--device", "cuda"], "indexed-cpu": indexed, "indexed-gpu": [*indexed, "--device", "cuda"]}
    for name, options in runs.items():
        result = sample(data_specs["labelled"], tmp_path / name, "--num", "3", "--seed", "5", "--conditional", *options)
        assert result.exit_code == 0, result.output
        assert np.array_equal(np.load(tmp_path / name / "labels.npy"), np.load(batch / "labels.npy"))
    exact_record = json.loads((tmp_path / "exact" / "run.json").read_text())
    assert exact_record["device"] == torch.cuda.get_device_name()
    assert exact_record["backend"] == ("exact: fused" if fused.available(torch.device("cuda")) else "exact: products")
    np.testing.assert_allclose(np.load(tmp_path / "exact" / "samples.npy"), np.load(batch / "samples.npy"), atol=1e-3)
    np.testing.assert_allclose(np.load(tmp_path / "indexed-gpu" / "samples.npy"),
                               np.load(tmp_path / "indexed-cpu" / "samples.npy"), atol=1e-6)
    assert np.array_equal(np.load(tmp_path / "indexed-gpu" / "paths.npy"), np.load(tmp_path / "indexed-cpu" / "paths.npy"))


def test_every_path_option_expands_the_home_folder(tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    write_npz(home / "labelled.npz")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    spec = "file:~/labelled.npz"
    runs = [sample(spec, "~/s", "--num", "2"),
            CliRunner().invoke(main, ["build-index", "--dataset", spec, "--scales", "3", "--out", "~/st"]),
            CliRunner().invoke(main, ["info", "~/st"]),
            sample(spec, "~/t", "--noise", "~/s/noise.npy", "--index", "~/st", "--data-dir", "~"),
            CliRunner().invoke(main, ["train", "--dataset", spec, "--epochs", "1", "--out", "~/tr"]),
            CliRunner().invoke(main, ["calibrate", "--model", "~/tr", "--candidates", "3", "--samples", "1", "--steps", "2",
                                      "--out", "~/tr/sc.json"]),
            CliRunner().invoke(main, ["build-index", "--dataset", spec, "--scales", "~/tr/sc.json", "--out", "~/sc"]),
            CliRunner().invoke(main, ["compare", "--model", "~/tr", "--scales", "~/tr/sc.json", "--steps", "2", "--num", "1",
                                      "--out", "~/c"])]
    for result in runs:
        assert result.exit_code == 0, result.output
    assert all((home / name).is_dir() for name in ("s", "st", "t", "tr", "sc", "c")) and not list(work.iterdir())
    assert (home / "tr" / "sc.json").is_file() and np.array_equal(np.load(home / "t" / "noise.npy"),
                                                                   np.load(home / "s" / "noise.npy"))


@pytest.mark.parametrize("arguments", [["fetch-data", "mnist", "--data-dir", ""], ["sample", "--data-dir", "", "--out", "s"],
                                       ["sample", "--noise", " ", "--out", "s"], ["info", ""],
                                       ["compare", "--model", "", "--out", "c"],
                                       ["sample", "--scales", "calibrated:", "--out", "s"],
                                       ["build-index", "--scales", "calibrated:", "--out", "st"],
                                       ["compare", "--model", "resnet", "--scales", "calibrated: ", "--out", "c"]])
def test_an_empty_path_is_refused(tmp_path, monkeypatch, arguments):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2 and "is empty" in result.output and "Traceback" not in result.output
    assert not list(tmp_path.iterdir())


def test_estimator_options_with_a_fallback_that_does_not_estimate_are_refused(data_specs, tmp_path):
    store = tmp_path / "store"
    built = CliRunner().invoke(main, ["build-index", "--dataset", data_specs["labelled"], "--scales", "3", "--out", str(store)])
    assert built.exit_code == 0, built.output
    for options, given in ((["--fallback", "none", "--estimate-samples", "10"], "--estimate-samples would"),
                           (["--fallback", "none", "--estimate-samples", "4096"], "--estimate-samples would"),  # the default
                           (["--fallback", "exact", "--estimate-error", "0.1", "--estimate-samples", "5"],
                            "--estimate-samples and --estimate-error would")):
        result = sample(data_specs["labelled"], tmp_path / "out", "--num", "1", "--index", str(store), *options)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert (f"Error: --fallback {options[1]} does not estimate, so {given} be ignored: drop") in result.output
        assert "or choose --fallback estimate or auto" in result.output and not (tmp_path / "out").exists()
    result = sample(data_specs["labelled"], tmp_path / "out", "--num", "1", "--index", str(store), "--fallback", "auto",
                    "--estimate-samples", "10")
    assert result.exit_code == 0, result.output


def test_indexed_runs_read_exact_method_windows_and_patch_sizes_only_where_the_windows_slide(data_specs, tmp_path):
    """With --index the dictionaries too small to index are scored by products: windows there would be ignored; the
    patch sizes that --exact-from-patch-size leaves to the windows need no dictionaries in the store."""
    store = tmp_path / "store"
    built = CliRunner().invoke(main, ["build-index", "--dataset", data_specs["labelled"], "--scales", "3", "--out", str(store)])
    assert built.exit_code == 0, built.output
    refused = sample(data_specs["labelled"], tmp_path / "refused", "--num", "1", "--index", str(store),
                     "--exact-method", "windows")
    assert refused.exit_code == 1 and "drop --exact-method windows, or give an --exact-from-patch-size P of at most 3" \
        in refused.output
    none_left = sample(data_specs["labelled"], tmp_path / "refused", "--num", "1", "--index", str(store),
                       "--exact-method", "windows", "--exact-from-patch-size", "5")  # sample() runs P = 3 only
    assert none_left.exit_code == 1 and "this run leaves none" in none_left.output
    left = sample(data_specs["labelled"], tmp_path / "left", "--num", "1", "--index", str(store), "--exact-method",
                  "windows", "--exact-from-patch-size", "5", "--scales", "3,3,5,5")  # no P = 5 in the store
    assert left.exit_code == 0, left.output
    record = json.loads((tmp_path / "left" / "run.json").read_text())
    assert [step["patch_size"] for step in record["index_steps"]] == [5, 5, 3]
    assert "; P >= 5: exact windows (" in record["backend"]
    every = sample(data_specs["labelled"], tmp_path / "every", "--num", "1", "--index", str(store), "--exact-from-patch-size",
                   "3", "--topk", "5000", "--tol", "0.01")  # sample() runs P = 3 at every step: nothing left to search
    assert every.exit_code == 1 and "leaves every step (patch sizes [3]) to the sliding windows, so the top-k search " \
        "never runs and --topk, --tol would be ignored: drop them" in every.output

def test_help_shows_one_memory_budget_option_and_every_range():
    def help_text(command):
        result = CliRunner().invoke(main, [command, "--help"], terminal_width=400)
        assert result.exit_code == 0
        return " ".join(result.output.split())

    for command in ("sample", "calibrate", "compare"):
        assert "--memory-budget, --memory-gb FLOAT RANGE" in help_text(command)
        assert "[default: 4.0; 0<x<=1048576.0]" in help_text(command)
    assert "--topk AUTO|N With --index: most dictionary entries (1<=N<=2^40)" in help_text("sample")
    for command in ("sample", "build-index", "train"):  # one --dataset help for the commands that read training images
        assert ("NAME[:SPLIT][:LIMIT] (mnist, fashion-mnist, cifar10, celeba), default[:LIMIT] or file:PATH[:LIMIT]"
                in help_text(command))
    assert "--model RESNET|UNET|RUN_DIR" in help_text("compare")


@pytest.mark.parametrize("name", ["run.json", "samples.npy", "grid.png"])
def test_an_output_name_taken_by_a_folder_is_refused_before_sampling(data_specs, tmp_path, name):
    (tmp_path / name).mkdir()
    result = sample(data_specs["labelled"], tmp_path, "--num", "1")
    assert result.exit_code == 1, result.output
    assert f"Error: {tmp_path / name} is a folder, where this command writes its file {name}" in result.output
    assert "sampling" not in result.output and not (tmp_path / "noise.npy").exists()


def test_a_patch_size_too_large_for_the_images_is_refused_before_sampling(data_specs, tmp_path):
    result = sample(data_specs["labelled"], tmp_path, "--num", "1", "--scales", "65")
    assert result.exit_code == 1 and "patch size 65 is larger than a 32x32 image's patches" in result.output
    assert "sampling" not in result.output


@pytest.mark.parametrize("command", [
    ["sample", "--machine", "bbels", "--scales", "65", "--out", "{tmp}/out", "--dataset", "file:{tmp}/train.npz"],
    ["build-index", "--machine", "ls", "--scales", "3,65", "--out", "{tmp}/store", "--dataset", "file:{tmp}/train.npz"],
    ["calibrate", "--model", "{tmp}/run", "--machine", "bbels", "--candidates", "3,5,...,65"],
], ids=["sample", "build-index", "calibrate"])
def test_patch_sizes_too_large_for_zero_padding_are_refused_before_any_data_loads(command, tmp_path):
    """65 fits circular padding on 32x32 images but not zero padding (63): named before the data (deleted here) is read."""
    from patchdb.data import load_dataset
    from patchdb.networks import NetworkConfig
    from patchdb.training import TrainingConfig, train_network

    np.savez(tmp_path / "train.npz", images=quantised_images(3, 4, 32).numpy())
    spec = f"file:{tmp_path / 'train.npz'}"
    train_network(tmp_path / "run", load_dataset(spec), spec, NetworkConfig(width=8, num_hidden_layers=1, embedding_dim=16),
                  TrainingConfig(epochs=1, batch_size=4), show_progress=False)
    (tmp_path / "train.npz").unlink()
    result = CliRunner().invoke(main, [part.format(tmp=tmp_path) for part in command])
    assert result.exit_code != 0 and "patch size 65 is larger than a 32x32 image's patches" in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("module", ["cli", "cli.main"])
def test_the_command_runs_as_a_module_from_a_checkout(module):
    """`python -m cli` (and `python -m cli.main`) is the patchdb command, not a silent no-op."""
    import subprocess

    result = subprocess.run([sys.executable, "-m", module, "info", "--help"], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 0 and "Usage:" in result.stdout and "--verify" in result.stdout, result.stderr


@pytest.mark.parametrize("arguments, message", [
    (["compare", "--model", "resnet", "--test-dataset", "mnist", "--out", "c"],
     "--test-dataset is read only with --single-step"),
    (["train", "--epochs", "10000000", "--out", "r"], "10000000 is not in the range 1<=x<=1000000"),
])
def test_usage_errors_exit_with_status_2(tmp_path, monkeypatch, arguments, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_calibrate_takes_the_cached_network_as_compare_does(tmp_path, monkeypatch):
    """calibrate --model resnet|unet calibrates the project's cached network (trained on request), into its cache folder,
    where compare --model resnet|unet reads the schedule."""
    write_npz(tmp_path / "labelled.npz")
    spec, cache = f"file:{tmp_path / 'labelled.npz'}", tmp_path / "cache"
    monkeypatch.setattr("patchdb.training.cached_run_dir", lambda architecture, dataset, padding, conditional:
                        cache / f"{architecture}-{padding}-{'conditional' if conditional else 'unconditional'}")
    cached = cache / "resnet-zeros-unconditional"
    calibrate = ["calibrate", "--model", "resnet", "--dataset", spec, "--candidates", "3", "--samples", "1", "--steps", "2"]
    missing = CliRunner().invoke(main, calibrate)
    assert missing.exit_code == 1 and "no trained resnet" in missing.output and "pass --train" in missing.output
    trained = CliRunner().invoke(main, ["train", "--dataset", spec, "--epochs", "1", "--out", str(cached)])
    assert trained.exit_code == 0, trained.output
    result = CliRunner().invoke(main, calibrate)
    assert result.exit_code == 0, result.output
    assert f"-> {cached / 'scales.json'}" in result.output and (cached / "scales.png").is_file()
    conditional = CliRunner().invoke(main, [*calibrate, "--conditional"])
    assert conditional.exit_code == 1 and "no trained resnet" in conditional.output  # another cache folder's network


def test_the_readme_synopsis_of_every_command_names_its_options():
    """README.md's `patchdb COMMAND [...]` synopses stay in step with the commands' options."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    synopses, command = {}, None
    for line in readme.splitlines():
        words = line.split()
        if len(words) > 1 and words[0] == "patchdb" and words[1] in main.commands and ("[" in line or "|" in line):
            command = words[1]
            synopses[command] = synopses.get(command, "") + line
        elif command is not None and line.startswith(" ") and line.strip().startswith(("[", "--")):
            synopses[command] += line
        else:
            command = None
    assert set(synopses) == set(main.commands)
    for name, command in main.commands.items():
        named = set(re.findall(r"(?<![\w-])--[\w-]+", synopses[name]))
        absent = [param.opts[0] for param in command.params if isinstance(param, click.Option) and param.opts[0] != "--help"
                  and not named & {*param.opts, *param.secondary_opts}]
        assert not absent, f"README's synopsis of `patchdb {name}` lacks {absent}"


def test_a_run_folder_named_as_an_architecture_is_the_folder_when_compare_calibrates_it(tmp_path, monkeypatch):
    """compare --model ./resnet calibrates that folder's network, not the cached resnet's (which is absent here)."""
    write_npz(tmp_path / "labelled.npz")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATCHDB_CACHE", str(tmp_path / "cache"))
    spec = f"file:{tmp_path / 'labelled.npz'}"
    assert CliRunner().invoke(main, ["train", "--dataset", spec, "--epochs", "1", "--out", "resnet"]).exit_code == 0
    result = CliRunner().invoke(main, ["compare", "--model", "./resnet", "--steps", "2", "--num", "1", "--out", "c"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "resnet" / "scales.json").is_file() and not (tmp_path / "cache").exists()
