"""The linear Gaussian (Wiener) baseline: the exact score of a Gaussian fitted to the training images.

If the training images have mean mu and covariance Sigma (over all D = C*H*W pixels), the noised
data x_t = sqrt(alpha_bar) x_0 + sqrt(beta) eps of a Gaussian N(mu, Sigma) is distributed as
N(sqrt(alpha_bar) mu, alpha_bar Sigma + beta I), whose score is

    s(x) = -(alpha_bar Sigma + beta I)^{-1} (x - sqrt(alpha_bar) mu).

Its denoiser (x + beta s) / sqrt(alpha_bar) is the Wiener filter: the best linear denoiser. With
Sigma = U diag(lambda) U^T computed once in float64, each call costs two (B, D) x (D, D) products.
"""

import math

import torch

from patchdb.data import Dataset, label_groups
from patchdb.errors import PatchdbError
from patchdb.schedule import alpha_bar


class GaussianScore:
    """Score model of the Gaussian fit: ``model(x (B,C,H,W), t, labels=None, patch_size=None) -> score``.

    With labels, each sample uses the mean and covariance of its own class's training images.
    patch_size is accepted and ignored (the model is global). The covariance is the maximum-
    likelihood one (divided by N); it may be singular (N <= D), which is harmless for beta > 0.
    """

    name = "gaussian"

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.image_shape = tuple(dataset.images.shape[1:])
        self._fits: dict[int | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def fit(self, label: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean (D,), eigenvalues (D,), eigenvectors (D, D)) in float64 of the class's (or all) images."""
        if label not in self._fits:
            images = self.dataset.images if label is None else self.dataset.images[self.dataset.indices_of_label(label)]
            flat = images.reshape(images.shape[0], -1).to(torch.float64)
            mean = flat.mean(0)
            centred = flat - mean
            covariance = centred.T @ centred / flat.shape[0]
            eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
            self._fits[label] = (mean, eigenvalues.clamp_min(0.0), eigenvectors)
        return self._fits[label]

    def __call__(self, x: torch.Tensor, t: float, labels: torch.Tensor | None = None,
                 patch_size: int | None = None) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise PatchdbError(f"the noisy batch has shape {tuple(x.shape)}; "
                               f"the Gaussian model needs (B, {', '.join(map(str, self.image_shape))})")
        if not 0.0 < t <= 1.0:
            raise PatchdbError(f"time t must lie in (0, 1], got {t}")
        signal = alpha_bar(t)
        flat = x.reshape(x.shape[0], -1).to(torch.float64).cpu()
        score = torch.empty_like(flat)
        for label, members in label_groups(labels, x.shape[0]):
            mean, eigenvalues, eigenvectors = self.fit(label)
            coefficients = (flat[members] - math.sqrt(signal) * mean) @ eigenvectors
            score[members] = -(coefficients / (signal * eigenvalues + (1.0 - signal))) @ eigenvectors.T
        return score.reshape(x.shape).to(x.device, x.dtype)
