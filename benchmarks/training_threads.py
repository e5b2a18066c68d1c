"""Is seeded training bit-reproducible, and at which thread counts? Trains the same small run (conditional cpu-preset
network on the first --images default images, --epochs epochs, --seed) once per entry of --threads (the default
2,2,1: twice on 2 threads, then on 1), each in a fresh process, and prints one JSON line: each run's weight digest and
whether it equals the first run's.

    python benchmarks/training_threads.py --model unet --images 256 --epochs 2 --threads 2,2,1
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]


@click.command()
@click.option("--model", type=click.Choice(["resnet", "unet"]), default="unet", show_default=True)
@click.option("--images", type=click.IntRange(1), default=256, show_default=True, help="First N images of the default set.")
@click.option("--epochs", type=click.IntRange(1), default=2, show_default=True)
@click.option("--seed", type=click.IntRange(0), default=1, show_default=True)
@click.option("--threads", default="2,2,1", show_default=True, help="Thread count (OMP_NUM_THREADS) of each run, in order.")
def main(model: str, images: int, epochs: int, seed: int, threads: str) -> None:
    """Train once per entry of --threads and compare the weight digests with the first run's."""
    digests = []
    with tempfile.TemporaryDirectory() as folder:
        for k, count in enumerate(int(item) for item in threads.split(",")):
            run = Path(folder) / f"run{k}"
            environment = {**os.environ, "OMP_NUM_THREADS": str(count), "PYTHONPATH": str(ROOT)}
            subprocess.run([sys.executable, "-m", "cli", "train", "--model", model, "--dataset", f"default:{images}",
                            "--conditional", "--epochs", str(epochs), "--seed", str(seed), "--out", str(run)],
                           check=True, env=environment, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            digest = subprocess.run([sys.executable, "-c", "import sys; from patchdb.training import load_network; "
                                     "print(load_network(sys.argv[1], 'cpu').weights_digest())", str(run)],
                                    check=True, env=environment, cwd=ROOT, capture_output=True, text=True).stdout.strip()
            first = digests[0]["weights_digest"] if digests else digest
            digests.append({"threads": count, "weights_digest": digest, "equals_first": digest == first})
    print(json.dumps({"model": model, "images": images, "epochs": epochs, "seed": seed, "runs": digests}))


if __name__ == "__main__":
    main()
