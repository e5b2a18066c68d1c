"""Networks, their score adapter and training: receptive field, equivariance, eps -> score, loss, checkpoints."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from patchdb.data import load_dataset
from patchdb.errors import PatchdbError
from patchdb.networks import NetworkConfig, NetworkScore, ResNet, UNet, build_network, sinusoidal_embedding
from patchdb.schedule import beta
from patchdb.training import (
    PRESETS, TrainingConfig, cached_run_dir, is_trained, load_network, load_training_data, preset_configs, read_config, train_command, train_network, training_progress,
    training_subset,
)
from tests.conftest import deny_reading, tiny_dataset

pytestmark = pytest.mark.usefixtures("single_thread")


def small_config(**changes) -> NetworkConfig:
    return NetworkConfig(**{"width": 8, "num_hidden_layers": 2, "embedding_dim": 16, **changes})


def test_resnet_and_unet_map_images_to_same_shape():
    x, t, labels = torch.randn(3, 1, 16, 16), torch.rand(3), torch.tensor([0, 2, 1])
    for architecture in ("resnet", "unet"):
        for num_classes in (0, 3):
            network = build_network(small_config(architecture=architecture, num_classes=num_classes))
            assert network(x, t, labels if num_classes else None).shape == x.shape


def test_resnet_output_pixel_depends_only_on_its_receptive_field():
    torch.manual_seed(0)
    network = ResNet(small_config(num_hidden_layers=2)).double()
    assert network.receptive_field == 9  # 4 convolutions of radius 1
    x = torch.randn(1, 1, 21, 21, dtype=torch.float64, requires_grad=True)
    network(x, torch.tensor([0.5]))[0, 0, 10, 10].backward()
    depends = x.grad[0, 0] != 0
    rows, cols = torch.nonzero(depends, as_tuple=True)
    half = network.receptive_field // 2
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (10 - half, 10 + half, 10 - half, 10 + half)


def test_paper_resnet_has_17x17_receptive_field():
    assert ResNet(NetworkConfig(width=8, num_hidden_layers=6)).receptive_field == 17


def test_circular_resnet_is_translation_equivariant():
    torch.manual_seed(1)
    network = ResNet(small_config(padding="circular")).double()
    x, t = torch.randn(2, 1, 12, 12, dtype=torch.float64), torch.tensor([0.3, 0.8])
    shifted = network(torch.roll(x, (3, -5), dims=(2, 3)), t)
    assert torch.allclose(shifted, torch.roll(network(x, t), (3, -5), dims=(2, 3)), atol=1e-12)
    zero_padded = ResNet(small_config()).double()
    assert not torch.allclose(zero_padded(torch.roll(x, (3, -5), dims=(2, 3)), t),
                              torch.roll(zero_padded(x, t), (3, -5), dims=(2, 3)), atol=1e-6)


def test_time_embedding_separates_training_times():
    embedding = sinusoidal_embedding(torch.tensor([0.0, 0.001, 0.5]), 32)
    assert embedding.shape == (3, 32)
    assert torch.linalg.vector_norm(embedding[0] - embedding[1]) > 0.1


def test_network_score_is_minus_eps_over_sqrt_beta():
    torch.manual_seed(2)
    network = build_network(small_config(num_classes=3))
    model = NetworkScore(network)
    x, labels = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([1, 2])
    for t in (0.05, 0.5, 1.0):
        eps = network(x.float(), torch.full((2,), t), labels)
        score = model(x, t, labels, patch_size=5)
        assert score.dtype == torch.float64
        assert torch.allclose(score.float(), -eps / math.sqrt(beta(t)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call", [
    lambda model, x: model(x, 0.0, torch.tensor([0])),  # t = 0 has no score
    lambda model, x: model(x, 0.5, None),  # conditional network without labels
    lambda model, x: model(torch.randn(1, 3, 8, 8), 0.5, torch.tensor([0])),  # wrong channels
])
def test_network_score_rejects_bad_calls(call):
    with pytest.raises(PatchdbError):
        call(NetworkScore(build_network(small_config(num_classes=2))), torch.randn(1, 1, 8, 8))


@pytest.mark.parametrize("changes", [dict(architecture="vit"), dict(padding="reflect"), dict(width=0),
                                     dict(embedding_dim=15)])
def test_bad_network_configs_are_refused(changes):
    with pytest.raises(PatchdbError):
        small_config(**changes)


def test_unet_refuses_sides_not_divisible_by_4():
    with pytest.raises(PatchdbError):
        UNet(small_config(architecture="unet"))(torch.randn(1, 1, 10, 10), torch.rand(1))


def tiny_run_configs(epochs: int):
    return small_config(num_classes=3), TrainingConfig(epochs=epochs, batch_size=8, learning_rate=3e-3, seed=5)


def test_training_loss_decreases(tmp_path):
    dataset = tiny_dataset(num_images=24, side=8)
    network_config, training_config = tiny_run_configs(epochs=12)
    train_network(tmp_path, dataset, None, network_config, training_config, show_progress=False)
    losses = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["batch_losses"]
    assert len(losses) == 36
    assert losses[-6:].mean() < 0.7 * losses[:3].mean()
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    dataset = tiny_dataset(num_images=16, side=8)
    network_config, two_epochs = tiny_run_configs(epochs=2)
    _, one_epoch = tiny_run_configs(epochs=1)
    straight = train_network(tmp_path / "a", dataset, None, network_config, two_epochs, show_progress=False)
    train_network(tmp_path / "b", dataset, None, network_config, one_epoch, show_progress=False)
    resumed = train_network(tmp_path / "b", dataset, None, network_config, two_epochs, show_progress=False)
    reloaded = load_network(tmp_path / "b")
    for name, tensor in straight.network.state_dict().items():
        assert torch.equal(tensor, resumed.network.state_dict()[name]), name
        assert torch.equal(tensor, reloaded.network.state_dict()[name]), name
    assert reloaded.config == network_config
    assert read_config(tmp_path / "b")["training"]["epochs"] == 2


def test_resuming_with_other_settings_is_refused(tmp_path):
    dataset = tiny_dataset(num_images=8, side=8)
    network_config, training_config = tiny_run_configs(epochs=1)
    train_network(tmp_path, dataset, None, network_config, training_config, show_progress=False)
    with pytest.raises(PatchdbError, match=r"other settings \(network.width differ from .*config.json\)"):
        train_network(tmp_path, dataset, None, small_config(num_classes=3, width=4), training_config, show_progress=False)
    other_data = tiny_dataset(num_images=8, side=8, seed=9)
    with pytest.raises(PatchdbError, match=r"other settings \(network.num_classes, training.learning_rate, dataset.fingerprint "
                                           r"differ from "):
        train_network(tmp_path, other_data, None, small_config(), dataclasses.replace(training_config, learning_rate=1e-2),
                      show_progress=False)


def test_damaged_or_missing_runs_give_clear_errors(tmp_path):
    with pytest.raises(PatchdbError, match="not a trained run"):
        load_network(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"network": {"architecture": "resnet"}}))
    with pytest.raises(PatchdbError, match="lacks network.num_classes, training.batch_size, .*dataset.fingerprint"):
        load_network(tmp_path)
    dataset = tiny_dataset(num_images=8, side=8)
    network_config, training_config = tiny_run_configs(epochs=1)
    with pytest.raises(PatchdbError, match="is not a patchdb run's config"):  # nor is it trained over
        train_network(tmp_path, dataset, None, network_config, training_config, show_progress=False)
    (tmp_path / "config.json").unlink()
    train_network(tmp_path, dataset, None, network_config, training_config, show_progress=False)
    checkpoint = (tmp_path / "checkpoint.pt").read_bytes()
    for damaged in (b"not a checkpoint", checkpoint[:len(checkpoint) // 2], b""):
        (tmp_path / "checkpoint.pt").write_bytes(damaged)
        with pytest.raises(PatchdbError, match=r"checkpoint\.pt: not a readable patchdb checkpoint \(\w+: [^\n]+\); train "
                                               r"again into a new --out folder$") as error:
            load_network(tmp_path)
        assert "weights_only" not in str(error.value)  # torch's advice, which would run code from the file
    (tmp_path / "checkpoint.pt").write_bytes(checkpoint)
    config = read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "network": {**config["network"], "width": 4}}))
    with pytest.raises(PatchdbError, match="does not hold the network that .*config.json describes"):
        load_network(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "training": {**config["training"], "batch_size": 0}}))
    with pytest.raises(PatchdbError, match="training.batch_size must be positive whole numbers"):
        training_progress(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "dataset": {**config["dataset"], "spec": 5}}))
    with pytest.raises(PatchdbError, match="dataset.spec must be a data set spec or null and dataset.fingerprint a digest, "
                                           "not 5 and '[0-9a-f]+'; train again"):
        load_training_data(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    for foreign in ({"model": {}}, [1, 2], network_config):
        torch.save(foreign if not isinstance(foreign, NetworkConfig) else build_network(foreign).state_dict(),
                   tmp_path / "checkpoint.pt")
        with pytest.raises(PatchdbError, match="not a patchdb checkpoint"):
            training_progress(tmp_path)


def test_a_run_records_a_file_spec_that_reads_from_anywhere_and_resumes_under_another_spelling(tmp_path, monkeypatch):
    images = (tiny_dataset(num_images=8, side=8).images[:, 0].numpy() + 1) * 127.5
    np.savez(tmp_path / "train.npz", images=images.round().astype(np.uint8), labels=np.arange(8) % 3)
    monkeypatch.chdir(tmp_path)
    dataset = load_dataset("file:train.npz")
    network_config, one_epoch = tiny_run_configs(epochs=1)
    train_network(tmp_path / "run", dataset, "file:train.npz", network_config, one_epoch, show_progress=False)
    assert read_config(tmp_path / "run")["dataset"]["spec"] == f"file:{tmp_path / 'train.npz'}"
    _, two_epochs = tiny_run_configs(epochs=2)
    train_network(tmp_path / "run", dataset, "file:./train.npz:8", network_config, two_epochs, show_progress=False)
    assert training_progress(tmp_path / "run") == (2, 2)


def test_changed_training_data_is_refused_with_the_fix_for_its_kind_of_spec(tmp_path):
    """A changed file: data set is restored, not searched for with --data-dir (which file: specs do not read); images
    recorded as the embedded default that this patchdb does not embed mean training again."""
    images = (tiny_dataset(num_images=8, side=8).images[:, 0].numpy() + 1) * 127.5
    np.savez(tmp_path / "train.npz", images=images.round().astype(np.uint8))
    spec = f"file:{tmp_path / 'train.npz'}"
    network_config, one_epoch = small_config(), tiny_run_configs(epochs=1)[1]
    train_network(tmp_path / "run", load_dataset(spec), spec, network_config, one_epoch, show_progress=False)
    np.savez(tmp_path / "train.npz", images=255 - images.round().astype(np.uint8))
    with pytest.raises(PatchdbError, match=f"fingerprints differ\\); restore the file {tmp_path / 'train.npz'} the run was "
                                           "trained on$"):
        load_training_data(tmp_path / "run")
    train_network(tmp_path / "default", tiny_dataset(num_images=8, side=8), None, network_config, one_epoch,
                  show_progress=False)
    with pytest.raises(PatchdbError, match="the data set 'default' found here .*; train it again into a new --out folder"):
        load_training_data(tmp_path / "default")


def test_a_loaded_network_carries_the_progress_of_its_own_weights_while_training_goes_on(tmp_path):
    dataset = tiny_dataset(num_images=8, side=8)
    network_config, one_epoch = tiny_run_configs(epochs=1)
    train_network(tmp_path, dataset, None, network_config, one_epoch, show_progress=False)
    network = load_network(tmp_path)
    _, three_epochs = tiny_run_configs(epochs=3)
    train_network(tmp_path, dataset, None, network_config, three_epochs, show_progress=False)  # meanwhile, elsewhere
    assert network.training == (1, 1)  # what calibrate and compare record: the weights they used
    assert training_progress(tmp_path) == (3, 3) and load_network(tmp_path).training == (3, 3)


@pytest.mark.parametrize("unreadable", ["config.json", "checkpoint.pt"])
def test_an_unreadable_run_file_is_a_permission_problem_not_a_damaged_run(tmp_path, unreadable, monkeypatch):
    network_config, one_epoch = tiny_run_configs(epochs=1)
    train_network(tmp_path, tiny_dataset(num_images=8, side=8), None, network_config, one_epoch, show_progress=False)
    deny_reading(monkeypatch, tmp_path / unreadable)
    with pytest.raises(PatchdbError, match=f"cannot read .*{unreadable}: permission denied") as error:
        load_network(tmp_path)
    assert "train again" not in str(error.value)


def test_training_refuses_fewer_epochs_than_done_and_takes_the_largest_seeds(tmp_path):
    dataset = tiny_dataset(num_images=8, side=8)
    network_config, two_epochs = tiny_run_configs(epochs=2)
    train_network(tmp_path, dataset, None, network_config, two_epochs, show_progress=False)
    _, one_epoch = tiny_run_configs(epochs=1)
    with pytest.raises(PatchdbError, match="already trained 2 batches .*give at least 2 epochs"):
        train_network(tmp_path, dataset, None, network_config, one_epoch, show_progress=False)
    assert read_config(tmp_path)["training"]["epochs"] == 2  # the refused run left the config alone
    largest = dataclasses.replace(two_epochs, seed=2**62, epochs=1)
    train_network(tmp_path / "largest-seed", dataset, None, network_config, largest, show_progress=False)


def test_training_progress_tells_a_finished_run_from_an_interrupted_one(tmp_path):
    dataset = tiny_dataset(num_images=12, side=8)
    network_config, training_config = tiny_run_configs(epochs=1)
    train_network(tmp_path, dataset, None, network_config, training_config, show_progress=False)
    assert training_progress(tmp_path) == (2, 2) and is_trained(tmp_path)
    config = read_config(tmp_path)  # as if `patchdb train --epochs 3` had been stopped after its first epoch
    (tmp_path / "config.json").write_text(json.dumps({**config, "training": {**config["training"], "epochs": 3}}))
    assert training_progress(tmp_path) == (2, 6) and not training_progress(tmp_path).finished and not is_trained(tmp_path)


def test_presets_and_subset():
    dataset = tiny_dataset(num_images=12, side=8)
    network_config, training_config = preset_configs("paper", "resnet", dataset, conditional=True)
    assert (network_config.width, network_config.num_hidden_layers, network_config.num_classes) == (256, 6, 3)
    assert (training_config.epochs, training_config.learning_rate, training_config.batch_size) == (300, 1e-4, 128)
    assert training_config.lr_decay == 0.999965 and training_config.weight_decay == 0.0
    unet, unet_training = preset_configs("cpu", "unet", dataset)
    assert unet == preset_configs("paper", "unet", dataset)[0]  # the cpu preset trains the paper's UNet, on less
    assert (unet_training.epochs, unet_training.max_images) == (80, 1000)
    assert preset_configs("cpu", "resnet", dataset)[1].epochs == 320  # four times the UNet's epochs, at a fifth of its time per batch
    assert preset_configs("cpu", "unet", dataset, epochs=7)[1].epochs == 7
    subset = training_subset(dataset, 5)
    assert torch.equal(subset.images, dataset.images[:5]) and torch.equal(subset.labels, dataset.labels[:5])
    with pytest.raises(PatchdbError):
        preset_configs("laptop", "resnet", dataset)
    with pytest.raises(PatchdbError):
        preset_configs("cpu", "resnet", tiny_dataset(labelled=False), conditional=True)


@pytest.mark.parametrize("architecture", ["resnet", "unet"])
def test_output_depends_on_time_and_label(architecture):
    torch.manual_seed(3)
    network = build_network(small_config(architecture=architecture, num_classes=3))
    x = torch.randn(1, 1, 8, 8).expand(2, -1, -1, -1)
    by_time = network(x, torch.tensor([0.1, 0.9]), torch.tensor([0, 0]))
    by_label = network(x, torch.tensor([0.5, 0.5]), torch.tensor([0, 2]))
    assert not torch.allclose(by_time[0], by_time[1], atol=1e-4)
    assert not torch.allclose(by_label[0], by_label[1], atol=1e-4)


@pytest.mark.parametrize("architecture", ["resnet", "unet"])
def test_every_embedding_projection_carries_time_and_label_on_grey_images(architecture):
    """A projection to the one channel of a grey image (the UNet's first block) must not be normalised to a constant."""
    torch.manual_seed(0)
    network = build_network(small_config(architecture=architecture, num_classes=3))
    times, labels = torch.linspace(0, 1, 32), torch.arange(32) % 3
    embedding = network.embedding(times, labels)
    projections = [module for module in network.modules()
                   if isinstance(module, torch.nn.Sequential) and isinstance(module[0], torch.nn.Linear)]
    if architecture == "unet":
        assert network.encoder1.projection in projections and network.encoder1.projection[0].out_features == 1
    for projection in projections:
        assert projection(embedding).std(0).max() > 1e-3, projection


def test_a_checkpoint_without_its_config_is_a_damaged_folder_not_an_untrained_one(tmp_path):
    from click.testing import CliRunner
    from cli.main import main

    dataset = tiny_dataset(num_images=8, side=8)
    network_config, one_epoch = tiny_run_configs(epochs=1)
    train_network(tmp_path, dataset, None, network_config, one_epoch, show_progress=False)
    (tmp_path / "config.json").unlink()
    message = f"{tmp_path} holds a checkpoint.pt without its config.json, so the run folder is damaged"
    with pytest.raises(PatchdbError, match=f"{message} .*; train into a new --out folder$"):
        load_network(tmp_path)
    result = CliRunner().invoke(main, ["train", "--dataset", "default:8", "--epochs", "1", "--out", str(tmp_path)])
    assert result.exit_code == 1 and message in result.output and "`patchdb train --out" not in result.output, result.output


def test_the_model_cache_expands_a_tilde_like_every_other_path(monkeypatch, tmp_path):
    from patchdb.training import model_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PATCHDB_CACHE", "~/cache")
    assert model_cache_dir() == tmp_path / "cache" / "models"


def test_the_cache_folder_of_a_preset_network_changes_with_the_preset(monkeypatch, tmp_path):
    """A network cached under an earlier version of the cpu preset is neither used nor resumed as this one."""
    monkeypatch.setenv("PATCHDB_CACHE", str(tmp_path))
    dataset = tiny_dataset()
    folder = cached_run_dir("unet", dataset, conditional=True)
    assert folder.parent == tmp_path / "models" and folder == cached_run_dir("unet", dataset, conditional=True)
    assert len({folder, cached_run_dir("unet", dataset), cached_run_dir("resnet", dataset, conditional=True),
                cached_run_dir("unet", dataset, conditional=True, padding="circular")}) == 4
    with monkeypatch.context() as patch:  # the same configs, another architecture (different weights)
        patch.setattr("patchdb.networks.MIN_CHANNELS_PER_GROUP", 1)
        assert cached_run_dir("unet", dataset, conditional=True) != folder
    for part, change in (("unet", {"width": 16}), ("epochs", {"unet": 81})):
        with monkeypatch.context() as patch:
            patch.setitem(PRESETS["cpu"], part, {**PRESETS["cpu"][part], **change})
            assert cached_run_dir("unet", dataset, conditional=True) != folder
    assert cached_run_dir("unet", dataset, conditional=True) == folder


def test_a_run_stopped_before_its_first_checkpoint_keeps_its_settings_and_names_its_command(tmp_path):
    """Its config.json alone still refuses other settings, and the advice to finish it is the command that resumes it."""
    dataset = tiny_dataset(num_images=8, side=8)
    network_config, training_config = preset_configs("cpu", "resnet", dataset, conditional=True, epochs=1)
    train_network(tmp_path / "run", dataset, None, network_config, training_config, show_progress=False)
    (tmp_path / "run" / "checkpoint.pt").unlink()  # as if killed during its first epoch
    command = f"`patchdb train --model resnet --padding zeros --conditional --preset cpu --epochs 1 --seed 0 --out {tmp_path / 'run'}`"
    with pytest.raises(PatchdbError, match="has no checkpoint.pt yet: finish training with ") as error:
        training_progress(tmp_path / "run")
    assert str(error.value).endswith(command)
    named = read_config(tmp_path / "run")
    named["dataset"]["spec"] = "fashion-mnist:train"  # found in a data folder, which --data-dir may have named
    assert train_command(tmp_path / "run", named).endswith("--out {}` (with the --data-dir that finds its data, if one "
                                                           "did)".format(tmp_path / "run"))
    with pytest.raises(PatchdbError, match="network.num_classes differ from .*; use a new --out folder, or resume that run: "):
        train_network(tmp_path / "run", dataset, None, dataclasses.replace(network_config, num_classes=0), training_config,
                      show_progress=False)
    assert read_config(tmp_path / "run")["network"] == dataclasses.asdict(network_config)
    train_network(tmp_path / "own", dataset, None, *tiny_run_configs(epochs=1), show_progress=False)
    (tmp_path / "own" / "checkpoint.pt").unlink()
    with pytest.raises(PatchdbError, match="finish training with the train_network call that started it"):
        training_progress(tmp_path / "own")


def test_a_checkpoint_is_loaded_only_with_the_config_of_its_own_run(tmp_path):
    """Two runs whose weights have the same shapes: neither loads nor resumes the other's checkpoint."""
    dataset = tiny_dataset(num_images=8, side=8)
    network_config, training_config = tiny_run_configs(epochs=1)
    train_network(tmp_path / "a", dataset, None, network_config, training_config, show_progress=False)
    other = dataclasses.replace(training_config, learning_rate=1e-2)
    train_network(tmp_path / "b", dataset, None, network_config, other, show_progress=False)
    (tmp_path / "b" / "checkpoint.pt").write_bytes((tmp_path / "a" / "checkpoint.pt").read_bytes())
    message = r"b/checkpoint.pt does not hold the network that .*b/config.json describes \(it was trained with other settings\)"
    with pytest.raises(PatchdbError, match=message):
        load_network(tmp_path / "b")
    with pytest.raises(PatchdbError, match=message):
        train_network(tmp_path / "b", dataset, None, network_config, dataclasses.replace(other, epochs=2), show_progress=False)
    copied = tmp_path / "copy"  # a whole run folder, copied or renamed, is the same run
    copied.mkdir()
    for name in ("config.json", "checkpoint.pt"):
        (copied / name).write_bytes((tmp_path / "a" / name).read_bytes())
    copied_weights, own_weights = load_network(copied).network.state_dict(), load_network(tmp_path / "a").network.state_dict()
    assert all(torch.equal(copied_weights[name], weight) for name, weight in own_weights.items())


def test_a_damaged_optimizer_state_is_a_message(tmp_path):
    dataset = tiny_dataset(num_images=8, side=8)
    network_config, training_config = tiny_run_configs(epochs=1)
    train_network(tmp_path, dataset, None, network_config, training_config, show_progress=False)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    torch.save({**checkpoint, "optimizer": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(PatchdbError, match=r"checkpoint.pt: its optimizer state is damaged \(KeyError: .*train again"):
        train_network(tmp_path, dataset, None, network_config, dataclasses.replace(training_config, epochs=2),
                      show_progress=False)


def test_one_cache_folder_serves_every_spec_of_the_same_training_images():
    from conftest import quantised_images
    from patchdb.data import make_dataset

    images = quantised_images(3, 1001, 8)
    folder = cached_run_dir("resnet", make_dataset(images[:1000], None, "fashion-mnist:train:1000"))
    assert cached_run_dir("resnet", make_dataset(images, None, "fashion-mnist")) == folder  # the cpu preset's first 1,000
    assert cached_run_dir("resnet", make_dataset(images[1:], None, "fashion-mnist")) != folder
