"""The sample job as a library (patchdb.generate) and its figures (patchdb.plots)."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

import patchdb.generate
from patchdb.errors import PatchdbError
from patchdb.generate import (MAX_SAMPLES, PosteriorRecorder, SampleConfig, generate, read_noise, run_sample,
                              seeded_inputs)
from patchdb.machines import make_machine
from patchdb.plots import MAX_GRID_IMAGES, image_grid_figure, provenance_figure, source_ranking

from conftest import noisy_batch, quantised_images, tiny_dataset


def test_sample_k_of_a_batch_has_the_inputs_of_seed_plus_k_alone():
    classes = torch.tensor([3, 7])
    noise, labels = seeded_inputs(10, 4, (1, 8, 8), classes)
    for k in range(4):
        alone_noise, alone_labels = seeded_inputs(10 + k, 1, (1, 8, 8), classes)
        assert torch.equal(noise[k], alone_noise[0]) and labels[k] == alone_labels[0]
    assert set(labels.tolist()) <= {3, 7}
    assert not torch.equal(noise[0], noise[1])
    unconditional, no_labels = seeded_inputs(10, 4, (1, 8, 8))
    assert no_labels is None and torch.equal(unconditional, noise)  # the label is drawn after the noise


def test_a_run_draws_at_most_max_samples_before_allocating_them():
    # 10^8 samples of 32 x 32 would ask for 400 GB of noise (calibrate --samples and compare --num come here too)
    with pytest.raises(PatchdbError, match=f"1..{MAX_SAMPLES}"):
        seeded_inputs(0, 10**8, (1, 32, 32))
    assert seeded_inputs(0, 1, (1, 2, 2))[0].shape == (1, 1, 2, 2)


def test_conditional_labels_cover_the_classes():
    _, labels = seeded_inputs(0, 200, (1, 2, 2), torch.arange(10))
    assert set(labels.tolist()) == set(range(10))


def test_recorder_returns_the_machine_score_and_keeps_the_last_posterior_with_provenance():
    dataset = tiny_dataset(labelled=True)
    machine = make_machine("els", dataset, dtype=torch.float64)
    recorder = PosteriorRecorder(machine, num_calls=2)
    x = noisy_batch(dataset, 0.5, seed=0)
    labels = torch.tensor([0, 1])
    score = recorder(x, 0.5, labels=labels, patch_size=3)
    expected = machine.posterior(x, 0.5, labels, 3)
    torch.testing.assert_close(score, machine(x, 0.5, labels=labels, patch_size=3))
    torch.testing.assert_close(recorder.last.mean, expected.mean)
    assert recorder.last.source is None and recorder.last.weight is None  # not the last call: no provenance
    recorder(x, 0.25, labels=labels, patch_size=5)
    assert len(recorder.seconds) == 2 and all(seconds > 0 for seconds in recorder.seconds)
    last = machine.posterior(x, 0.25, labels, 5)
    assert torch.equal(recorder.last.source, last.source)
    torch.testing.assert_close(recorder.last.weight, last.weight)


def test_provenance_is_the_last_posterior_whose_mean_is_the_sample():
    dataset = tiny_dataset(labelled=False, num_images=5, side=8)
    machine = make_machine("is", dataset, dtype=torch.float64)
    noise, _ = seeded_inputs(0, 3, (1, 8, 8))
    generation = generate(machine, noise.double(), [3] * 10, 10, progress=False)
    torch.testing.assert_close(generation.samples, generation.provenance.mean)
    assert len(generation.seconds_per_step) == 9  # the machine loop skips t = 1
    # IS memorises: each sample is the training image that its provenance names, pixel for pixel
    source = generation.provenance.source
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    for k in range(3):
        image = int(source[k, 0, 0, 0])
        assert (source[k, ..., 0] == image).all()
        assert torch.equal(source[k, ..., 1], rows) and torch.equal(source[k, ..., 2], cols)
        torch.testing.assert_close(generation.samples[k], dataset.images[image].double(), atol=1e-3, rtol=0)


def test_full_loop_calls_the_model_at_t_equal_one():
    dataset = tiny_dataset(labelled=False, num_images=5, side=8)
    noise, _ = seeded_inputs(0, 1, (1, 8, 8))
    generation = generate(make_machine("ls", dataset), noise, [3] * 4, 4, loop="full", progress=False)
    assert len(generation.seconds_per_step) == 4


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    """12 labelled 32x32 uint8 images (classes 0, 1, 2) in an .npz: preprocessing leaves 32x32 untouched."""
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    images = ((quantised_images(0, 12, 32)[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    np.savez(path, images=images, labels=np.arange(12) % 3)
    return path


def test_run_writes_every_output_atomically(tiny_npz, tmp_path):
    out = tmp_path / "run"
    record = run_sample(SampleConfig(out=str(out), dataset=f"file:{tiny_npz}", machine="els", scales="3", steps=3,
                                     num=2, seed=4, label=1), progress=False)
    assert sorted(path.name for path in out.iterdir()) == sorted(
        ["samples.npy", "noise.npy", "labels.npy", "provenance.npz", "grid.png", "provenance.png", "run.json"])
    assert np.load(out / "labels.npy").tolist() == [1, 1]
    source = np.load(out / "provenance.npz")["source"]
    assert source.shape == (2, 32, 32, 3) and set(np.unique(source[..., 0])) <= {1, 4, 7, 10}  # class 1 only
    assert json.loads((out / "run.json").read_text()) == json.loads(json.dumps(record))
    # an unconditional rerun into the same folder must not leave the earlier labels behind
    run_sample(SampleConfig(out=str(out), dataset=f"file:{tiny_npz}", machine="els", scales="3", steps=3, num=1),
               progress=False)
    assert not (out / "labels.npy").exists() and np.load(out / "samples.npy").shape == (1, 1, 32, 32)


def test_a_run_interrupted_while_writing_leaves_no_run_json(tiny_npz, tmp_path, monkeypatch):
    """run.json marks a folder whose files all come from one run: removed before the files are replaced, written last."""
    config = SampleConfig(out=str(tmp_path / "run"), dataset=f"file:{tiny_npz}", machine="els", scales="3", steps=3, num=1)
    run_sample(config, progress=False)
    assert (tmp_path / "run" / "run.json").is_file()

    def interrupted(*arguments):
        raise KeyboardInterrupt

    monkeypatch.setattr(patchdb.generate, "provenance_figure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sample(SampleConfig(**{**asdict(config), "seed": 1}), progress=False)
    assert not (tmp_path / "run" / "run.json").exists()
    assert not any(path.name.endswith(".tmp") for path in (tmp_path / "run").iterdir())


@pytest.mark.parametrize("options, message", [
    ({"tol": 0.1}, "--tol"), ({"topk": 8, "fallback": "exact"}, "--topk, --fallback"),
    ({"exact_from_patch_size": 5}, "--exact-from-patch-size"), ({"noise": "noise.npy", "seed": 3}, "drop --seed"),
    ({"noise": "noise.npy", "seed": 3, "index": "store"}, "drop --seed")])
def test_options_of_the_other_backend_are_refused_not_ignored(tiny_npz, tmp_path, options, message):
    config = SampleConfig(out=str(tmp_path / "run"), dataset=f"file:{tiny_npz}", machine="els", scales="3", steps=3, num=1,
                          **options)
    with pytest.raises(PatchdbError, match=message):
        run_sample(config, progress=False)
    assert not (tmp_path / "run").exists()


def test_steps_left_to_sliding_windows_that_cannot_slide_are_refused_before_any_work(tiny_npz, tmp_path):
    """--exact-from-patch-size needs the sliding windows: with --exact-method products it is refused before the data
    and the store (absent here) are read, not at the first step it leaves."""
    config = SampleConfig(out=str(tmp_path / "run"), dataset=f"file:{tiny_npz}", machine="els", scales="3", steps=3, num=1,
                          index=str(tmp_path / "absent-store"), exact_from_patch_size=3, exact_method="products")
    with pytest.raises(PatchdbError, match="sliding windows, which need --device cpu, --exact-method auto or windows"):
        run_sample(config, progress=False)


@pytest.mark.parametrize("array, message", [
    (np.zeros((2, 1, 16, 16), np.float32), "shape"),
    (np.zeros((2, 32, 32), np.float32), "shape"),
    (np.full((1, 1, 32, 32), np.nan, np.float32), "NaN"),
    (np.zeros((1, 1, 32, 32), np.int64), "int64"),
])
def test_bad_noise_files_are_refused(tmp_path, array, message):
    path = tmp_path / "noise.npy"
    np.save(path, array)
    with pytest.raises(PatchdbError, match=message):
        read_noise(path, (1, 32, 32))


@pytest.mark.parametrize("content, message", [
    (b"abc", r"is not an .npy file \(it starts with neither the .npz \(zip\) nor the .npy header\); save the noise"),
    (None, "holds Python objects"),
])
def test_a_noise_file_of_no_numeric_array_is_named_without_numpys_advice_to_unpickle_it(tmp_path, content, message):
    path = tmp_path / "noise.npy"
    if content is None:
        np.save(path, np.array([None], dtype=object), allow_pickle=True)
    else:
        path.write_bytes(content)
    with pytest.raises(PatchdbError, match=message) as error:
        read_noise(path, (1, 32, 32))
    assert "allow_pickle" not in str(error.value) and "unsafely" not in str(error.value)


def test_missing_noise_file_is_refused(tmp_path):
    with pytest.raises(PatchdbError, match="does not exist"):
        read_noise(tmp_path / "absent.npy", (1, 32, 32))


def test_noise_file_keeps_float64_values(tmp_path):
    noise = np.random.default_rng(0).standard_normal((2, 1, 32, 32))
    np.save(tmp_path / "noise.npy", noise)
    read = read_noise(tmp_path / "noise.npy", (1, 32, 32))
    assert read.dtype == torch.float64 and np.array_equal(read.numpy(), noise)


def test_source_ranking_orders_images_by_pixel_count():
    image_index = np.array([[5, 5, 2], [9, 5, 2], [5, 9, 2]])
    images, counts, ranks = source_ranking(image_index)
    assert images.tolist() == [5, 2, 9] and counts.tolist() == [4, 3, 2]
    assert np.array_equal(images[ranks], image_index)


def test_provenance_figure_marks_the_centres_taken_from_each_top_image():
    training_images = np.linspace(-1, 1, 4 * 3 * 6 * 6).reshape(4, 3, 6, 6)  # RGB
    source = np.zeros((2, 6, 6, 3), dtype=np.int64)
    source[..., 0] = 3
    source[:, :2, :, 0] = 1
    source[..., 1], source[..., 2] = 4, 5
    source[:, 0, 0, 1:] = (0, 0)
    figure = provenance_figure(np.zeros((2, 3, 6, 6)), source, training_images, top=3)
    axes = figure.axes
    assert len(axes) == 2 * 5
    first_top = axes[2]
    assert first_top.get_title().startswith("#3: 24 px")
    assert np.array_equal(first_top.collections[0].get_offsets(), [[5, 4]])  # (column, row) of the only centre
    second_top = axes[3]
    assert second_top.get_title().startswith("#1: 12 px")
    assert sorted(map(tuple, second_top.collections[0].get_offsets().tolist())) == [(0, 0), (5, 4)]
    assert axes[4].get_title() == ""  # only two source images


def test_grid_shows_at_most_max_images_with_titles():
    images = np.zeros((MAX_GRID_IMAGES + 5, 1, 4, 4))
    figure = image_grid_figure(images, [f"class {k}" for k in range(len(images))])
    shown = [axis for axis in figure.axes if axis.images]
    assert len(shown) == MAX_GRID_IMAGES and shown[1].get_title() == "class 1"


def test_an_estimated_sample_regenerates_alone_from_its_seed(tmp_path):
    """The estimator's draws depend on the step and the dictionary, not on the batch the pixel is sampled in."""
    from patchdb.build import build_store
    from patchdb.data import load_dataset

    store = tmp_path / "store"
    build_store(load_dataset("default:40"), "bbels", [3], store, cluster_size=16, min_indexed_entries=64, progress=False)
    options = dict(dataset="default:40", scales="3,3,3", steps=3, index=str(store), topk=8, fallback="estimate")
    batch = run_sample(SampleConfig(out=str(tmp_path / "batch"), num=3, seed=0, **options), progress=False)
    run_sample(SampleConfig(out=str(tmp_path / "alone"), num=1, seed=1, **options), progress=False)
    assert all(step["fraction_of_pixels"].get("estimated", 0) > 0.5 for step in batch["index_steps"])
    np.testing.assert_allclose(np.load(tmp_path / "alone" / "samples.npy")[0],
                               np.load(tmp_path / "batch" / "samples.npy")[1], atol=1e-5)


def test_run_json_names_the_backend_that_scored(unlabelled_dataset):
    """Whole images by products (IS) or FFT correlations (ES); top-k with its scoring and its exact backend."""
    from patchdb.engine import ExactBackend
    from patchdb.generate import backend_name
    from patchdb.topk import TopKBackend

    assert backend_name(make_machine("is", unlabelled_dataset)) == "exact: products"
    assert backend_name(make_machine("es", unlabelled_dataset)) == "exact: fft"
    exact = ExactBackend(method="products")
    assert backend_name(make_machine("bbels", unlabelled_dataset, backend=exact)) == "exact: products"
    indexed = make_machine("bbels", unlabelled_dataset, backend=TopKBackend(scoring="gathered", exact=exact))
    assert backend_name(indexed) == "top-k (gathered scoring; small dictionaries: exact products)"
    leaving = make_machine("bbels", unlabelled_dataset, backend=TopKBackend(scoring="runs", exact_from_patch_size=13))
    assert backend_name(leaving).startswith("top-k (runs scoring; small dictionaries: exact products; P >= 13: exact windows (")

