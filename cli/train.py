"""``patchdb train``: train the paper's ResNet or UNet denoiser on a data set."""

import dataclasses
import time

import click

from cli.options import DATA_DIR, DATASET, DEVICE, OUTPUT_FOLDER, SEEDS
from patchdb.data import load_dataset
from patchdb.networks import ARCHITECTURES, PADDINGS
from patchdb.training import PRESETS, preset_configs, train_network


@click.command("train")
@click.option("--model", "architecture", type=click.Choice(ARCHITECTURES), default="resnet", help="Network architecture.")
@DATASET
@DATA_DIR
@click.option("--padding", type=click.Choice(PADDINGS), default="zeros", help="Padding of every 3x3 convolution.")
@click.option("--conditional/--unconditional", default=False, help="Learn a class embedding (needs labels).")
@click.option("--preset", type=click.Choice(tuple(PRESETS)), default="cpu",
              help="cpu: the first 1,000 images, a narrow ResNet or the paper's UNet, 7-10 min on 2 idle cores; "
                   "paper: the paper's setting (a GPU job).")
@click.option("--epochs", type=click.IntRange(min=1, max=10**6), default=None, show_default="the preset's",
              help="Number of passes over the training images.")
@click.option("--seed", type=SEEDS, default=0, help="Seed of the initial weights, shuffles, times and noise.")
@click.option("--device", type=DEVICE, default="cpu", help="torch device.")
@click.option("--out", "run_dir", type=OUTPUT_FOLDER, required=True,
              help="Run folder: config.json, checkpoint.pt, loss.png. An unfinished run there is resumed.")
def train(architecture, dataset, data_dir, padding, conditional, preset, epochs, seed, device, run_dir) -> None:
    """Train a noise-prediction network (noise MSE, AdamW, lr x 0.999965 per batch) into RUN_DIR."""
    images = load_dataset(dataset, data_dir)
    network_config, training_config = preset_configs(preset, architecture, images, padding=padding,
                                                     conditional=conditional, epochs=epochs)
    training_config = dataclasses.replace(training_config, seed=seed)
    start = time.monotonic()
    train_network(run_dir, images, dataset, network_config, training_config, device=device)
    click.echo(f"trained {architecture} in {time.monotonic() - start:.0f} s: {run_dir}")
