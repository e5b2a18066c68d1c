"""How broad is each pixel's posterior along a real bbELS trajectory, and how much would cluster bounds prune?

For the interior dictionary of every step (first 1,000 Fashion-MNIST training images, unconditional,
paper Fashion-MNIST ResNet scales, seed 0), prints
- oracle_frac: the fraction of (pixel, entry) pairs whose logit lies within 30 of the pixel's maximum
  (what any exact pruning must still compute), and
- cluster_active_keyfrac: the fraction of entries in k-means clusters (about 512 entries each) whose
  triangle-inequality bound max(0, ||q - s c|| - s r) cannot rule them out at that margin.

    python benchmarks/posterior_breadth.py
"""

import math
import sys
from pathlib import Path

import faiss
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from patchdb.data import load_dataset  # noqa: E402
from patchdb.machines import make_machine  # noqa: E402
from patchdb.patches import dictionary_groups, extract_patches  # noqa: E402
from patchdb.scales import parse_scales  # noqa: E402
from patchdb.schedule import alpha_bar, ddim_step, machine_steps, score_to_eps  # noqa: E402

MARGIN = 30.0


def main() -> None:
    dataset = load_dataset("fashion-mnist:train:1000", REPO.parent / "shared" / "data")
    machine = make_machine("bbels", dataset)
    scales = parse_scales("paper:fashion-mnist-resnet-zeros-conditional", 20)
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    for i in machine_steps(20):
        t, patch_size = i / 20, scales[i]
        signal, noise_variance = math.sqrt(alpha_bar(t)), 1 - alpha_bar(t)
        interior = dictionary_groups("bbels", patch_size, 32, 32)[0]
        queries = extract_patches(x, patch_size, "zeros", interior.query_pixels)[0]
        keys = extract_patches(dataset.images, patch_size, "zeros", interior.key_pixels).flatten(0, 1)
        logits = -torch.cdist(queries, signal * keys).square() / (2 * noise_variance)
        maxima = logits.max(dim=1, keepdim=True).values
        oracle = (logits >= maxima - MARGIN).float().mean().item()
        num_clusters = max(16, keys.shape[0] // 512)
        kmeans = faiss.Kmeans(keys.shape[1], num_clusters, niter=8, seed=1, max_points_per_centroid=64)
        kmeans.train(keys.numpy())
        assignment = torch.from_numpy(kmeans.index.search(keys.numpy(), 1)[1][:, 0])
        centroids = torch.from_numpy(kmeans.centroids)
        radii = torch.zeros(num_clusters).scatter_reduce(0, assignment, (keys - centroids[assignment]).norm(dim=1), reduce="amax")
        counts = torch.bincount(assignment, minlength=num_clusters).float()
        bound = (-(torch.cdist(queries, signal * centroids) - signal * radii).clamp_min(0).square() / (2 * noise_variance)
                 + counts.log())
        active = bound >= maxima - MARGIN - math.log(num_clusters)
        key_fraction = ((active.float() * counts).sum(dim=1) / counts.sum()).mean().item()
        print(f"i={i} t={t:.2f} P={patch_size} entries={keys.shape[0]} oracle_frac={oracle:.4f} "
              f"cluster_active_keyfrac={key_fraction:.4f}", flush=True)
        x = ddim_step(x, score_to_eps(machine(x, t, patch_size=patch_size), t), t, (i - 1) / 20)


if __name__ == "__main__":
    main()
