"""The reverse-process sampler shared by machines and trained networks.

A score model is any callable ``model(x, t, labels=None, patch_size=None) -> score`` on batches
x of shape (B, C, H, W) at time t in (0, 1], returning a score of x's shape, dtype and device
(whatever device the model computes on); machines use patch_size, networks ignore it.
"""

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from patchdb.scales import scale_at
from patchdb.schedule import ddim_step, score_to_eps

ScoreModel = Callable[..., torch.Tensor]


@torch.no_grad()
def sample_ddim(
    model: ScoreModel,
    x: torch.Tensor,
    steps: list[int],
    num_steps: int,
    scales: list[int] | None = None,
    labels: torch.Tensor | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool = False,
) -> torch.Tensor:
    """Deterministic DDIM (Song et al., 2021) on the cosine schedule, from noise x (B, C, H, W).

    steps: the step indices i to run, in order (schedule.machine_steps or schedule.full_steps);
    step i evaluates the model at t = i/n and moves x to t = (i-1)/n. scales: the patch size
    schedule (entry i used at t = i/n, the t = 1 step uses entry n-1). callback receives
    {'i', 't', 'x', 'score', 'patch_size'} after each model call.
    """
    for i in tqdm(steps, desc="sampling", unit="step", disable=disable):
        t, t_prev = i / num_steps, (i - 1) / num_steps
        patch_size = None if scales is None else scale_at(scales, i, num_steps)
        score = model(x, t, labels=labels, patch_size=patch_size)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "score": score, "patch_size": patch_size})
        x = ddim_step(x, score_to_eps(score, t), t, t_prev)
    return x
