"""The index backend: cluster bounds, the certified top-k softmax and its fallbacks, duplicate merging in blocks."""

import functools
import math

import pytest
import torch

from patchdb.engine import ExactBackend, PatchDictionary, SoftmaxAccumulator
from patchdb.index import clustered
import patchdb.index
import patchdb.topk
from patchdb.topk import FALLBACKS, PATHS, TopKBackend

from conftest import quantised_images

pytestmark = pytest.mark.usefixtures("single_thread")


def patch_dictionary(num_images: int = 40, patch_size: int = 3, seed: int = 0) -> PatchDictionary:
    """Every 3x3 patch of quantised 12x12 images, duplicates merged, float64 (about 2,000 distinct entries).

    The images are random rectangles of pixels from a few grey levels, so that patches gather in
    clusters (as real ones do) as well as repeat.
    """
    images = quantised_images(seed, num_images, 12).double()
    images = torch.where(images > -1, (images * 2).round() / 2, images)  # grey levels -1, -0.5, 0, 0.5, 1
    generator = torch.Generator().manual_seed(seed)
    images = images + 0.02 * torch.rand(images.shape, generator=generator, dtype=torch.float64) * (images > -1)
    patches = torch.nn.functional.unfold(images, patch_size, padding=patch_size // 2)  # (N, D, H*W)
    keys = patches.transpose(1, 2).reshape(-1, patch_size**2)
    index = torch.arange(len(keys))
    sources = torch.stack([index // 144, (index % 144) // 12, index % 12], 1)
    return PatchDictionary.from_entries(keys, keys[:, 4:5], sources)


def noisy_queries(dictionary: PatchDictionary, alpha_bar: float, count: int = 64, seed: int = 1) -> torch.Tensor:
    """Forward-noised copies of random dictionary keys (Q, D), float64."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(dictionary), (count,), generator=generator)
    noise = torch.randn(count, dictionary.keys.shape[1], generator=generator, dtype=torch.float64)
    return math.sqrt(alpha_bar) * dictionary.keys[picks] + math.sqrt(1 - alpha_bar) * noise


def exact_mean(queries, dictionary, alpha_bar) -> torch.Tensor:
    return ExactBackend().summarize(queries, [dictionary], alpha_bar).mean


def topk_fold(backend: TopKBackend, queries, dictionary, alpha_bar):
    accumulator = SoftmaxAccumulator(queries.shape[0], dictionary.entries.values.shape[1], queries.dtype, queries.device)
    path = backend.fold(accumulator, queries, dictionary, alpha_bar)
    return accumulator.summary().mean, path


@pytest.fixture(scope="module")
def dictionary():
    return patch_dictionary()


@pytest.fixture(scope="module")
def indexed(dictionary):
    return clustered(dictionary, cluster_size=32)


@pytest.mark.parametrize("alpha_bar", [0.3, 0.9, 0.99])
def test_cluster_mass_bounds_hold_for_every_cluster(indexed, alpha_bar):
    queries = noisy_queries(indexed.entries, alpha_bar)
    entries, clusters = indexed.entries, indexed.clusters
    _, mass_bounds = clusters.search(queries, alpha_bar)
    signal, noise_variance = math.sqrt(alpha_bar), 1 - alpha_bar
    logits = ((signal * queries @ entries.keys.T - alpha_bar / 2 * entries.squared_norms) / noise_variance
              + entries.log_multiplicity)
    member = torch.repeat_interleave(torch.arange(len(clusters)), clusters.sizes)
    true_mass = torch.full((queries.shape[0], len(clusters)), -math.inf, dtype=torch.float64)
    for cluster in range(len(clusters)):
        true_mass[:, cluster] = logits[:, member == cluster].logsumexp(dim=1)
    assert (mass_bounds >= true_mass - 1e-9).all()
    assert len(clusters) > 20  # the bounds were tested on many clusters


def test_summed_masses_bound_the_exact_sums_from_above():
    generator = torch.Generator().manual_seed(0)
    # rows that float32 sums get wrong: a few large terms among many that each round away against them
    spread = torch.exp2(-40 * torch.rand(64, 5000, generator=generator))
    spikes = torch.full((64, 5000), 2.0**-25)
    spikes[:, ::997] = 1.0
    for masses in (spread, spikes):
        exact = masses.double().sum(dim=1)
        bound = patchdb.topk._summed_masses(masses)
        assert (bound >= exact).all()
        assert (bound <= exact * (1 + 5000 * 2.0**-22)).all()  # and within the rounding bound's own width


@pytest.mark.parametrize("merged_at", [[], [0], [5, 6, 19], [0, 3, 4, 10, 19]])
def test_patch_counts_number_the_patches_as_the_cumulative_counts_do(merged_at, monkeypatch):
    """Held by the merged entries alone (read in blocks of 4 here, so merged entries fall at blocks' edges), the
    numbering of the patches gives every entry's cumulative count, the entry of every patch number and each
    cluster's patches as the dense cumulative counts of all entries do."""
    monkeypatch.setattr(patchdb.index, "COUNT_BLOCK", 4)
    multiplicity = torch.ones(20, dtype=torch.int32)
    multiplicity[merged_at] = torch.tensor([3, 2, 7, 4, 2][:len(merged_at)], dtype=torch.int32)
    counts = patchdb.index.PatchCounts.from_multiplicity(multiplicity.numpy())
    cumulative = multiplicity.long().cumsum(0)
    assert counts.merged == bool(merged_at) and counts.total == int(cumulative[-1])
    assert torch.equal(counts.through(torch.arange(-1, 20)), torch.cat([torch.zeros(1).long(), cumulative]))
    patches = torch.arange(counts.total)
    assert torch.equal(counts.entries_of(patches), torch.searchsorted(cumulative, patches, right=True))
    offsets = torch.tensor([0, 1, 6, 7, 20])
    assert torch.equal(counts.cluster_patches(offsets),
                       torch.stack([part.sum() for part in multiplicity.long().split(offsets.diff().tolist())]))


def test_clustering_keeps_every_entry_once(dictionary, indexed):
    assert torch.equal(indexed.clusters.offsets[-1], torch.tensor(len(dictionary)))
    assert sorted(map(tuple, indexed.entries.sources.tolist())) == sorted(map(tuple, dictionary.sources.tolist()))
    assert torch.allclose(indexed.clusters.log_mass.exp().sum(), dictionary.log_multiplicity.exp().sum())


@pytest.mark.parametrize("fallback", ["exact", "auto", "estimate", "none"])
@pytest.mark.parametrize("alpha_bar, tol", [(0.6, 0.0), (0.99, 1e-2)])
def test_topk_with_room_for_everything_is_exact_at_any_tolerance(dictionary, indexed, fallback, alpha_bar, tol):
    """K >= the dictionary's entries leaves nothing to truncate: no prefix is certified in place of the whole."""
    queries = noisy_queries(dictionary, alpha_bar)
    backend = TopKBackend(topk=len(dictionary), tol=tol, fallback=fallback)
    mean, path = topk_fold(backend, queries, indexed, alpha_bar)
    assert (path == PATHS.index("exact")).all() and backend.take_report()["paths"]["exact"] == len(queries)
    assert torch.allclose(mean, exact_mean(queries, dictionary, alpha_bar), atol=1e-10)


@pytest.mark.parametrize("alpha_bar, tol", [(0.98, 1e-1), (0.99, 1e-2), (0.995, 1e-3), (0.999, 1e-4)])
def test_certified_pixels_are_within_tol_times_the_spread(dictionary, indexed, alpha_bar, tol):
    queries = noisy_queries(dictionary, alpha_bar, count=128)
    backend = TopKBackend(topk=len(dictionary) // 4, tol=tol, fallback="none")
    mean, path = topk_fold(backend, queries, indexed, alpha_bar)
    certified = path == PATHS.index("certified")
    assert 0 < int(certified.sum()) < len(path)  # both certified and uncertified pixels occur
    spread = dictionary.values.max() - dictionary.values.min()
    error = (mean - exact_mean(queries, dictionary, alpha_bar)).abs()[certified]
    assert error.max() <= tol * spread
    report = backend.take_report()
    assert report["paths"]["certified"] == int(certified.sum())
    assert report["entries_scored"] < len(path) * len(dictionary)  # the certificate saved work


@pytest.mark.parametrize("fallback", ["none", "estimate"])
def test_pixels_certified_once_their_clusters_are_scored_are_within_tol_times_the_spread(dictionary, indexed, fallback,
                                                                                      monkeypatch):
    """The medoids' bound leaves these pixels uncertified; their scored clusters' exact normaliser certifies them."""
    alpha_bar, tol = 0.99, 1e-2
    queries = noisy_queries(dictionary, alpha_bar, count=128)
    late = []
    real = TopKBackend._certify_scored

    def recording(self, accumulator, queries, clusters, alpha_bar, plan, rows):
        left = real(self, accumulator, queries, clusters, alpha_bar, plan, rows)
        certified = rows[~torch.isin(rows, left)]
        late.append((certified, plan.visit[certified].clone()))
        return left

    monkeypatch.setattr(TopKBackend, "_certify_scored", recording)
    mean, path = topk_fold(TopKBackend(topk=len(dictionary) // 4, tol=tol, fallback=fallback), queries, indexed, alpha_bar)
    (late, visited), = late
    assert late.numel() > 0 and (path[late] == PATHS.index("certified")).all()
    spread = dictionary.values.max() - dictionary.values.min()
    assert (mean - exact_mean(queries, dictionary, alpha_bar)).abs()[late].max() <= tol * spread
    # the certificate's own claim: the exact posterior mass outside the scored clusters is at most tol
    entries, offsets = indexed.entries, indexed.clusters.offsets
    logits = (-(queries[late, None, :] - math.sqrt(alpha_bar) * entries.keys).square().sum(-1) / (2 * (1 - alpha_bar))
              + entries.log_multiplicity)
    cluster = torch.searchsorted(offsets, torch.arange(len(entries.keys)), right=True) - 1
    neglected = (logits.softmax(dim=1) * ~visited[:, cluster]).sum(dim=1)
    assert neglected.max() <= tol


@pytest.mark.parametrize("fallback", ["none", "estimate"])
def test_the_certificate_holds_where_a_wide_cluster_around_the_query_has_a_loose_bound(fallback):
    """A sphere of radius 5 around q (its bound: a member at q itself, 112 nats above its true mass) beside 20 tight
    clusters just outside it that hold most of the posterior. Relative to the largest bound, float32 rounded their
    masses to 0 and certified q with the sphere alone."""
    from patchdb.index import ClusteredDictionary, EntryClusters

    generator = torch.Generator().manual_seed(0)
    dimension, radius, alpha_bar = 16, 5.0, 0.9
    directions = torch.nn.functional.normalize(torch.randn(64, dimension, generator=generator), dim=1)
    sphere = torch.cat([radius * directions, -radius * directions])  # its mean is exactly 0, where q is
    centres = torch.nn.functional.normalize(torch.randn(20, dimension, generator=generator), dim=1) * (radius + 0.05)
    tight = centres.repeat_interleave(8, 0) + 1e-3 * torch.randn(160, dimension, generator=generator)
    keys = torch.cat([sphere, tight])  # float32, as a store holds them
    offsets = torch.tensor([0, 128] + [136 + 8 * cluster for cluster in range(20)])
    members = [keys[start:end] for start, end in zip(offsets[:-1], offsets[1:])]
    centroids = torch.stack([part.mean(0) for part in members])
    radii = torch.stack([(part - centre).norm(dim=1).max() for part, centre in zip(members, centroids)])
    values = torch.cat([torch.full((128, 1), -1.0), torch.full((160, 1), 1.0)])
    sources = torch.stack([torch.arange(len(keys)), torch.zeros(len(keys)).long(), torch.zeros(len(keys)).long()], 1)
    flat = PatchDictionary(keys, values, keys.square().sum(1), torch.zeros(len(keys)), sources, False)
    indexed = ClusteredDictionary(flat, EntryClusters(offsets, centroids, radii, offsets.diff().float().log(),
                                                      offsets[:-1].clone()))
    query = torch.zeros(1, dimension)
    tol = 1e-2
    mean, path = topk_fold(TopKBackend(topk=len(keys) - 1, tol=tol, fallback=fallback, scoring="runs"), query, indexed,
                           alpha_bar)
    exact = exact_mean(query, flat, alpha_bar)
    assert -0.9 < float(exact) < -0.6  # the tight clusters hold a real share of the posterior
    assert path[0] == PATHS.index("certified") and (mean - exact).abs().max() <= tol * 2


@pytest.mark.parametrize("nearest, certifiable", [(0.1, False), (1.0, True)])
def test_the_certificate_after_scoring_holds_where_an_unvisited_bound_overflows_float32(nearest, certifiable):
    """Both medoids lie far from q, so the plan's shift lies some 1,200 nats below the bounds near q: the unvisited
    cluster's float32 mass overflows to inf, and so did the tolerance it was compared with once the visited cluster's
    member at q was scored (inf <= inf certified q). In log space its bound certifies q where its nearest member is
    far (1.0: e^-49 of the normaliser), and not where it holds a real share of the posterior (0.1: e^-0.5)."""
    from patchdb.index import ClusteredDictionary, EntryClusters

    generator = torch.Generator().manual_seed(0)
    dimension, radius, alpha_bar, tol = 16, 5.0, 0.99, 1e-2
    directions = torch.nn.functional.normalize(torch.randn(64, dimension, generator=generator), dim=1)
    sphere = torch.cat([radius * directions, -radius * directions])
    axis = directions[0]
    centre = (nearest + radius) * axis  # the other cluster: a sphere beyond q whose member nearest q lies at nearest
    visited = torch.cat([sphere, torch.zeros(1, dimension)])  # its medoid (first entry) 5 from q, a member at q
    unvisited = torch.cat([(centre + radius * axis)[None], centre + sphere, (nearest * axis)[None]])
    keys = torch.cat([visited, unvisited])  # float32, as a store holds them
    offsets = torch.tensor([0, len(visited), len(keys)])
    members = [visited, unvisited]
    centroids = torch.stack([part.mean(0) for part in members])
    radii = torch.stack([(part - centroid).norm(dim=1).max() for part, centroid in zip(members, centroids)])
    values = torch.cat([torch.full((len(visited), 1), -1.0), torch.full((len(unvisited), 1), 1.0)])
    sources = torch.stack([torch.arange(len(keys)), torch.zeros(len(keys)).long(), torch.zeros(len(keys)).long()], 1)
    flat = PatchDictionary(keys, values, keys.square().sum(1), torch.zeros(len(keys)), sources, False)
    indexed = ClusteredDictionary(flat, EntryClusters(offsets, centroids, radii, offsets.diff().float().log(),
                                                      offsets[:-1].clone()))
    query = torch.zeros(1, dimension)
    mean, path = topk_fold(TopKBackend(topk=len(visited), tol=tol, fallback="none", scoring="runs"), query, indexed,
                           alpha_bar)
    error = float((mean - exact_mean(query, flat, alpha_bar)).abs().max())
    assert (path[0] == PATHS.index("certified")) == certifiable
    assert error <= tol * 2 if certifiable else error > 0.5  # the truncation it refused to certify is far off

def test_the_certificate_near_t_0_reads_the_normaliser_from_the_state_in_bits():
    """At t = 1e-4 (the last step of 10,000) on 11x11 dark patches, logits reach 2.5e9 nats: the float32 running_max
    rounds by up to 128 nats and the normaliser's correction for it overflowed to inf, which certified every row
    whatever its unvisited cluster held. Here the unvisited cluster holds the member nearest q (value +1)."""
    from patchdb.index import ClusteredDictionary, EntryClusters
    from patchdb.schedule import alpha_bar as alpha_bar_at

    generator = torch.Generator().manual_seed(0)
    dimension, radius, nearest, alpha_bar = 121, 0.05, 0.01, alpha_bar_at(1e-4)
    base = torch.full((dimension,), -1.0, dtype=torch.float64)
    directions = torch.nn.functional.normalize(torch.randn(64, dimension, generator=generator), dim=1)
    sphere = torch.cat([radius * directions, -radius * directions])
    axis = directions[0]
    centre = (nearest + radius) * axis
    unvisited = torch.cat([(centre + radius * axis)[None], centre + sphere, (nearest * axis)[None]])
    keys = (base + torch.cat([sphere, unvisited]).double()).float()
    offsets = torch.tensor([0, len(sphere), len(keys)])
    members = [keys[:len(sphere)], keys[len(sphere):]]
    centroids = torch.stack([part.double().mean(0).float() for part in members])
    radii = torch.stack([(part.double() - centroid.double()).norm(dim=1).max().float() * 1.001
                         for part, centroid in zip(members, centroids)])
    values = torch.cat([torch.full((len(sphere), 1), -1.0), torch.full((len(unvisited), 1), 1.0)])
    sources = torch.stack([torch.arange(len(keys)), torch.zeros(len(keys)).long(), torch.zeros(len(keys)).long()], 1)
    flat = PatchDictionary(keys, values, keys.square().sum(1), torch.zeros(len(keys)), sources, False)
    indexed = ClusteredDictionary(flat, EntryClusters(offsets, centroids, radii, offsets.diff().float().log(),
                                                      offsets[:-1].clone()))
    queries = (math.sqrt(alpha_bar) * (base + 1e-6 * torch.randn(64, dimension, generator=generator,
                                                                  dtype=torch.float64))).float()
    mean, path = topk_fold(TopKBackend(topk=len(sphere), tol=1e-2, fallback="none"), queries, indexed, alpha_bar)
    exact = ExactBackend().summarize(queries.double(), [PatchDictionary(
        keys.double(), values.double(), keys.double().square().sum(1), torch.zeros(len(keys), dtype=torch.float64),
        sources, False)], alpha_bar).mean
    assert torch.allclose(exact, torch.ones_like(exact))  # the unvisited member dominates
    certified = path == PATHS.index("certified")
    assert not certified.any()  # the visited sphere alone leaves the dominant member out: nothing is certifiable
    assert ((mean.double() - exact).abs()[certified] <= 1e-2 * 2).all()

@pytest.mark.parametrize("alpha_bar", [0.9, 0.999, 0.9999])
def test_float32_cluster_bounds_hold_against_the_float64_truth(alpha_bar):
    """Near t = 0 a bound is the difference of two terms of thousands of nats: their rounding must not undercut it."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(50, 27, generator=generator)
    keys = torch.cat([base.repeat_interleave(400, 0) + 1e-4 * torch.randn(20000, 27, generator=generator),
                      torch.zeros(3000, 27), torch.randn(5000, 27, generator=generator)])
    sources = torch.stack([torch.arange(len(keys)), torch.zeros(len(keys)).long(), torch.zeros(len(keys)).long()], 1)
    indexed = clustered(PatchDictionary.from_entries(keys, keys[:, :1].clone(), sources), cluster_size=256)
    entries, clusters = indexed.entries, indexed.clusters
    signal = math.sqrt(alpha_bar)
    picks = torch.randint(len(entries.keys), (256,), generator=generator)
    noise = torch.randn(256, 27, generator=generator) * torch.rand(256, 1, generator=generator)
    queries = signal * entries.keys[picks] + math.sqrt(1 - alpha_bar) * noise
    _, bounds = clusters.search(queries, alpha_bar)
    keys64, queries64 = entries.keys.double(), queries.double()
    logits = ((signal * queries64 @ keys64.T - alpha_bar / 2 * keys64.square().sum(1)) / (1 - alpha_bar)
              + entries.log_multiplicity.double())
    cluster_mass = torch.stack([logits[:, start:end].logsumexp(dim=1)
                                for start, end in zip(clusters.offsets[:-1], clusters.offsets[1:])], dim=1)
    assert (cluster_mass <= bounds.double()).all()


def test_estimated_normaliser_is_unbiased(dictionary, indexed):
    alpha_bar = 0.5
    queries = noisy_queries(dictionary, alpha_bar, count=16)
    signal, noise_variance = math.sqrt(alpha_bar), 1 - alpha_bar
    logits = (signal * queries @ dictionary.keys.T - alpha_bar / 2 * dictionary.squared_norms) / noise_variance
    exact_log_normaliser = (logits + dictionary.log_multiplicity).logsumexp(dim=1)
    ratios, means, reported_errors = [], [], []
    for seed in range(200):
        accumulator = SoftmaxAccumulator(queries.shape[0], 1, queries.dtype, queries.device)
        backend = TopKBackend(topk=64, tol=1e-6, fallback="estimate", estimate_samples=256, estimate_error=10.0, seed=seed)
        path = backend.fold(accumulator, queries, indexed, alpha_bar)
        assert (path == PATHS.index("estimated")).all()
        ratios.append(accumulator.normaliser * (accumulator.running_max - exact_log_normaliser).exp())
        means.append(accumulator.summary().mean[:, 0])
        reported_errors.append(backend.take_report()["estimate_standard_error"]["median"])
    ratios = torch.stack(ratios)  # (seeds, Q): estimated / exact normaliser
    standard_error = ratios.std(dim=0) / math.sqrt(len(ratios))
    assert ((ratios.mean(dim=0) - 1).abs() <= 4 * standard_error + 1e-12).all()
    assert (ratios.std(dim=0) > 0).any()  # the estimate did vary: the test would see a bias
    # the standard error of the posterior mean each run reports is the spread the runs show
    observed = torch.stack(means).std(dim=0).median().item()
    assert 0.7 * observed <= sum(reported_errors) / len(reported_errors) <= 1.4 * observed


def test_estimator_is_close_and_auto_falls_back_to_exact(dictionary, indexed):
    alpha_bar = 0.3  # broad posteriors: nothing certified with 64 entries
    queries = noisy_queries(dictionary, alpha_bar)
    exact = exact_mean(queries, dictionary, alpha_bar)
    estimated, path = topk_fold(TopKBackend(topk=64, tol=1e-6, fallback="estimate", estimate_samples=512),
                                queries, indexed, alpha_bar)
    assert (path == PATHS.index("estimated")).all()
    assert (estimated - exact).abs().median() < 0.05
    strict, path = topk_fold(TopKBackend(topk=64, tol=1e-6, fallback="auto", estimate_samples=512, estimate_error=1e-4),
                             queries, indexed, alpha_bar)
    assert (path == PATHS.index("exact")).all()  # no estimate is that precise: all went exact
    assert torch.allclose(strict, exact, atol=1e-10)
    exact_fallback, path = topk_fold(TopKBackend(topk=64, tol=1e-6, fallback="exact"), queries, indexed, alpha_bar)
    assert (path == PATHS.index("exact")).all() and torch.allclose(exact_fallback, exact, atol=1e-10)


def test_one_draw_gives_no_error_estimate_so_auto_goes_exact(dictionary, indexed):
    alpha_bar = 0.3
    queries = noisy_queries(dictionary, alpha_bar)
    exact = exact_mean(queries, dictionary, alpha_bar)
    options = {"topk": 64, "tol": 1e-6, "estimate_samples": 1, "estimate_error": 10.0}
    strict, path = topk_fold(TopKBackend(fallback="auto", **options), queries, indexed, alpha_bar)
    assert (path == PATHS.index("exact")).all() and torch.allclose(strict, exact, atol=1e-10)
    backend = TopKBackend(fallback="estimate", **options)  # accepts its last round's estimates, errors unknown
    _, path = topk_fold(backend, queries, indexed, alpha_bar)
    errors = backend.take_report()["estimate_standard_error"]
    assert errors["unknown"] == (path == PATHS.index("estimated")).sum() > 0 and errors["median"] is None


def test_estimated_rows_take_the_dominant_entry_of_their_visited_entries_and_draws(dictionary, indexed):
    """With draws enough to hold every patch, each estimated row's dominant entry is the exact one, also where the
    visited clusters alone (the truncated softmax) miss it."""
    alpha_bar = 0.3
    queries = noisy_queries(dictionary, alpha_bar)
    exact = ExactBackend().summarize(queries, [dictionary], alpha_bar).best_source
    draws = 20 * int(dictionary.log_multiplicity.exp().sum().round())  # each patch missed with probability e^-20
    results = {}
    for fallback in ("estimate", "none"):
        backend = TopKBackend(topk=64, tol=1e-6, fallback=fallback, estimate_samples=draws, estimate_error=10.0)
        accumulator = SoftmaxAccumulator(queries.shape[0], 1, queries.dtype, queries.device)
        path = backend.fold(accumulator, queries, indexed, alpha_bar)
        assert (path == PATHS.index("estimated" if fallback == "estimate" else "truncated")).all()
        results[fallback] = accumulator.summary().best_source
    assert (results["none"] != exact).any(dim=1).any()  # some dominant entries lie outside the visited clusters
    assert torch.equal(results["estimate"], exact)


@pytest.mark.parametrize("fallback", ["estimate", "auto"])
def test_the_estimate_in_blocks_of_rows_equals_the_estimate_of_all_rows_at_once(dictionary, indexed, fallback,
                                                                               monkeypatch):
    # blocks bound the estimator's (rows, draws) logits whatever --estimate-samples is; the draws are shared by all
    alpha_bar = 0.3
    queries = noisy_queries(dictionary, alpha_bar)
    options = {"topk": 64, "tol": 1e-6, "fallback": fallback, "estimate_samples": 512, "estimate_error": 0.01}
    whole, whole_path = topk_fold(TopKBackend(**options), queries, indexed, alpha_bar)
    monkeypatch.setattr(patchdb.topk, "ESTIMATE_LOGIT_BYTES", 3 * 512 * queries.element_size())  # 3 rows a block
    blocks, blocks_path = topk_fold(TopKBackend(**options), queries, indexed, alpha_bar)
    assert (whole_path == PATHS.index("estimated")).any() and queries.shape[0] > 3
    assert torch.equal(blocks_path, whole_path)
    torch.testing.assert_close(blocks, whole, rtol=0, atol=1e-12)


def test_a_poor_estimate_visits_more_entries(dictionary, indexed):
    alpha_bar = 0.3
    queries = noisy_queries(dictionary, alpha_bar)
    exact = exact_mean(queries, dictionary, alpha_bar)
    errors, scored = [], []
    for estimate_error in (10.0, 1e-4):  # never / always above the estimates' error: no deepening / every round
        backend = TopKBackend(topk=64, tol=1e-6, fallback="estimate", estimate_samples=64, estimate_error=estimate_error)
        mean, path = topk_fold(backend, queries, indexed, alpha_bar)
        assert (path == PATHS.index("estimated")).all()
        errors.append((mean - exact).abs().median())
        scored.append(backend.take_report()["entries_scored"])
    deepest = 64 * patchdb.topk.DEEPENING_FACTOR ** patchdb.topk.DEEPENING_ROUNDS
    assert scored[0] <= len(queries) * (64 + 64)
    assert len(queries) * 4 * 64 < scored[1] <= len(queries) * (deepest + int(indexed.clusters.sizes.max()) + 3 * 64)
    assert errors[1] < errors[0] / 2


def test_truncated_softmax_scores_at_most_topk_entries_per_pixel(dictionary, indexed):
    alpha_bar = 0.3
    queries = noisy_queries(dictionary, alpha_bar)
    backend = TopKBackend(topk=100, tol=1e-6, fallback="none")
    _, path = topk_fold(backend, queries, indexed, alpha_bar)
    assert (path == PATHS.index("truncated")).all()
    largest_cluster = int(indexed.clusters.sizes.max())
    assert backend.take_report()["entries_scored"] <= len(path) * (100 + largest_cluster)


@pytest.mark.parametrize("chunk_bytes", [1 << 30, 16384], ids=["one-block", "blocks-and-runs"])
@pytest.mark.parametrize("fallback", FALLBACKS)
def test_gathered_scoring_equals_runs(dictionary, indexed, fallback, chunk_bytes, monkeypatch):
    """The GPU's scoring (each query's visited entries gathered into padded rows) gives the CPU's posterior;
    with 16 KiB chunks (227 entries), queries in many blocks and the widest ('exact', 'auto') through runs."""
    monkeypatch.setattr(patchdb.topk, "logit_chunk_bytes", lambda device: chunk_bytes)
    for alpha_bar in (0.3, 0.9, 0.99):
        assert_scoring_equals_runs("gathered", noisy_queries(dictionary, alpha_bar), indexed, fallback, alpha_bar, atol=1e-12)


def assert_scoring_equals_runs(scoring: str, queries, indexed, fallback: str, alpha_bar: float, atol: float) -> None:
    """The posterior, paths and entries scored of one fold with scoring equal those with scoring 'runs'."""
    options = {"topk": 128, "tol": 1e-2, "fallback": fallback, "estimate_samples": 256, "estimate_error": 0.05}
    summaries = []
    for backend in (TopKBackend(**options, scoring="runs"), TopKBackend(**options, scoring=scoring)):
        accumulator = SoftmaxAccumulator(queries.shape[0], 1, queries.dtype, queries.device)
        path = backend.fold(accumulator, queries, indexed, alpha_bar)
        summaries.append((accumulator.summary(), path, backend.take_report()["entries_scored"]))
    (expected, expected_path, expected_scored), (got, got_path, got_scored) = summaries
    torch.testing.assert_close(got.mean, expected.mean, rtol=0, atol=atol)
    torch.testing.assert_close(got.best_weight, expected.best_weight, rtol=0, atol=atol)
    assert torch.equal(got.best_source, expected.best_source) and torch.equal(got_path, expected_path)
    assert got_scored == expected_scored


def test_auto_topk_is_a_budget_of_multiply_adds_of_mean_clusters_with_a_floor(dictionary, indexed, monkeypatch):
    """topk None visits AUTO_TOPK_CLUSTERS mean clusters' worth of entries (never fewer than MIN_AUTO_TOPK) where a patch
    has AUTO_TOPK_DIMENSION numbers, and in inverse proportion to its numbers elsewhere."""
    alpha_bar = 0.3
    queries = noisy_queries(dictionary, alpha_bar)
    dimension = queries.shape[1]  # 3 x 3 patches
    options = {"tol": 1e-6, "fallback": "none"}
    clusters_worth = patchdb.topk.AUTO_TOPK_CLUSTERS * len(indexed.entries) / len(indexed.clusters)
    scored = []
    for floor, reference, expected_topk in ((1, dimension, math.ceil(clusters_worth)),
                                            (3 * clusters_worth, dimension, math.ceil(3 * clusters_worth)),
                                            (1, 3 * dimension, math.ceil(3 * clusters_worth)),
                                            (1, 121, math.ceil(clusters_worth * 121 / 9))):
        monkeypatch.setattr(patchdb.topk, "MIN_AUTO_TOPK", floor)
        monkeypatch.setattr(patchdb.topk, "AUTO_TOPK_DIMENSION", reference)
        auto, explicit = TopKBackend(topk=None, **options), TopKBackend(topk=expected_topk, **options)
        assert torch.equal(topk_fold(auto, queries, indexed, alpha_bar)[0], topk_fold(explicit, queries, indexed, alpha_bar)[0])
        scored.append(auto.take_report()["entries_scored"])
        assert scored[-1] == explicit.take_report()["entries_scored"]
    assert scored[0] < scored[1] == scored[2] < scored[3] < len(queries) * len(indexed.entries)  # each budget binds


def test_unclustered_dictionaries_go_to_the_exact_backend(dictionary):
    queries = noisy_queries(dictionary, 0.7)
    accumulator = SoftmaxAccumulator(queries.shape[0], 1, queries.dtype, queries.device)
    path = TopKBackend().fold(accumulator, queries, dictionary, 0.7)
    assert (path == PATHS.index("exact")).all()
    assert torch.allclose(accumulator.summary().mean, exact_mean(queries, dictionary, 0.7))


def test_bad_backend_settings_are_refused():
    from patchdb.errors import PatchdbError
    for options in ({"topk": 0}, {"topk": 10**20}, {"tol": 1.0}, {"fallback": "sometimes"}, {"scoring": "sparse"},
                    {"estimate_samples": 0}, {"estimate_samples": 10**8}, {"estimate_error": 0.0},
                    {"estimate_error": math.nan}, {"estimate_error": math.inf}):
        with pytest.raises(PatchdbError):
            TopKBackend(**options)


def float32_dictionary(dictionary: PatchDictionary) -> PatchDictionary:
    return PatchDictionary(dictionary.keys.float(), dictionary.values.float(), dictionary.squared_norms.float(),
                           dictionary.log_multiplicity.float(), dictionary.sources, dictionary.merged)


@pytest.fixture(scope="module")
def indexed32(dictionary):
    return clustered(float32_dictionary(dictionary), cluster_size=32)


CLUSTER_ISAS = patchdb.topk._clusters.isas() if patchdb.topk._clusters is not None else []


@pytest.mark.skipif(patchdb.topk._clusters is None, reason="patchdb._clusters was not compiled")
@pytest.mark.parametrize("isa", CLUSTER_ISAS)
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("fallback", FALLBACKS)
def test_compiled_scoring_equals_runs(dictionary, indexed32, fallback, threads, isa, monkeypatch):
    """The compiled kernel (every visited cluster read in place, clusters split between threads, however few the
    pairs), in each instruction set this processor runs, gives the matrix products' posterior in float32: same paths,
    same dominant entries, the same entries scored."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(patchdb.topk, "THREAD_MULTIPLY_ADDS", 1)
    monkeypatch.setattr(patchdb.topk, "_score_compiled", functools.partial(patchdb.topk._score_compiled, isa=isa))
    for alpha_bar in (0.3, 0.9, 0.99):
        assert_scoring_equals_runs("compiled", noisy_queries(dictionary, alpha_bar, count=200).float(), indexed32, fallback,
                                   alpha_bar, atol=1e-4)


@pytest.mark.skipif(patchdb.topk._clusters is None, reason="patchdb._clusters was not compiled")
@pytest.mark.parametrize("isa", CLUSTER_ISAS)
@pytest.mark.parametrize("patch_size", [9, 15, 17])
@pytest.mark.parametrize("in_place", [False, True])
def test_compiled_scoring_of_any_number_of_visitors_equals_the_exact_posterior(isa, patch_size, in_place):
    """Clusters visited by fewer rows than a group (1, 2, 5) or a group and a few more (17, 19), scored row by row where
    that is cheaper (their patches' runs loaded with masked tails: runs of 9, 15 and 17 pixels against 8- and 16-float
    vectors), and by 48, 80 and 150 rows (the wide products over pairs of groups and the narrow ones over the group
    left; more rows than a block), from keys in memory or read in place from padded images: the float64 exact posterior."""
    from patchdb.index import GatheredEntries, squared_norm_maps
    from patchdb.patches import centre_indices, patch_windows
    generator = torch.Generator().manual_seed(patch_size)
    images = torch.rand(5, 1, 12, 12, generator=generator) * 2 - 1
    windows = patch_windows(images, patch_size, "zeros")
    image, row, column = torch.meshgrid(torch.arange(5), torch.arange(12), torch.arange(12), indexing="ij")
    sources = torch.stack([image.flatten(), row.flatten(), column.flatten()], dim=1)[:700]
    gathered = GatheredEntries(windows, squared_norm_maps(windows), sources, torch.ones(len(sources), dtype=torch.int32),
                               centre_indices(1, patch_size), False)
    in_memory = patchdb.index.take_entries(gathered, slice(None))
    offsets = torch.tensor([0, 48, 100, 300, 301, 400, 500, 650, 700])
    visitor_counts = [1, 2, 5, 17, 19, 48, 80, 150]
    clusters = patchdb.index.EntryClusters(offsets, torch.zeros(8, patch_size**2), torch.zeros(8), torch.zeros(8),
                                           offsets[:-1].clone())
    indexed = patchdb.index.ClusteredDictionary(gathered if in_place else in_memory, clusters)
    alpha_bar = 0.7
    queries = noisy_queries(PatchDictionary(in_memory.keys.double(), None, None, None, None), alpha_bar, count=150).float()
    visit = torch.zeros(150, 8, dtype=torch.bool)
    for cluster, visitors in enumerate(visitor_counts):
        visit[:visitors, cluster] = True
    accumulator = SoftmaxAccumulator(150, 1, torch.float32, queries.device)
    patchdb.topk._score_compiled(accumulator, queries, indexed, visit, alpha_bar, isa=isa)
    got = accumulator.summary()
    for rows in map(slice, [0, *visitor_counts[:-1]], visitor_counts):  # rows that visit the same clusters
        visited = torch.nonzero(visit[rows.start]).squeeze(1)
        entries = torch.cat([torch.arange(int(offsets[c]), int(offsets[c + 1])) for c in visited.tolist()])
        double = PatchDictionary.from_entries(in_memory.keys[entries].double(), in_memory.values[entries].double(),
                                              in_memory.sources[entries], merge_duplicates=False)
        exact = ExactBackend().summarize(queries[rows].double(), [double], alpha_bar)
        torch.testing.assert_close(got.mean[rows].double(), exact.mean, rtol=0, atol=2e-4)
        assert torch.equal(got.best_source[rows], exact.best_source)


@pytest.mark.skipif(patchdb.topk._clusters is None, reason="patchdb._clusters was not compiled")
def test_compiled_scoring_keeps_state_it_does_not_visit_and_folds_into_existing_state(indexed32, dictionary):
    """Rows that visit nothing keep their state; a second fold of the other clusters gives the fold of all."""
    alpha_bar = 0.6
    queries = noisy_queries(dictionary, alpha_bar, count=40).float()
    clusters = len(indexed32.clusters)
    visit = torch.zeros(queries.shape[0], clusters, dtype=torch.bool)
    visit[:30, : clusters // 2] = True
    rest = torch.zeros_like(visit)
    rest[:30, clusters // 2:] = True
    states = []
    for visits in ([visit, rest], [visit | rest]):
        accumulator = SoftmaxAccumulator(queries.shape[0], 1, queries.dtype, queries.device)
        for part in visits:
            patchdb.topk._score_compiled(accumulator, queries, indexed32, part, alpha_bar)
        states.append(accumulator)
    two, one = (state.summary() for state in states)
    torch.testing.assert_close(two.mean[:30], one.mean[:30], rtol=0, atol=1e-5)
    assert torch.equal(two.best_source, one.best_source)
    assert torch.isinf(states[0].best_logit[30:]).all() and (states[0].normaliser[30:] == 0).all()
    exact = ExactBackend().summarize(queries[:30].double(), [dictionary], alpha_bar).mean
    torch.testing.assert_close(one.mean[:30].double(), exact, rtol=0, atol=1e-4)


@pytest.mark.skipif(patchdb.topk._clusters is None, reason="patchdb._clusters was not compiled")
def test_compiled_kernel_refuses_buffers_and_visits_that_do_not_fit(indexed32, dictionary):
    from patchdb import _clusters
    queries = noisy_queries(dictionary, 0.5, count=4).float()
    layout, clusters = indexed32.patch_layout, indexed32.clusters
    state = [torch.full((4,), -math.inf), torch.zeros(4), torch.zeros(4, 1), torch.full((4,), -math.inf),
             torch.full((4,), -1, dtype=torch.int64)]

    def fold(starts=layout.starts, offsets=clusters.offsets, visit_starts=None, visit_rows=torch.tensor([0, 3]), patch_size=3):
        if visit_starts is None:
            visit_starts = torch.zeros(len(clusters) + 1, dtype=torch.int64)
            visit_starts[1:] = len(visit_rows)
        _clusters.fold(layout.buffer.numpy(), starts.numpy(), layout.squared_norms.numpy(), None, 1, patch_size,
                       layout.channel_stride, layout.row_stride, offsets.numpy(), visit_starts.numpy(), visit_rows.numpy(),
                       queries.numpy(), 1.0, 0.5, *(part.numpy() for part in state))

    fold()  # as given, it folds
    with pytest.raises(ValueError, match="not one this processor runs"):
        _clusters.fold(layout.buffer.numpy(), layout.starts.numpy(), layout.squared_norms.numpy(), None, 1, 3,
                       layout.channel_stride, layout.row_stride, clusters.offsets.numpy(),
                       torch.zeros(len(clusters) + 1, dtype=torch.int64).numpy(), torch.zeros(0, dtype=torch.int64).numpy(),
                       queries.numpy(), 1.0, 0.5, *(part.numpy() for part in state), "sse1")
    assert torch.isfinite(state[0][[0, 3]]).all() and torch.isinf(state[0][[1, 2]]).all()
    # only cluster 0 is visited: a patch out of the buffer in cluster 1 is never read, one in cluster 0 is refused
    assert len(clusters) > 1
    unread_starts, bad_starts = layout.starts.clone(), layout.starts.clone()
    unread_starts[clusters.offsets[1]] = bad_starts[clusters.offsets[1] - 1] = layout.buffer.numel() - 2
    fold(starts=unread_starts)
    for arguments, message in (({"starts": bad_starts}, "leaves the patches buffer"),
                               ({"visit_rows": torch.tensor([0, 4])}, "not a query row"),
                               ({"offsets": clusters.offsets.flip(0)}, "must not decrease"),
                               ({"offsets": clusters.offsets + 1}, "span the entries"),
                               ({"patch_size": 5}, "odd P")):
        with pytest.raises(ValueError, match=message):
            fold(**arguments)


def test_without_the_compiled_kernel_scoring_falls_back_to_matrix_products(monkeypatch):
    from patchdb.errors import PatchdbError
    monkeypatch.setattr(patchdb.topk, "_clusters", None)
    assert patchdb.topk.default_scoring(torch.device("cpu"), torch.float32) == "runs"
    with pytest.raises(PatchdbError, match="make setup"):
        TopKBackend(scoring="compiled")


@pytest.mark.parametrize("padding", ["zeros", "circular"])
@pytest.mark.parametrize("patch_size", [1, 3, 5])
def test_squared_norm_maps_are_every_patchs_squared_norm(patch_size, padding, monkeypatch):
    from patchdb.index import squared_norm_maps
    from patchdb.patches import patch_windows
    monkeypatch.setattr(patchdb.index, "NORM_MAP_IMAGES", 2)  # several blocks of images
    images = torch.randn(5, 2, 7, 9, generator=torch.Generator().manual_seed(patch_size))
    windows = patch_windows(images, patch_size, padding)
    torch.testing.assert_close(squared_norm_maps(windows), windows.square().sum(dim=(1, 4, 5)), rtol=1e-6, atol=1e-5)
