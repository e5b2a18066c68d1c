"""Time the exact backend on the core issue's workload: boundary-broken ELS, the first N Fashion-MNIST
training images, unconditional, the paper's Fashion-MNIST ResNet scales, 20 steps, seed 0, on the CPU,
through the sample job's own loop (patchdb.generate.generate: provenance at the last step).

One configuration:
    python benchmarks/bench_exact.py run --images 1000 --batch 1 --method windows
The issue's suite (each configuration in its own process, so that peak memory is its own; the smallest
set also with the matrix-product method, for the ratio and the agreement of the two methods' samples):
    python benchmarks/bench_exact.py suite --images 1000,6000,60000 --batch 1 --extra-batch 16 --out benchmarks/results/exact.json

Prints seconds (total and per step) and the process's peak resident memory.
"""

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from patchdb import fused, windows  # noqa: E402
from patchdb.comparison import image_statistics  # noqa: E402
from patchdb.data import load_dataset  # noqa: E402
from patchdb.engine import DEFAULT_MEMORY_BUDGET, EXACT_METHODS, ExactBackend  # noqa: E402
from patchdb.generate import device_name, generate, seeded_inputs  # noqa: E402
from patchdb.machines import make_machine  # noqa: E402
from patchdb.scales import parse_scales  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data"
PAPER_SCALES = "paper:fashion-mnist-resnet-zeros-conditional"


@click.group()
def main() -> None:
    """Benchmarks of the exact backend."""


@main.command()
@click.option("--images", type=click.IntRange(1), default=1000, show_default=True, help="First N Fashion-MNIST training images.")
@click.option("--label", type=click.IntRange(0, 9), default=None,
              help="Instead of --images: every training image of this class, sampled class-conditionally.")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True,
              help="Samples drawn together (seeds seed..seed+batch-1).")
@click.option("--machine", default="bbels", show_default=True)
@click.option("--scales", default=PAPER_SCALES, show_default=True)
@click.option("--steps", type=click.IntRange(2), default=20, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=DEFAULT_DATA, show_default=True)
@click.option("--method", type=click.Choice(EXACT_METHODS), default="auto", show_default=True,
              help="The exact backend's method: sliding windows (CPU), matrix products, the fused kernel (CUDA, Triton), "
                   "or auto (windows on a CPU, fused on a GPU).")
@click.option("--block-pruning/--no-block-pruning", default=True, show_default=True, help="The products method's block pruning.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="torch threads (also the windows method's); 0 keeps torch's default. "
                   "On a shared machine 1 thread gives steadier figures.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--memory-gib", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_MEMORY_BUDGET / 1024**3,
              show_default=True,
              help="The machine's memory budget (dictionaries or image layouts cached per scale when they fit in 3/4 of it).")
@click.option("--save", type=click.Path(path_type=Path), default=None,
              help="Save noise, samples, seconds and device to this .pt file (bench_topk.py --exact-samples reads it).")
@click.option("--progress/--no-progress", default=False, show_default=True, help="A progress bar over the steps (on stderr).")
@click.option("--profile-step", type=click.IntRange(1), default=None,
              help="Profile the sampler's call number N (torch.profiler) and write the costliest operations to stderr.")
def run(images, label, batch, machine, scales, steps, seed, data_dir, method, block_pruning, threads, device, memory_gib, save,
        progress, profile_step) -> None:
    """Sample once and print one JSON line with the timings and peak memory."""
    if threads:
        torch.set_num_threads(threads)
    dataset = load_dataset("fashion-mnist:train" if label is not None else f"fashion-mnist:train:{images}", data_dir)
    scale_list = parse_scales(scales, steps)
    noise, _ = seeded_inputs(seed, batch, tuple(dataset.images.shape[1:]))
    labels = None if label is None else torch.full((batch,), label, device=device)
    backend = ExactBackend(block_pruning=block_pruning, method=method)
    score_model = make_machine(machine, dataset, device=device, memory_budget=int(memory_gib * 1024**3), backend=backend)
    if profile_step is not None:
        score_model = ProfiledCall(score_model, profile_step)
    start = time.perf_counter()
    generation = generate(score_model, noise.to(device), scale_list, steps, labels, progress=progress)
    total = time.perf_counter() - start
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"noise": noise, "samples": generation.samples.cpu(), "seconds": total, "device": device_name(device),
                    "threads": torch.get_num_threads()}, save)
    windowed = machine in ("ls", "els", "bbels") and backend.uses_windows(torch.device(device), torch.float32)
    fuses = method == "fused" or (method == "auto" and device == "cuda" and fused.available(torch.device(device)))
    print(json.dumps({
        "images": len(dataset) if label is None else f"class {label}: {len(dataset.indices_of_label(label))}",
        "batch": batch, "method": "windows" if windowed else "fused" if fuses else "products",
        "isa": windows.best_isa() if windowed else None,
        "block_pruning": block_pruning, "machine": machine, "scales": scales, "steps": steps, "seed": seed,
        "device": device_name(device), "seconds": round(total, 2), "seconds_per_sample": round(total / batch, 3),
        "step_seconds": [round(s, 3) for s in generation.seconds_per_step],
        "peak_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 1024**3, 2) if device == "cuda" else None,
        "threads": torch.get_num_threads(),
    }))


class ProfiledCall:
    """A machine whose call number `call` (from 1) runs under torch.profiler; the table of its costliest operations goes to
    stderr."""

    def __init__(self, machine, call: int):
        self.machine, self.call, self.calls = machine, call, 0

    def posterior(self, *args, **kwargs):
        self.calls += 1
        if self.calls != self.call:
            return self.machine.posterior(*args, **kwargs)
        cuda = self.machine.device.type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as profile:
            posterior = self.machine.posterior(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
        table = profile.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=25)
        print(f"call {self.call} profiled:\n{table}", file=sys.stderr, flush=True)
        return posterior

    def take_report(self):
        return self.machine.take_report()


@main.command()
@click.option("--images", default="1000,6000,60000", show_default=True, help="Comma list of training-set sizes.")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True)
@click.option("--extra-batch", type=click.IntRange(1), default=16, show_default=True,
              help="Also time this batch size on the smallest set.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True, help="Passed to each run.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write all results to this JSON file.")
def suite(images, batch, extra_batch, threads, out) -> None:
    """Run each configuration in its own process, print a markdown table and the two methods' agreement."""
    sizes = [int(item) for item in images.split(",")]
    smallest = min(sizes)
    configs = ([(smallest, batch, "products"), (smallest, batch, "windows")]
               + [(size, batch, "windows") for size in sizes if size != smallest]
               + [(smallest, extra_batch, "windows")])
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for size, batch_size, method in configs:
            saved = Path(folder) / f"{size}-{batch_size}-{method}.pt"
            command = [sys.executable, __file__, "run", "--images", str(size), "--batch", str(batch_size), "--method", method,
                       "--threads", str(threads), "--save", str(saved)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
        products = torch.load(Path(folder) / f"{smallest}-{batch}-products.pt")["samples"]
        windowed = torch.load(Path(folder) / f"{smallest}-{batch}-windows.pt")["samples"]
    agreement = {"images": smallest, "batch": batch,
                 "pearson_r": image_statistics(windowed.double(), products.double())["pearson_r"].tolist(),
                 "max_abs_difference": float((windowed - products).abs().max())}
    print("\n| images | batch | method | seconds | seconds per sample | peak memory (GiB) |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for result in results:
        print(f"| {result['images']} | {result['batch']} | {result['method']} | {result['seconds']} | "
              f"{result['seconds_per_sample']} | {result['peak_memory_gib']} |")
    print(f"\nwindows against products, {smallest} images: Pearson r {agreement['pearson_r']}, "
          f"largest pixel difference {agreement['max_abs_difference']:.2e}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"runs": results, "windows_against_products": agreement}, indent=1) + "\n")


if __name__ == "__main__":
    main()
