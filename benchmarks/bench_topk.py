"""Accuracy against speed of the top-k backend (issue 4), in one run, against the exact backend.

Workload: boundary-broken ELS, the paper's Fashion-MNIST ResNet scales, 20 steps, Fashion-MNIST
training images (the first N, or every image of one class), S seeds drawn together in one batch.

    python benchmarks/bench_topk.py --label 0 --seeds 4 --threads 1 \
        --setting topk=16384,tol=1e-3,fallback=auto --setting topk=4096,tol=1e-2,fallback=estimate \
        --out benchmarks/results/topk-class0.json

The store is built (or resumed) first and its build time reported (--store: an existing store is
used as it is). Then the exact backend samples the batch (--exact-samples FILE.pt: loaded from
FILE.pt when it exists, with the seconds it took, else saved there), then each --setting does, from
the same noise; each is timed (model calls only) and
compared with the exact samples by Pearson r per seed. With --verify, one extra run of the first
setting recomputes every step exactly on the same input and counts the certified pixels whose
posterior mean is off by more than tol times the spread of the pixel values (must be 0).
"""

import json
import resource
import sys
import time
from pathlib import Path

import click
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cli.options import TopK  # noqa: E402
from patchdb.allocator import retain_freed_memory  # noqa: E402
from patchdb.build import build_store  # noqa: E402
from patchdb.comparison import image_statistics, summarize  # noqa: E402
from patchdb.data import load_dataset  # noqa: E402
from patchdb.engine import DEFAULT_MEMORY_BUDGET  # noqa: E402
from patchdb.generate import device_name, generate, index_steps, seeded_inputs  # noqa: E402
from patchdb.machines import make_machine  # noqa: E402
from patchdb.sampler import sample_ddim  # noqa: E402
from patchdb.store import PatchStore  # noqa: E402
from patchdb.scales import parse_scales  # noqa: E402
from patchdb.schedule import machine_steps  # noqa: E402
from patchdb.topk import PATHS, TopKBackend  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data"
PAPER_SCALES = "paper:fashion-mnist-resnet-zeros-conditional"


def parse_setting(text: str) -> dict:
    """'topk=4096,tol=1e-2,fallback=estimate,estimate_samples=4096' -> TopKBackend keyword arguments (topk=auto: None)."""
    types = {"topk": lambda value: TopK().convert(value, None, None), "scoring": str, "tol": float, "fallback": str,
             "estimate_samples": int, "estimate_error": float, "exact_from_patch_size": int}
    setting = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name not in types:
            raise click.BadParameter(f"unknown setting {name!r}; known: {', '.join(types)}")
        setting[name] = types[name](value)
    return setting


class VerifyingMachine:
    """A score model that runs the indexed machine and checks its certified pixels against the exact one."""

    def __init__(self, indexed, exact, tol: float, spread: float):
        self.indexed, self.exact, self.tol, self.spread = indexed, exact, tol, spread
        self.steps = []

    def __call__(self, x, t, labels=None, patch_size=None):
        indexed = self.indexed.posterior(x, t, labels, patch_size)
        exact = self.exact.posterior(x, t, labels, patch_size)
        certified = indexed.path == PATHS.index("certified")
        error = (indexed.mean - exact.mean).abs()[:, 0][certified]
        self.steps.append({"t": t, "patch_size": patch_size, "certified_fraction": float(certified.double().mean()),
                           "max_error_on_certified": float(error.max()) if error.numel() else 0.0,
                           "violations": int((error > self.tol * self.spread).sum())})
        return indexed.score(x, t)


@click.command()
@click.option("--images", type=click.IntRange(1), default=None, help="The first N training images (unconditional).")
@click.option("--label", type=click.IntRange(0, 9), default=None, help="Every training image of this class (class-conditional).")
@click.option("--seeds", type=click.IntRange(1), default=4, show_default=True, help="Samples (seeds 0..S-1) in one batch.")
@click.option("--setting", "settings", multiple=True, help="TopKBackend options, e.g. topk=16384,tol=1e-3,fallback=auto.")
@click.option("--verify/--no-verify", default=False, show_default=True,
              help="Check the certificate of the first setting at every step.")
@click.option("--cluster-size", type=click.IntRange(1), default=1024, show_default=True)
@click.option("--store-dir", type=click.Path(path_type=Path), default=REPO / "runs" / "stores", show_default=True)
@click.option("--store", "store_path", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Use this existing store instead of building one under --store-dir.")
@click.option("--exact-samples", type=click.Path(path_type=Path), default=None,
              help="Load the exact backend's samples and seconds from this .pt file, or save them there.")
@click.option("--exact-timing-seeds", type=click.IntRange(0), default=0, show_default=True,
              help="With loaded --exact-samples (say, made on a GPU): time the exact backend here on this many seeds "
                   "and take its per-sample seconds for the speed-ups (0: the seconds saved in the file).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=DEFAULT_DATA, show_default=True)
@click.option("--threads", type=click.IntRange(0), default=1, show_default=True, help="torch threads (0: torch's default).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where both backends sample.")
@click.option("--memory-gib", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_MEMORY_BUDGET / 1024**3,
              show_default=True, help="Each machine's memory budget.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write the results to this JSON file.")
def main(images, label, seeds, settings, verify, cluster_size, store_dir, store_path, exact_samples, exact_timing_seeds, data_dir,
         threads, device, memory_gib, out) -> None:
    """Time the exact backend and each top-k setting on one batch; print Pearson r against exact and speed-ups."""
    if (images is None) == (label is None):
        raise click.UsageError("give exactly one of --images N and --label L")
    retain_freed_memory()
    if threads:
        torch.set_num_threads(threads)
    spec = "fashion-mnist:train" if images is None else f"fashion-mnist:train:{images}"
    dataset = load_dataset(spec, data_dir)
    scales = parse_scales(PAPER_SCALES, 20)
    used = sorted({scales[min(i, 19)] for i in machine_steps(20)})
    build_seconds = None
    if store_path is None:
        store_path = store_dir / (f"bbels-class{label}-c{cluster_size}" if images is None
                                  else f"bbels-first{images}-c{cluster_size}")
        start = time.perf_counter()
        store = build_store(dataset, "bbels", used, store_path, conditional=label is not None,
                            labels=None if label is None else [label], cluster_size=cluster_size)
        build_seconds = round(time.perf_counter() - start, 1)
    else:
        store = PatchStore(store_path)
    noise, _ = seeded_inputs(0, seeds, tuple(dataset.images.shape[1:]))
    labels = None if label is None else torch.full((seeds,), label, device=device)
    machine_options = {"device": device, "memory_budget": int(memory_gib * 1024**3)}

    def run(machine, count=seeds):
        start = time.perf_counter()
        generation = generate(machine, noise[:count].to(device), scales, 20, None if labels is None else labels[:count],
                              progress=False)
        if device == "cuda":
            torch.cuda.synchronize()
        return generation, time.perf_counter() - start

    exact_machine = make_machine("bbels", dataset, **machine_options)
    if exact_samples is not None and exact_samples.is_file():
        saved = torch.load(exact_samples)
        if saved["noise"].shape != noise.shape or not torch.equal(saved["noise"], noise):
            raise click.UsageError(f"{exact_samples} holds the exact samples of other noise: delete it or pass another file")
        exact_result, exact_seconds = saved["samples"], saved["seconds"]
        print(f"exact: {exact_seconds:.1f} s for {seeds} samples on {saved.get('device', 'cpu')}, "
              f"{saved.get('threads', 'unknown')} threads (loaded from {exact_samples})", flush=True)
        if not exact_timing_seeds and saved.get("threads", torch.get_num_threads()) != torch.get_num_threads():
            raise click.UsageError(f"{exact_samples} was timed on {saved['threads']} threads and this run has "
                                   f"{torch.get_num_threads()}: pass --threads {saved['threads']}, or --exact-timing-seeds N "
                                   "to time the exact backend here")
        if exact_timing_seeds:
            # samples made elsewhere (a GPU): time the exact backend here on the first seeds, per sample
            timed, timed_seconds = run(exact_machine, exact_timing_seeds)
            exact_seconds = timed_seconds * seeds / exact_timing_seeds
            timed_difference = float((timed.samples.cpu() - exact_result[:exact_timing_seeds]).abs().max())
            print(f"exact here: {timed_seconds:.1f} s for {exact_timing_seeds} samples (largest difference from the loaded "
                  f"samples {timed_difference:.2e}); {exact_seconds:.1f} s for {seeds} at that rate", flush=True)
    else:
        exact, exact_seconds = run(exact_machine)
        exact_result = exact.samples.cpu()
        print(f"exact: {exact_seconds:.1f} s for {seeds} samples", flush=True)
        if exact_samples is not None:
            exact_samples.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"noise": noise, "samples": exact_result, "seconds": exact_seconds, "device": device_name(device),
                        "threads": torch.get_num_threads()}, exact_samples)
    results = {"data": spec if label is None else f"{spec}, class {label}", "seeds": seeds, "threads": torch.get_num_threads(),
               "device": device_name(device),
               "store": str(store_path), "store_build_seconds": build_seconds,
               "store_bytes": sum(path.stat().st_size for path in store_path.iterdir()),
               "exact_seconds": round(exact_seconds, 2), "exact_timing_seeds": exact_timing_seeds or seeds, "settings": []}
    for setting in map(parse_setting, settings):
        backend = TopKBackend(**setting)
        generation, seconds = run(make_machine("bbels", dataset, store=store, backend=backend, **machine_options))
        r = image_statistics(generation.samples.cpu(), exact_result)["pearson_r"].tolist()
        steps = index_steps(generation, machine_steps(20), scales, 20)
        result = {"setting": setting, "seconds": round(seconds, 2), "speedup": round(exact_seconds / seconds, 2),
                  "pearson_r": summarize(r), "pearson_r_per_seed": r, "steps": steps}
        results["settings"].append(result)
        print(f"{setting}: {seconds:.1f} s, speed-up {exact_seconds / seconds:.2f}, "
              f"median r {result['pearson_r']['median']:.5f}, "
              f"min r {result['pearson_r']['min']:.5f}; certified per step "
              + " ".join(f"{step['fraction_of_pixels'].get('certified', 0):.2f}" for step in steps), flush=True)
    if verify and settings:
        setting = parse_setting(settings[0])
        backend = TopKBackend(**setting)
        spread = float(dataset.images.max() - dataset.images.min())
        verifier = VerifyingMachine(make_machine("bbels", dataset, store=store, backend=backend, **machine_options),
                                    exact_machine, backend.tol, spread)
        sample_ddim(verifier, noise.to(device), machine_steps(20), 20, scales, labels=labels, disable=True)
        results["verification"] = {"setting": setting, "steps": verifier.steps,
                                   "violations": sum(step["violations"] for step in verifier.steps)}
        print(f"certificate check: {results['verification']['violations']} violations; "
              + " ".join(f"{step['certified_fraction']:.2f}" for step in verifier.steps), flush=True)
    results["peak_memory_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
