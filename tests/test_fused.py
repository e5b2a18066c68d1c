"""The exact backend's fused GPU method (patchdb.fused) against a direct float64 posterior.

On a CUDA GPU with Triton the kernel runs there; on a CPU with Triton installed it runs under Triton's
interpreter, in a subprocess (the interpreter is chosen when Triton is imported); without Triton the
kernel cannot run and the test is skipped.
"""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from patchdb import fused
from patchdb.engine import ExactBackend, PatchDictionary, SoftmaxAccumulator
from patchdb.errors import PatchdbError

REPO = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
GPU = torch.cuda.is_available() and HAS_TRITON


def direct_posterior(queries, keys, log_multiplicity, values, alpha_bar):
    """Softmax over -||q - sqrt(alpha_bar) k||^2 / (2 beta) + log m, float64, in one piece: (mean, argmax, max weight
    of one copy)."""
    logits = -torch.cdist(queries.double(), math.sqrt(alpha_bar) * keys.double()).square() / (2 * (1 - alpha_bar))
    weights = torch.softmax(logits + log_multiplicity.double(), dim=1)
    copy_weights = weights / log_multiplicity.double().exp()
    best_weight, best = copy_weights.max(dim=1)
    return weights @ values.double(), best, best_weight


CASES = {
    # name: (entries, queries, patch length, channels, keys, alpha_bar)
    "lattice keys, many splits": (3000, 200, 9, 1, "lattice", 0.5),
    "merged duplicates": (5000, 300, 4, 1, "few values", 0.9),
    "split keys, three channels": (2500, 130, 25, 3, "gaussian", 0.3),
    "late step, tiles skipped": (4000, 150, 9, 1, "lattice", 0.999),
    "whole images (the ideal machine)": (300, 20, 784, 1, "lattice", 0.9),
}


def check_fused_agrees(device: str) -> None:
    """Every case: the fused method's mean, dominant entry and its weight equal the direct posterior's."""
    generator = torch.Generator().manual_seed(0)
    for name, (num_entries, num_queries, dim, channels, kind, alpha_bar) in CASES.items():
        if kind == "gaussian":
            keys = torch.randn(num_entries, dim, generator=generator)
        else:
            levels = 3 if kind == "few values" else 256
            keys = torch.randint(0, levels, (num_entries, dim), generator=generator).float() / 127.5 - 1
        values = keys[:, :channels].clone()
        sources = torch.arange(num_entries)[:, None].expand(-1, 3).contiguous()
        dictionary = PatchDictionary.from_entries(keys.to(device), values.to(device), sources.to(device))
        assert dictionary.merged == (kind == "few values"), name
        picks = torch.randint(0, num_entries, (num_queries,), generator=generator)
        queries = (math.sqrt(alpha_bar) * keys[picks]
                   + math.sqrt(1 - alpha_bar) * torch.randn(num_queries, dim, generator=generator))
        float_keys = dictionary.keys.cpu()
        accumulator = SoftmaxAccumulator(num_queries, channels, torch.float32, torch.device(device))
        ExactBackend(method="fused").fold(accumulator, queries.to(device), dictionary, alpha_bar)
        assert isinstance(dictionary.keys, fused.FusedKeys) and dictionary.keys.split == (kind == "gaussian"), name
        assert len(dictionary) == num_entries if kind != "few values" else len(dictionary) < num_entries, name
        got = accumulator.summary()
        mean, best, best_weight = direct_posterior(queries, float_keys,
                                                   dictionary.log_multiplicity.cpu(), dictionary.values.cpu(), alpha_bar)
        assert torch.allclose(got.mean.cpu().double(), mean, atol=2e-5), name
        assert torch.equal(got.best_source[:, 0].cpu(), dictionary.sources[best.to(device), 0].cpu()), name
        assert torch.allclose(got.best_weight.cpu().double(), best_weight, atol=2e-5), name


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed: the fused kernel runs where it is (torch's CUDA builds)")
def test_fused_method_equals_the_direct_posterior():
    if GPU:
        check_fused_agrees("cuda")
        return
    environment = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    script = "import tests.test_fused as t; t.check_fused_agrees('cpu')"
    result = subprocess.run([sys.executable, "-c", script],
                            cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(GPU, reason="a CUDA GPU with Triton runs the fused method")
def test_fused_method_without_a_gpu_names_the_alternatives():
    keys = torch.randn(10, 4)
    dictionary = PatchDictionary.from_entries(keys, keys[:, :1], torch.zeros(10, 3, dtype=torch.int64))
    accumulator = SoftmaxAccumulator(2, 1, torch.float32, torch.device("cpu"))
    with pytest.raises(PatchdbError, match="CUDA GPU and Triton.*'products'"):
        ExactBackend(method="fused").fold(accumulator, torch.randn(2, 4), dictionary, 0.5)


def test_auto_method_fuses_only_on_a_gpu_in_float32():
    keys = torch.randn(10, 4)
    dictionary = PatchDictionary.from_entries(keys, keys[:, :1], torch.zeros(10, 3, dtype=torch.int64))
    assert not ExactBackend().fuses(torch.randn(2, 4), dictionary)
    if GPU:
        on_gpu = PatchDictionary.from_entries(keys.cuda(), keys[:, :1].cuda(),
                                              torch.zeros(10, 3, dtype=torch.int64, device="cuda"))
        assert ExactBackend().fuses(torch.randn(2, 4, device="cuda"), on_gpu)
        assert not ExactBackend().fuses(torch.randn(2, 4, device="cuda", dtype=torch.float64), on_gpu)
        assert not ExactBackend(method="products").fuses(torch.randn(2, 4, device="cuda"), on_gpu)


def test_lattice_keys_are_exact_in_float16():
    keys = torch.randint(0, 256, (50, 9)).float() / 127.5 - 1
    operand = fused.FusedKeys.from_keys(keys)
    assert not operand.split and operand.parts.shape == (50, 32)
    assert operand.scale == 1 / 255 and torch.equal(operand.parts[:, :9].float(), (keys * 255).round())
    assert not operand.parts[:, 9:].any()
    queries = torch.randn(7, 9)
    halves = operand.queries(queries)
    assert halves.shape == (2, 7, 32)
    assert torch.allclose(halves[0, :, :9].double() + halves[1, :, :9].double(), queries.double(),
                          rtol=2**-21, atol=2**-24)  # float16 subnormals: absolute 2^-25


@pytest.mark.parametrize("kind", ["lattice", "gaussian"])
def test_keys_convert_in_blocks_as_at_once(kind, monkeypatch):
    generator = torch.Generator().manual_seed(1)
    keys = (torch.randint(0, 256, (50, 9), generator=generator).float() / 127.5 - 1 if kind == "lattice"
            else torch.randn(50, 9, generator=generator))
    at_once = fused.FusedKeys.from_keys(keys)
    monkeypatch.setattr(fused, "KEY_BLOCK", 7)
    in_blocks = fused.FusedKeys.from_keys(keys)
    assert in_blocks.split == at_once.split == (kind == "gaussian")
    assert torch.equal(in_blocks.parts, at_once.parts)
    if kind == "gaussian":
        rebuilt = in_blocks.parts[:, :9].double() + in_blocks.parts[:, 9:18].double()
        assert torch.allclose(rebuilt, keys.double(), rtol=2**-21, atol=2**-24)
