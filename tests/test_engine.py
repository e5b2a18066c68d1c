"""The shared engine: streaming softmax, duplicate merging, exact row deduplication, the logit floor."""

import math

import pytest
import torch

import patchdb.duplicates as duplicates
import patchdb.engine as engine
from patchdb.engine import ExactBackend, PatchDictionary, SoftmaxAccumulator, unique_rows

pytestmark = pytest.mark.usefixtures("single_thread")


def direct_posterior(queries, keys, values, alpha_bar):
    """Softmax over -||q - sqrt(alpha_bar) k||^2 / (2 beta), in float64, in one piece: (mean, argmax, max weight)."""
    logits = -torch.cdist(queries.double(), math.sqrt(alpha_bar) * keys.double()).square() / (2 * (1 - alpha_bar))
    weights = torch.softmax(logits, dim=1)
    best_weight, best = weights.max(dim=1)
    return weights @ values.double(), best, best_weight


def accumulate(logits, values, sources, boundaries):
    accumulator = SoftmaxAccumulator(logits.shape[0], values.shape[1], logits.dtype, logits.device)
    for start, stop in zip(boundaries[:-1], boundaries[1:]):
        accumulator.update(logits[:, start:stop].clone(), lambda weights, rows, v=values[start:stop]: weights @ v,
                           sources[start:stop])
    return accumulator.summary()


@pytest.mark.parametrize("spread", [1.0, 300.0], ids=["soft", "beyond-the-floor"])
def test_streaming_softmax_equals_a_direct_softmax(spread):
    """Chunks in any order give the direct softmax mean, best source and weight; with a spread of
    300 most log-weights fall below the floor (-80) and the answer must not move."""
    generator = torch.Generator().manual_seed(0)
    num_queries, num_entries = 7, 200
    logits = spread * torch.randn(num_queries, num_entries, generator=generator, dtype=torch.float64)
    logits[:, -1] += 2 * spread  # the dominant entries arrive in the last chunk: every earlier chunk is rescaled
    values = torch.randn(num_entries, 3, generator=generator, dtype=torch.float64)
    sources = torch.stack([torch.arange(num_entries), torch.arange(num_entries) % 5, torch.arange(num_entries) // 5], dim=1)
    weights = torch.softmax(logits, dim=1)
    best_weight, best = weights.max(dim=1)
    for boundaries in ([0, num_entries], [0, 1, 50, 51, 130, num_entries], list(range(0, num_entries + 1, 25))):
        summary = accumulate(logits, values, sources, boundaries)
        torch.testing.assert_close(summary.mean, weights @ values, rtol=0, atol=1e-12)
        assert torch.equal(summary.best_source, sources[best])
        torch.testing.assert_close(summary.best_weight, best_weight, rtol=0, atol=1e-12)


def test_logits_in_bits_or_nats_give_the_same_state():
    """The accumulator works in bits: chunks given in nats or in bits (nats * log2 e) must fold alike, and its
    running_max, normaliser and weighted_sum must read in nats (other backends bound and estimate with them)."""
    generator = torch.Generator().manual_seed(5)
    logits = 40 * torch.randn(6, 120, generator=generator, dtype=torch.float64)
    values = torch.randn(120, 2, generator=generator, dtype=torch.float64)
    sources = torch.zeros(120, 3, dtype=torch.int64)
    sources[:, 0] = torch.arange(120)
    log_multiplicity = torch.rand(120, generator=generator, dtype=torch.float64)
    states = []
    for bits in (False, True):
        accumulator = SoftmaxAccumulator(6, 2, torch.float64, torch.device("cpu"))
        for start in range(0, 120, 30):
            chunk = logits[:, start:start + 30] * (engine.LOG2_E if bits else 1.0)
            accumulator.update(chunk, lambda weights, rows, v=values[start:start + 30]: weights @ v, sources[start:start + 30],
                               log_multiplicity[start:start + 30], bits=bits)
        states.append(accumulator)
    log_weights = logits + log_multiplicity
    for accumulator in states:
        torch.testing.assert_close(accumulator.running_max + accumulator.normaliser.log(), log_weights.logsumexp(dim=1),
                                   rtol=0, atol=1e-12)
        weighted = torch.softmax(log_weights, dim=1) @ values
        torch.testing.assert_close(accumulator.weighted_sum / accumulator.normaliser[:, None], weighted, rtol=0, atol=1e-12)
        torch.testing.assert_close(accumulator.best_logit, logits.max(dim=1).values, rtol=0, atol=1e-12)
        assert torch.equal(accumulator.best_source[:, 0], logits.argmax(dim=1))
    torch.testing.assert_close(states[0].summary().mean, states[1].summary().mean, rtol=0, atol=1e-12)


@pytest.mark.parametrize("left_out", [2, 9], ids=["most-rows-live", "most-rows-left-out"])
def test_rows_a_chunk_leaves_out_keep_their_state(left_out):
    """A chunk folded into some accumulator rows (rows=) whose logits are -inf for some of them, or negligible (far
    below their maximum), must leave those rows exactly as they were, whether few or most rows are left out: the same
    state as folding the other rows alone."""
    generator = torch.Generator().manual_seed(3)
    num_rows, entries = 12, 40
    first = torch.randn(num_rows, entries, generator=generator, dtype=torch.float64)
    values = torch.randn(entries, 2, generator=generator, dtype=torch.float64)
    sources = torch.zeros(entries, 3, dtype=torch.int64)
    sources[:, 0] = torch.arange(entries)
    rows = torch.tensor([0, 2, 3, 5, 6, 7, 8, 9, 10, 11])  # row 1 and row 4 are not in the chunk at all
    second = torch.randn(len(rows), entries, generator=generator, dtype=torch.float64)
    out = torch.randperm(len(rows), generator=generator)[:left_out]
    second[out[::2]] = -math.inf
    second[out[1::2]] -= 500.0  # negligible: more than 60 below the rows' maximum
    kept = torch.tensor([row for row in range(len(rows)) if row not in out.tolist()])
    states = []
    for chunk, chunk_rows in ((None, None), (second, rows), (second[kept], rows[kept])):
        accumulator = SoftmaxAccumulator(num_rows, 2, torch.float64, torch.device("cpu"))
        accumulator.update(first.clone(), lambda weights, _: weights @ values, sources)
        if chunk is not None:
            accumulator.update(chunk.clone(), lambda weights, _: weights @ values, sources, rows=chunk_rows)
        states.append(accumulator)
    before, folded, alone = states
    untouched = torch.tensor([1, 4, *rows[out].tolist()])
    for name in ("running_max", "normaliser", "weighted_sum", "best_logit", "best_source"):
        assert torch.equal(getattr(folded, name)[untouched], getattr(before, name)[untouched]), name
        torch.testing.assert_close(getattr(folded, name)[rows[kept]], getattr(alone, name)[rows[kept]], rtol=1e-12, atol=0)
    assert not torch.equal(folded.normaliser[rows[kept]], before.normaliser[rows[kept]])  # the chunk was folded there


def test_exact_backend_over_many_chunks_equals_the_direct_posterior():
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn(1000, 12, generator=generator, dtype=torch.float64)
    values = keys[:, 4:5]
    sources = torch.stack([torch.arange(1000), torch.zeros(1000, dtype=torch.int64), torch.zeros(1000, dtype=torch.int64)], dim=1)
    queries = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    parts = [PatchDictionary.from_entries(keys[:600], values[:600], sources[:600]),
             PatchDictionary.from_entries(keys[600:], values[600:], sources[600:])]
    for alpha_bar in (0.001, 0.5, 0.999):
        mean, best, best_weight = direct_posterior(queries, keys, values, alpha_bar)
        for backend in (ExactBackend(), ExactBackend(chunk_bytes=1)):  # chunk_bytes=1: chunks of 256 entries
            summary = backend.summarize(queries, parts, alpha_bar)
            torch.testing.assert_close(summary.mean, mean, rtol=0, atol=1e-10)
            assert torch.equal(summary.best_source[:, 0], best)
            torch.testing.assert_close(summary.best_weight, best_weight, rtol=0, atol=1e-10)


def duplicated_entries():
    """Keys with many exact repeats (and a -0.0 twin of a 0.0 row), their centre values and sources."""
    generator = torch.Generator().manual_seed(2)
    distinct = torch.randint(-2, 3, (6, 9), generator=generator).to(torch.float64) / 2
    distinct[0] = 0.0
    index = torch.randint(0, 6, (300,), generator=generator)
    keys = distinct[index].clone()
    keys[index == 0] = -0.0
    keys[0] = 0.0
    sources = torch.stack([torch.arange(300), index, torch.zeros(300, dtype=torch.int64)], dim=1)
    return keys, keys[:, 4:5], sources


def test_merging_duplicates_gives_the_same_posterior():
    keys, values, sources = duplicated_entries()
    merged = PatchDictionary.from_entries(keys, values, sources, merge_duplicates=True)
    unmerged = PatchDictionary.from_entries(keys, values, sources, merge_duplicates=False)
    assert len(merged) == len(torch.unique(keys, dim=0)) < len(unmerged) == 300
    queries = torch.randn(4, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for alpha_bar in (0.01, 0.5, 0.99):
        a = ExactBackend().summarize(queries, [merged], alpha_bar)
        b = ExactBackend().summarize(queries, [unmerged], alpha_bar)
        torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=1e-12)
        mean, _, _ = direct_posterior(queries, keys, values, alpha_bar)
        torch.testing.assert_close(a.mean, mean, rtol=0, atol=1e-12)
        # the dominant entry is the one copy of largest weight, at its first occurrence
        logits = -torch.cdist(queries, math.sqrt(alpha_bar) * keys).square() / (2 * (1 - alpha_bar))
        best_weight, best = torch.softmax(logits, dim=1).max(dim=1)
        assert torch.equal(keys[a.best_source[:, 0]], keys[best])
        torch.testing.assert_close(a.best_weight, best_weight, rtol=0, atol=1e-12)


def test_dominant_entry_does_not_depend_on_merging():
    keys, values, sources = duplicated_entries()
    queries = torch.randn(4, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = ExactBackend().summarize(queries, [PatchDictionary.from_entries(keys, values, sources, merge_duplicates=True)], 0.01)
    b = ExactBackend().summarize(queries, [PatchDictionary.from_entries(keys, values, sources, merge_duplicates=False)], 0.01)
    assert torch.equal(keys[a.best_source[:, 0]], keys[b.best_source[:, 0]])
    torch.testing.assert_close(a.best_weight, b.best_weight, rtol=0, atol=1e-12)


def naive_unique_rows(rows: torch.Tensor) -> tuple[list[int], list[int]]:
    """First occurrences (in order) and counts, by Python equality of the rows' values (-0.0 == 0.0)."""
    first, counts = {}, {}
    for i, row in enumerate(rows.tolist()):
        key = tuple(row)
        first.setdefault(key, i)
        counts[key] = counts.get(key, 0) + 1
    return list(first.values()), [counts[key] for key in first]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unique_rows_is_exact_and_folds_negative_zero(dtype):
    keys, _, _ = duplicated_entries()
    keys = keys.to(dtype)
    first, counts = unique_rows(keys)
    expected_first, expected_counts = naive_unique_rows(keys)
    assert first.tolist() == expected_first and counts.tolist() == expected_counts
    assert torch.signbit(keys[(keys == 0).all(dim=1)]).any(), "the fixture lost its -0.0 rows"
    assert len(expected_first) == 6


@pytest.mark.parametrize("collision", ["all rows", "first column only"])
def test_unique_rows_survives_hash_collisions(collision, monkeypatch):
    """Force different rows to share a hash: they must never merge, and multiplicities stay exact."""
    real_row_hashes = duplicates.row_hashes

    def colliding_hashes(rows):
        if collision == "all rows":
            return torch.zeros(rows.shape[0], dtype=torch.int64)
        return real_row_hashes(rows[:, :1])

    monkeypatch.setattr(duplicates, "row_hashes", colliding_hashes)
    keys, _, _ = duplicated_entries()
    first, counts = unique_rows(keys)
    expected_first, expected_counts = naive_unique_rows(keys)
    assert int(counts.sum()) == keys.shape[0]
    assert first.tolist() == sorted(first.tolist())
    merged_counts = {}
    for index, count in zip(first.tolist(), counts.tolist()):
        key = tuple(keys[index].tolist())
        merged_counts[key] = merged_counts.get(key, 0) + count
    assert merged_counts == {tuple(keys[i].tolist()): c for i, c in zip(expected_first, expected_counts)}


def test_merging_in_blocks_equals_merging_at_once():
    keys, _, _ = duplicated_entries()
    first, counts = duplicates.distinct_entries(lambda rows: keys[rows], keys.shape[0], block_rows=7)
    expected_first, expected_counts = naive_unique_rows(keys)
    assert first.tolist() == expected_first and counts.tolist() == expected_counts


def test_logit_floor_does_not_change_the_posterior():
    """Queries far from most keys at small t: nearly all log-weights are below the floor."""
    generator = torch.Generator().manual_seed(4)
    keys = torch.randn(2000, 9, generator=generator, dtype=torch.float64)
    values = keys[:, 4:5]
    sources = torch.zeros(2000, 3, dtype=torch.int64)
    sources[:, 0] = torch.arange(2000)
    queries = keys[:6] * 0.9 + 0.05 * torch.randn(6, 9, generator=generator, dtype=torch.float64)
    alpha_bar = 0.99
    summary = ExactBackend(chunk_bytes=1).summarize(queries * math.sqrt(alpha_bar),
                                                    [PatchDictionary.from_entries(keys, values, sources)], alpha_bar)
    mean, best, best_weight = direct_posterior(queries * math.sqrt(alpha_bar), keys, values, alpha_bar)
    logits = -torch.cdist(queries.double(), keys).square() * alpha_bar / (2 * (1 - alpha_bar))
    assert ((logits - logits.max(dim=1, keepdim=True).values) < engine.LOG_WEIGHT_FLOOR).double().mean() > 0.9
    torch.testing.assert_close(summary.mean, mean, rtol=0, atol=1e-14)
    assert torch.equal(summary.best_source[:, 0], best)
    torch.testing.assert_close(summary.best_weight, best_weight, rtol=0, atol=1e-14)


@pytest.mark.parametrize("alpha_bar", [0.3, 0.9, 0.999])
def test_block_pruning_gives_the_dense_posterior_and_skips_work(alpha_bar, monkeypatch):
    """Sorted, bounded blocks (EntryBlocks) must not change the posterior; at low noise they must skip entries."""
    generator = torch.Generator().manual_seed(7)
    # clusters spread along two directions, as patches spread mostly along their top principal components
    centres = (torch.randn(40, 2, generator=generator, dtype=torch.float64)
               @ torch.randn(2, 9, generator=generator, dtype=torch.float64) * 3)
    keys = (centres[torch.randint(40, (6000,), generator=generator)]
            + 0.1 * torch.randn(6000, 9, generator=generator, dtype=torch.float64))
    keys[:500] = keys[500:1000]  # duplicates, merged with multiplicities
    values = keys[:, 4:5]
    sources = torch.stack([torch.arange(6000), torch.zeros(6000, dtype=torch.int64), torch.zeros(6000, dtype=torch.int64)], dim=1)
    queries = (math.sqrt(alpha_bar) * keys[torch.randint(6000, (50,), generator=generator)]
               + math.sqrt(1 - alpha_bar) * torch.randn(50, 9, generator=generator, dtype=torch.float64))
    dense = ExactBackend(block_pruning=False).summarize(queries, [PatchDictionary.from_entries(keys, values, sources)], alpha_bar)

    computed = []
    real_logits = engine._logits

    def counting_logits(q, dictionary, start, stop, abar, **options):
        computed.append(q.shape[0] * (stop - start))
        return real_logits(q, dictionary, start, stop, abar, **options)

    monkeypatch.setattr(engine, "_logits", counting_logits)
    monkeypatch.setattr(engine, "MIN_BLOCKED_ENTRIES", 1000)
    monkeypatch.setattr(engine, "BLOCK_PRUNING_MIN_ALPHA_BAR", 0.0)
    dictionary = PatchDictionary.from_entries(keys, values, sources)
    pruned = ExactBackend(chunk_bytes=4096).summarize(queries, [dictionary], alpha_bar)
    assert dictionary.blocks is not None
    torch.testing.assert_close(pruned.mean, dense.mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(pruned.best_weight, dense.best_weight, rtol=0, atol=1e-10)
    assert torch.equal(keys[pruned.best_source[:, 0]], keys[dense.best_source[:, 0]])
    if alpha_bar == 0.999:
        assert sum(computed) < 0.5 * len(dictionary) * queries.shape[0], "the bounds skipped too little at low noise"


def test_block_pruning_counts_every_entry_of_a_short_last_seed_block(monkeypatch):
    """Queries whose most promising block is the short last one: it seeds them with every
    SEED_STRIDE-th entry and the scan must still count each of its other entries exactly once."""
    monkeypatch.setattr(engine, "MIN_BLOCKED_ENTRIES", 1000)
    monkeypatch.setattr(engine, "BLOCK_PRUNING_MIN_ALPHA_BAR", 0.0)
    generator = torch.Generator().manual_seed(8)
    block_size, num_entries = 1024, 3 * 1024 + 21  # the last block holds 21 entries; its last 3 are no seed entries
    keys = torch.randn(num_entries, 6, generator=generator, dtype=torch.float64)
    keys[-21:, :2] += 20.0  # the last block lies apart along the bounds' directions
    sources = torch.stack([torch.arange(num_entries), torch.zeros(num_entries, dtype=torch.int64),
                           torch.zeros(num_entries, dtype=torch.int64)], dim=1)
    dictionary = PatchDictionary.from_entries(keys, keys[:, :1], sources)
    directions = torch.eye(6, 2, dtype=torch.float64)
    block = torch.arange(num_entries) // block_size
    projections = keys @ directions
    low = torch.stack([projections[block == b].amin(dim=0) for b in range(4)])
    high = torch.stack([projections[block == b].amax(dim=0) for b in range(4)])
    dictionary.blocks = engine.EntryBlocks(block_size, directions, low, high, torch.zeros(4, dtype=torch.float64))
    alpha_bar = 0.99
    queries = math.sqrt(alpha_bar) * keys[-3:] + 0.001 * torch.randn(3, 6, generator=generator, dtype=torch.float64)
    assert (dictionary.blocks.logit_bounds(queries, alpha_bar).argmax(dim=1) == 3).all()
    pruned = ExactBackend().summarize(queries, [dictionary], alpha_bar)
    mean, best, best_weight = direct_posterior(queries, keys, keys[:, :1], alpha_bar)
    torch.testing.assert_close(pruned.mean, mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(pruned.best_weight, best_weight, rtol=0, atol=1e-10)
    assert torch.equal(pruned.best_source[:, 0], best)
