"""``patchdb sample``: draw images from an analytic machine, with their patch provenance."""

import click
from click.core import ParameterSource

from cli.options import (DATA_DIR, DATASET, DEVICE, MEMORY_BUDGET, OUTPUT_FOLDER, SAMPLE_COUNTS, SEEDS, STEPS, PatchSize,
                         ScaleSpec, TopK, UserPath, finite)
from patchdb.data import MAX_CLASSES
from patchdb.engine import EXACT_METHODS
from patchdb.generate import DEFAULT_NUM, DEFAULT_SCALES, DTYPES, LOOPS, SampleConfig, run_sample
from patchdb.machines import MACHINES
from patchdb.scales import SCALE_SPEC_HELP
from patchdb.topk import (AUTO_TOPK_CLUSTERS, AUTO_TOPK_DIMENSION, DEEPENING_FACTOR, DEEPENING_ROUNDS, DEFAULT_ESTIMATE_ERROR,
                          DEFAULT_ESTIMATE_SAMPLES, DEFAULT_FALLBACK, DEFAULT_TOL, FALLBACKS, MAX_ESTIMATE_SAMPLES,
                          MIN_AUTO_TOPK)


@click.command("sample")
@DATASET
@DATA_DIR
@click.option("--machine", type=click.Choice(MACHINES), default="bbels",
              help="is: ideal, es: equivariant, ls: local, els: equivariant local, bbels: boundary-broken ELS.")
@click.option("--scales", type=ScaleSpec(), default=DEFAULT_SCALES, help=f"Patch size per step: {SCALE_SPEC_HELP}.")
@click.option("--steps", type=STEPS, default=20, help="Sampling steps n (the schedule's length).")
@click.option("--num", type=SAMPLE_COUNTS, default=None,
              show_default=f"{DEFAULT_NUM}, or the N of --noise", help="Number of samples N.")
@click.option("--seed", type=SEEDS, default=0,
              help="Sample k's noise (and --conditional label) come from seed + k: regenerate it alone with --seed S+k --num 1.")
@click.option("--label", type=click.IntRange(min=0, max=MAX_CLASSES - 1), default=None,
              help="Class of every sample (only that class's training images are used).")
@click.option("--conditional", is_flag=True, help="Draw one class per sample from its seed (excludes --label).")
@click.option("--noise", type=UserPath(dir_okay=False), default=None,
              help="An (N, C, H, W) float .npy used as the starting noise instead of drawing it from --seed.")
@click.option("--loop", type=click.Choice(tuple(LOOPS)), default="machine",
              help="machine: t = (n-1)/n ... 1/n, as the authors ran the machines; full: t = 1 ... 1/n.")
@click.option("--device", type=DEVICE, default="cpu", help="torch device.")
@click.option("--dtype", type=click.Choice(tuple(DTYPES)), default="float32", help="Floating-point precision of the machine.")
@MEMORY_BUDGET
@click.option("--exact-method", type=click.Choice(EXACT_METHODS), default="auto", show_default=True,
              help="How the exact backend scores the patch machines (with --index: the dictionaries too small to index, "
                   "by products or fused; windows only with --exact-from-patch-size): "
                   "windows (sliding-window correlations, compiled, CPU), "
                   "products (matrix products of patches, any device), fused (product and softmax in one kernel: CUDA, Triton), "
                   "auto (windows on a CPU, fused on a GPU in float32, else products). The same posterior.")
@click.option("--index", type=UserPath(file_okay=False), default=None,
              help="A patch store from `patchdb build-index`: use the top-k backend on its dictionaries (default: exact).")
@click.option("--topk", type=TopK(), default="auto", show_default=True,
              help="With --index: most dictionary entries (1<=N<=2^40) a pixel scores exactly before it falls back; auto: "
                   f"{AUTO_TOPK_CLUSTERS} mean clusters' worth of each dictionary, at least {MIN_AUTO_TOPK}, at patches of "
                   f"{AUTO_TOPK_DIMENSION} numbers (11x11, one channel), in inverse proportion to the patches' numbers "
                   "at other sizes (a budget of multiply-adds).")
@click.option("--tol", type=click.FloatRange(min=0, max=1, max_open=True), callback=finite, default=DEFAULT_TOL,
              help="With --index: certified bound on the posterior mass a pixel may neglect.")
@click.option("--fallback", type=click.Choice(FALLBACKS), default=DEFAULT_FALLBACK,
              help="With --index, for pixels the certificate does not cover: estimate (nearest clusters + reweighted uniform "
                   "sample of the rest; more clusters where its standard error exceeds --estimate-error), auto (as estimate, "
                   "then exact where the error still exceeds it), exact, none (truncated softmax).")
@click.option("--estimate-samples", type=click.IntRange(min=1, max=MAX_ESTIMATE_SAMPLES), default=DEFAULT_ESTIMATE_SAMPLES,
              help="With --index and --fallback estimate|auto: patches in the estimator's uniform sample of the dictionary.")
@click.option("--estimate-error", type=click.FloatRange(min=0, min_open=True), callback=finite, default=DEFAULT_ESTIMATE_ERROR,
              help="With --index and --fallback estimate|auto: largest standard error (pixel units, images in [-1, 1]) of "
                   "an estimated posterior mean "
                   f"before the pixel visits more clusters ({DEEPENING_FACTOR} times as many entries, "
                   f"at most {DEEPENING_ROUNDS} times).")
@click.option("--exact-from-patch-size", type=PatchSize(), default=None,
              help="With --index: leave the steps at this (odd) patch size and larger to the exact backend's sliding "
                   "windows (--device cpu, --exact-method auto or windows), where the posterior is broad and scoring "
                   "the nearest clusters costs more (default: none).")
@click.option("--out", type=OUTPUT_FOLDER, required=True,
              help="Output folder: samples.npy, noise.npy, [labels.npy], provenance.npz, grid.png, provenance.png, run.json, "
                   "[paths.npy].")
def sample(dataset, data_dir, machine, scales, steps, num, seed, label, conditional, noise, loop, device, dtype,
           memory_gb, exact_method, index, topk, tol, fallback, estimate_samples, estimate_error, exact_from_patch_size,
           out) -> None:
    """Sample N images from an analytic score machine with the deterministic DDIM sampler into OUT."""
    context = click.get_current_context()
    given = {name for name in context.params if context.get_parameter_source(name) is ParameterSource.COMMANDLINE}
    config = SampleConfig(
        out=str(out), dataset=dataset, data_dir=None if data_dir is None else str(data_dir), machine=machine,
        scales=scales, steps=steps, num=num, seed=seed, label=label, conditional=conditional,
        noise=None if noise is None else str(noise), loop=loop, device=device, dtype=dtype,
        memory_budget_gib=memory_gb, index=None if index is None else str(index), topk=topk, tol=tol,
        fallback=fallback, estimate_samples=estimate_samples, estimate_error=estimate_error, exact_method=exact_method,
        exact_from_patch_size=exact_from_patch_size)
    record = run_sample(config, given=given)
    click.echo(f"{record['num_samples']} samples, {len(record['seconds_per_step'])} steps of {machine} "
               f"on {record['data']['name']} ({record['data']['num_images']} images) in {record['total_seconds']:.1f} s -> {out}")
