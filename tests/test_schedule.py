"""The cosine schedule, the DDIM update, the two step grids and the sampler's scale convention."""

import math

import pytest
import torch

from conftest import noisy_batch, tiny_dataset
from patchdb.errors import PatchdbError
from patchdb.machines import make_machine
from patchdb.sampler import sample_ddim
from patchdb.schedule import alpha_bar, beta, ddim_step, eps_to_score, full_steps, machine_steps, score_to_eps


def test_cosine_schedule_runs_from_data_to_noise():
    assert alpha_bar(0.0) == 1.0 and beta(0.0) == 0.0
    times = [i / 200 for i in range(201)]
    values = [alpha_bar(t) for t in times]
    assert all(later < earlier for earlier, later in zip(values, values[1:]))
    assert 0 < alpha_bar(1.0) < 1e-3  # the 1.008 stretch keeps a little signal at t = 1
    for t in (0.05, 0.5, 0.95):  # paper-facts.md: alpha_bar = cos(t / 1.008 * pi / 2)^2
        assert alpha_bar(t) == pytest.approx(math.cos(t / 1.008 * math.pi / 2) ** 2, abs=1e-15)
        assert beta(t) == pytest.approx(1 - alpha_bar(t), abs=1e-15)
    for t in (-0.01, 1.01):
        with pytest.raises(ValueError):
            alpha_bar(t)


def test_ddim_step_with_the_true_noise_lands_on_the_forward_process():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 1, 4, 4, generator=generator, dtype=torch.float64)
    eps = torch.randn(3, 1, 4, 4, generator=generator, dtype=torch.float64)
    for t, t_prev in ((1.0, 0.95), (0.5, 0.45), (0.05, 0.0)):
        x_t = math.sqrt(alpha_bar(t)) * x0 + math.sqrt(beta(t)) * eps
        expected = math.sqrt(alpha_bar(t_prev)) * x0 + math.sqrt(beta(t_prev)) * eps
        torch.testing.assert_close(ddim_step(x_t, eps, t, t_prev), expected, rtol=0, atol=1e-12)


def test_score_and_noise_convert_both_ways():
    score = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for t in (0.05, 0.5, 1.0):
        eps = score_to_eps(score, t)
        torch.testing.assert_close(eps, -math.sqrt(beta(t)) * score)
        torch.testing.assert_close(eps_to_score(eps, t), score, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name, patch_size", [("is", None), ("bbels", 3), ("els", 5)])
def test_last_step_lands_on_the_posterior_mean(name, patch_size):
    """From t = 1/n to 0 with the machine's eps, DDIM returns the machine's x_0 estimate exactly."""
    dataset = tiny_dataset(labelled=False, side=6)
    machine = make_machine(name, dataset, dtype=torch.float64)
    num_steps = 20
    t = 1 / num_steps
    x = noisy_batch(dataset, t, seed=2)
    step = ddim_step(x, score_to_eps(machine(x, t, patch_size=patch_size), t), t, 0.0)
    torch.testing.assert_close(step, machine.posterior(x, t, patch_size=patch_size).mean, rtol=0, atol=1e-10)


def test_step_grids():
    assert machine_steps(20) == list(range(19, 0, -1))
    assert full_steps(20) == list(range(20, 0, -1))
    assert machine_steps(2) == [1] and full_steps(2) == [2, 1]
    for bad in (1, 0):
        with pytest.raises(PatchdbError, match="the sampler takes 2..10000 steps"):
            machine_steps(bad)
        with pytest.raises(PatchdbError, match="the sampler takes 2..10000 steps"):
            full_steps(bad)


def test_sampler_reads_scale_i_at_t_equal_i_over_n():
    """Convention (patchdb.scales): entry i at t = i/n; the full loop's t = 1 step uses entry n-1."""
    num_steps = 5
    scales = [1, 3, 5, 7, 9]
    calls = []

    def recording_model(x, t, labels=None, patch_size=None):
        calls.append((t, patch_size, labels))
        return torch.zeros_like(x)

    labels = torch.tensor([4])
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    seen = []
    out = sample_ddim(recording_model, x, machine_steps(num_steps), num_steps, scales, labels=labels,
                      callback=lambda info: seen.append((info["i"], info["t"], info["patch_size"])), disable=True)
    assert [(t, size) for t, size, _ in calls] == [(0.8, 9), (0.6, 7), (0.4, 5), (0.2, 3)]
    assert all(passed is labels for _, _, passed in calls)
    assert seen == [(4, 0.8, 9), (3, 0.6, 7), (2, 0.4, 5), (1, 0.2, 3)]
    # a zero score is eps = 0: DDIM then only rescales, x_0 = x_t / sqrt(alpha_bar(0.8))
    torch.testing.assert_close(out, x / math.sqrt(alpha_bar(0.8)), rtol=0, atol=1e-12)
    calls.clear()
    sample_ddim(recording_model, x, full_steps(num_steps), num_steps, scales, disable=True)
    assert [(t, size) for t, size, _ in calls] == [(1.0, 9), (0.8, 9), (0.6, 7), (0.4, 5), (0.2, 3)]
    calls.clear()
    sample_ddim(recording_model, x, full_steps(num_steps), num_steps, disable=True)
    assert [size for _, size, _ in calls] == [None] * num_steps
