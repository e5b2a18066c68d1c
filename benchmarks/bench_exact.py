"""Time the exact engine on the issue's workload: boundary-broken ELS, Fashion-MNIST training images,
unconditional, the paper's Fashion-MNIST ResNet scales, 20 steps, seed 0, on the CPU.

One configuration:
    python benchmarks/bench_exact.py run --images 1000 --batch 1 [--no-block-pruning]
The issue's suite (each configuration in its own process, so that peak memory is its own; the
smallest set is also run without block pruning, for the ratio):
    python benchmarks/bench_exact.py suite --images 1000,6000,60000 --batch 1 --extra-batch 16 --out benchmarks/results/exact.json

Prints seconds (total and per step) and the process's peak resident memory.
"""

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import click
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from patchdb.data import load_dataset  # noqa: E402
from patchdb.engine import DEFAULT_MEMORY_BUDGET, ExactBackend  # noqa: E402
from patchdb.generate import device_name, seeded_inputs  # noqa: E402
from patchdb.machines import make_machine  # noqa: E402
from patchdb.sampler import sample_ddim  # noqa: E402
from patchdb.scales import parse_scales  # noqa: E402
from patchdb.schedule import machine_steps  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data"
PAPER_SCALES = "paper:fashion-mnist-resnet-zeros-conditional"


@click.group()
def main() -> None:
    """Benchmarks of the exact backend."""


@main.command()
@click.option("--images", type=click.IntRange(1), default=1000, show_default=True, help="First N Fashion-MNIST training images.")
@click.option("--label", type=click.IntRange(0, 9), default=None,
              help="Instead of --images: every training image of this class, sampled class-conditionally.")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True, help="Samples drawn together (seeds seed..seed+batch-1).")
@click.option("--machine", default="bbels", show_default=True)
@click.option("--scales", default=PAPER_SCALES, show_default=True)
@click.option("--steps", type=click.IntRange(2), default=20, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=DEFAULT_DATA, show_default=True)
@click.option("--block-pruning/--no-block-pruning", default=True, show_default=True, help="The exact backend's block pruning.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="torch threads; 0 keeps torch's default. On a shared machine 1 thread gives steadier figures.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--memory-gib", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_MEMORY_BUDGET / 1024**3, show_default=True,
              help="The machine's memory budget (dictionaries cached per scale when they fit in 3/4 of it).")
@click.option("--save", type=click.Path(path_type=Path), default=None,
              help="Save noise, samples, seconds and device to this .pt file (bench_topk.py --exact-samples reads it).")
def run(images, label, batch, machine, scales, steps, seed, data_dir, block_pruning, threads, device, memory_gib, save) -> None:
    """Sample once and print one JSON line with the timings and peak memory."""
    if threads:
        torch.set_num_threads(threads)
    dataset = load_dataset("fashion-mnist:train" if label is not None else f"fashion-mnist:train:{images}", data_dir)
    scale_list = parse_scales(scales, steps)
    noise, _ = seeded_inputs(seed, batch, tuple(dataset.images.shape[1:]))
    labels = None if label is None else torch.full((batch,), label, device=device)
    step_seconds = []
    last = [time.perf_counter()]

    def record(_info):
        if device == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        step_seconds.append(now - last[0])
        last[0] = now

    score_model = make_machine(machine, dataset, device=device, memory_budget=int(memory_gib * 1024**3),
                               backend=ExactBackend(block_pruning=block_pruning))
    start = time.perf_counter()
    last[0] = start
    samples = sample_ddim(score_model, noise.to(device), machine_steps(steps), steps, scale_list, labels=labels,
                          callback=record, disable=True)
    total = time.perf_counter() - start
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"noise": noise, "samples": samples.cpu(), "seconds": total, "device": device_name(device)}, save)
    print(json.dumps({
        "images": len(dataset) if label is None else f"class {label}: {len(dataset.indices_of_label(label))}",
        "batch": batch, "block_pruning": block_pruning, "machine": machine, "scales": scales, "steps": steps, "seed": seed,
        "device": device_name(device), "seconds": round(total, 2), "seconds_per_sample": round(total / batch, 3),
        "step_seconds": [round(s, 3) for s in step_seconds],
        "peak_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 1024**3, 2) if device == "cuda" else None,
        "threads": torch.get_num_threads(),
    }))


@main.command()
@click.option("--images", default="1000,6000,60000", show_default=True, help="Comma list of training-set sizes.")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True)
@click.option("--extra-batch", type=click.IntRange(1), default=16, show_default=True, help="Also time this batch size on the smallest set.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True, help="Passed to each run.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write all results to this JSON file.")
def suite(images, batch, extra_batch, threads, out) -> None:
    """Run each configuration in its own process and print a markdown table."""
    sizes = [int(item) for item in images.split(",")]
    configs = [(min(sizes), batch, False)] + [(size, batch, True) for size in sizes] + [(min(sizes), extra_batch, True)]
    results = []
    for size, batch_size, pruning in configs:
        command = [sys.executable, __file__, "run", "--images", str(size), "--batch", str(batch_size),
                   "--block-pruning" if pruning else "--no-block-pruning", "--threads", str(threads)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print("\n| images | batch | block pruning | seconds | seconds per sample | peak memory (GiB) |\n| --- | --- | --- | --- | --- | --- |")
    for result in results:
        print(f"| {result['images']} | {result['batch']} | {result['block_pruning']} | {result['seconds']} | "
              f"{result['seconds_per_sample']} | {result['peak_memory_gib']} |")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
