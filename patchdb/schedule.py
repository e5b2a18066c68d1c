"""The paper's cosine noise schedule, its reverse-time grids and the deterministic DDIM update.

Time t runs from 0 (data) to 1 (noise). The forward process is
``x_t = sqrt(alpha_bar(t)) x_0 + sqrt(beta(t)) eps`` with ``beta = 1 - alpha_bar``.
"""

import math

import torch

from patchdb.errors import PatchdbError

COSINE_OFFSET = 1.008
"""The schedule's stretch: alpha_bar(t) = cos(t / 1.008 * pi / 2)^2 (the authors' "legacy" cosine)."""
MAX_STEPS = 10_000
"""The longest reverse grid taken: ten times a 1,000-step DDPM chain (the paper samples in 20)."""


def alpha_bar(t: float) -> float:
    """Signal fraction alpha_bar(t) in [0, 1] of the cosine schedule at time t in [0, 1]."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"time t must lie in [0, 1], got {t}")
    return math.cos(t / COSINE_OFFSET * math.pi / 2) ** 2


def beta(t: float) -> float:
    """Noise variance beta(t) = 1 - alpha_bar(t) of the cosine schedule."""
    return 1.0 - alpha_bar(t)


def alpha_bar_tensor(t: torch.Tensor) -> torch.Tensor:
    """alpha_bar for a tensor of times (used to noise training batches)."""
    return torch.cos(t / COSINE_OFFSET * math.pi / 2) ** 2


def machine_steps(num_steps: int) -> list[int]:
    """Step indices i of the machines' loop: n-1, ..., 1, each evaluated at t = i/n.

    The authors skip the step from t = 1 for the analytic machines (n-1 score calls for n steps).
    """
    _check_num_steps(num_steps)
    return list(range(num_steps - 1, 0, -1))


def full_steps(num_steps: int) -> list[int]:
    """Step indices i of the full loop: n, ..., 1 (t = 1, ..., 1/n), as trained networks sample."""
    _check_num_steps(num_steps)
    return list(range(num_steps, 0, -1))


def _check_num_steps(num_steps: int) -> None:
    if not 2 <= num_steps <= MAX_STEPS:
        raise PatchdbError(f"the sampler takes 2..{MAX_STEPS} steps (--steps), got {num_steps}")


def ddim_step(x: torch.Tensor, eps: torch.Tensor, t: float, t_prev: float) -> torch.Tensor:
    """One deterministic DDIM update of x (any shape) from t to t_prev < t given predicted noise eps."""
    ratio = math.sqrt(alpha_bar(t_prev) / alpha_bar(t))
    return ratio * x + (math.sqrt(beta(t_prev)) - ratio * math.sqrt(beta(t))) * eps


def score_to_eps(score: torch.Tensor, t: float) -> torch.Tensor:
    """Predicted noise eps = -sqrt(beta(t)) * score."""
    return -math.sqrt(beta(t)) * score


def eps_to_score(eps: torch.Tensor, t: float) -> torch.Tensor:
    """Score = -eps / sqrt(beta(t)), the inverse of score_to_eps (t > 0)."""
    return -eps / math.sqrt(beta(t))
