"""Time the fused GPU kernel (patchdb.fused) alone, per patch size and configuration, against the matrix-product method.

The workload of one sampling step's interior dictionary group of boundary-broken ELS at 28x28: Q = batch x (29 - P)^2
query patches against images x (29 - P)^2 training patches (lattice keys, as 8-bit images give), at the noise level of
the paper's step for that scale. Prints one JSON line per patch size: seconds per call for every configuration (and
the one the tuner picks), pairs per second, tensor-core TFLOP/s, and the products method's seconds on the same data.

    python benchmarks/bench_fused.py time --images 6000 --batch 100
    python benchmarks/bench_fused.py workload --images 60000 --batch 100    # no GPU: what a whole run asks of it
"""

import json
import math
import sys
import time
from pathlib import Path

import click
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from patchdb import fused  # noqa: E402
from patchdb.engine import LOG2_E, NEGLIGIBLE_LOG_WEIGHT, ExactBackend, PatchDictionary, SoftmaxAccumulator  # noqa: E402
from patchdb.generate import device_name  # noqa: E402
from patchdb.schedule import alpha_bar  # noqa: E402

PAPER_STEPS = {17: 19, 15: 17, 13: 14, 11: 11, 9: 8, 7: 5, 5: 3, 3: 1}
"""The first of the paper's Fashion-MNIST ResNet steps (of 20) at each patch size."""


def seconds(call, repeats: int, device: torch.device) -> float:
    """Seconds per call, after one untimed call (compilation, caches)."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    call()
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    synchronize()
    return (time.perf_counter() - start) / repeats


@click.group()
def cli() -> None:
    """Time the fused kernel (time), or count a whole run's workload (workload)."""


@cli.command()
@click.option("--images", type=click.IntRange(1), default=60000, show_default=True)
@click.option("--batch", type=click.IntRange(1), default=100, show_default=True)
def workload(images, batch) -> None:
    """Per patch size of the paper's 20 steps: (query, patch) pairs of bbELS at 28x28 and the kernel's float16 TFLOP."""
    from patchdb.patches import dictionary_groups
    from patchdb.scales import parse_scales
    scales = parse_scales("paper:fashion-mnist-resnet-zeros-conditional", 20)[1:]  # the machine loop's steps 1..19
    total_pairs = total_flops = 0
    for patch_size in sorted(set(scales), reverse=True):
        groups = dictionary_groups("bbels", patch_size, 28, 28)
        # same-location groups: each pixel against its own location's patches only
        pairs = sum(len(group.query_pixels) * (1 if group.same_location else len(group.key_pixels))
                    for group in groups) * images * batch
        depth = math.ceil(patch_size**2 / fused._depth_block(patch_size**2)) * fused._depth_block(patch_size**2)
        steps = scales.count(patch_size)
        total_pairs, total_flops = total_pairs + steps * pairs, total_flops + steps * pairs * 4 * depth
        print(json.dumps({"patch_size": patch_size, "steps": steps, "pairs_per_step": pairs, "depth": depth,
                          "tflop_per_step": round(pairs * 4 * depth / 1e12, 1)}))
    print(json.dumps({"images": images, "batch": batch, "pairs": total_pairs, "tflop": round(total_flops / 1e12)}))


@cli.command("time")
@click.option("--images", type=click.IntRange(1), default=6000, show_default=True,
              help="Training images the dictionary is cut from (random 8-bit).")
@click.option("--batch", type=click.IntRange(1), default=100, show_default=True, help="Samples whose patches query it.")
@click.option("--patch-sizes", default="3,5,7,9,11,13,15,17", show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=2, show_default=True)
@click.option("--products/--no-products", default=True, show_default=True, help="Also time the matrix-product method.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="cpu: Triton's interpreter (TRITON_INTERPRET=1), to check this script with tiny sizes, not to time.")
def time_kernels(images, batch, patch_sizes, repeats, products, device) -> None:
    """One JSON line per patch size."""
    device = torch.device(device)
    if not fused.available(device):
        raise click.ClickException("the fused kernel needs a CUDA GPU and Triton (or TRITON_INTERPRET=1 with --device cpu)")
    generator = torch.Generator(device).manual_seed(0)
    for patch_size in map(int, patch_sizes.split(",")):
        positions = (29 - patch_size) ** 2
        dim = patch_size**2
        level = alpha_bar(PAPER_STEPS.get(patch_size, 10) / 20)
        keys = torch.randint(0, 256, (images * positions, dim), generator=generator, device=device).float() / 127.5 - 1
        dictionary = PatchDictionary.from_entries(keys, keys[:, dim // 2:dim // 2 + 1],
                                                  torch.zeros(keys.shape[0], 3, dtype=torch.int64, device=device),
                                                  merge_duplicates=False)
        picks = torch.randint(0, keys.shape[0], (batch * positions,), generator=generator, device=device)
        queries = (math.sqrt(level) * keys[picks]
                   + math.sqrt(1 - level) * torch.randn(picks.shape[0], dim, generator=generator, device=device))
        operand = fused.FusedKeys.from_keys(keys)
        depth = operand.parts.shape[1]
        scale = math.sqrt(level) * LOG2_E / (1 - level) * operand.scale
        norm_bias = ((-level * LOG2_E / (2 * (1 - level))) * dictionary.squared_norms).contiguous()
        zeros = torch.zeros_like(norm_bias)
        query_operand = operand.queries(queries)
        timings = {}
        for config in fused.CONFIGS:
            timings[str(config)] = seconds(lambda: fused._launch(query_operand, operand, norm_bias, zeros, dictionary.values,
                                                                 scale, -NEGLIGIBLE_LOG_WEIGHT * LOG2_E, config),
                                           repeats, device)
        tuned = fused._tuned_config(depth, 1, 0) if device.type == "cuda" else fused.CONFIGS[0]
        pairs = queries.shape[0] * keys.shape[0]
        best = min(timings.values())
        result = {"patch_size": patch_size, "alpha_bar": round(level, 4), "queries": queries.shape[0], "entries": keys.shape[0],
                  "depth": depth, "seconds": timings, "tuned": str(tuned), "tuned_seconds": timings[str(tuned)],
                  "pairs_per_second": pairs / best, "tensor_tflops": 2 * 2 * depth * pairs / best / 1e12,
                  "device": device_name(device.type)}
        if products:
            def run_products():
                accumulator = SoftmaxAccumulator(queries.shape[0], 1, torch.float32, queries.device)
                ExactBackend(method="products", block_pruning=False).fold(accumulator, queries, dictionary, level)
            result["products_seconds"] = seconds(run_products, 1, device)
            result["fused_speedup"] = result["products_seconds"] / best
        print(json.dumps(result), flush=True)
        del keys, dictionary, operand, query_operand, queries


if __name__ == "__main__":
    cli()
