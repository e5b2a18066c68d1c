"""The exact backend's sliding-window method (patchdb.windows, kernel patchdb/_windows.c): its tasks pair every
pixel with exactly its dictionary, it equals the matrix-product method on inputs the naive reference is too slow
for (several channels, non-square images, batches, threads, streamed images), and bad input or a missing kernel
is a clear error."""

from collections import Counter

import pytest
import torch

import patchdb.windows
import reference
from conftest import noisy_batch
from patchdb.data import make_dataset
from patchdb.engine import ExactBackend
from patchdb.errors import PatchdbError
from patchdb.machines import make_machine
from patchdb.patches import dictionary_groups, padded_images
from patchdb.schedule import alpha_bar
from patchdb.windows import VECTOR_BYTES, LaneImages, WindowState, lanes, window_posterior, window_tasks

pytestmark = pytest.mark.usefixtures("single_thread")


def task_pairs(tasks: torch.Tensor) -> Counter:
    """How many times the tasks pair each (pixel, key centre)."""
    pairs = Counter()
    for iy0, iy1, ix0, ix1, sy, sx in tasks.tolist():
        for row in range(iy0, iy1):
            for col in range(ix0, ix1):
                pairs[(row, col), (row + sy, col + sx)] += 1
    return pairs


@pytest.mark.parametrize("height, width", [(8, 8), (9, 7)])
@pytest.mark.parametrize("patch_size", [3, 5, 7, 9])
@pytest.mark.parametrize("name", ["ls", "els", "bbels"])
def test_tasks_pair_each_pixel_with_its_dictionary_once(name, patch_size, height, width):
    pairs = task_pairs(window_tasks(dictionary_groups(name, patch_size, height, width), width))
    expected = Counter(((r, c), key) for r in range(height) for c in range(width)
                       for key in reference.dictionary_locations(name, r, c, patch_size, height, width))
    assert pairs == expected


def random_dataset(channels: int, height: int, width: int, count: int = 21) -> "patchdb.data.Dataset":
    """Uniform random images (no two patches alike, so every pixel's dominant patch is unique), labelled 0 and 1."""
    images = torch.rand(count, channels, height, width, generator=torch.Generator().manual_seed(channels)) * 2 - 1
    return make_dataset(images, torch.arange(count) % 2, f"random-{channels}x{height}x{width}")


@pytest.mark.parametrize("channels, height, width", [(1, 9, 7), (2, 8, 8), (3, 7, 10)])
@pytest.mark.parametrize("name, patch_size", [("ls", 3), ("els", 5), ("bbels", 3), ("bbels", 5)])
def test_windows_equal_matrix_products(name, patch_size, channels, height, width):
    """float64: the same posterior mean, sources and weights, with and without labels (21 images: two or more lane
    groups), and the same mean without provenance."""
    dataset = random_dataset(channels, height, width)
    windows = make_machine(name, dataset, dtype=torch.float64, backend=ExactBackend(method="windows"))
    products = make_machine(name, dataset, dtype=torch.float64, backend=ExactBackend(method="products"))
    for t, labels in ((0.1, None), (0.6, torch.tensor([1, 0])), (1.0, None)):
        x = noisy_batch(dataset, t, seed=round(10 * t))
        got, expected = windows.posterior(x, t, labels, patch_size), products.posterior(x, t, labels, patch_size)
        torch.testing.assert_close(got.mean, expected.mean, rtol=0, atol=1e-10)
        assert torch.equal(got.source, expected.source)
        torch.testing.assert_close(got.weight, expected.weight, rtol=0, atol=1e-10)
        without = windows.posterior(x, t, labels, patch_size, provenance=False)  # the kernel without the dominant entries
        torch.testing.assert_close(without.mean, expected.mean, rtol=0, atol=1e-10)
        assert without.source is None and without.weight is None


def test_float32_windows_agree_with_float64():
    """The float32 kernel (its own exp2 and sliding sums) against float64, late in sampling where logits span most."""
    dataset = random_dataset(1, 12, 12, count=40)
    x = noisy_batch(dataset, 0.05, seed=3)
    double = make_machine("bbels", dataset, dtype=torch.float64).posterior(x, 0.05, patch_size=5)
    single = make_machine("bbels", dataset, dtype=torch.float32).posterior(x.float(), 0.05, patch_size=5)
    torch.testing.assert_close(single.mean.double(), double.mean, rtol=0, atol=1e-4)
    torch.testing.assert_close(single.weight.double(), double.weight, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("isa", list(VECTOR_BYTES))
def test_every_instruction_set_equals_matrix_products(isa, dtype):
    """Each compiled instruction set that this processor runs (vectors of 2 to 16 lanes) gives the products' posterior."""
    dataset = random_dataset(3, 9, 8)
    products = make_machine("bbels", dataset, dtype=torch.float64, backend=ExactBackend(method="products"))
    tasks = window_tasks(dictionary_groups("bbels", 5, 9, 8), 8)
    for t in (0.1, 0.7):
        x = noisy_batch(dataset, t, seed=7)
        expected = products.posterior(x, t, patch_size=5)
        blocks = [LaneImages.from_images(dataset.images.to(dtype), 5, "zeros", isa)]
        mean, source, weight = window_posterior(x.to(dtype), blocks, tasks, alpha_bar(t), 5, "zeros")
        tolerance = 1e-10 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(mean.double(), expected.mean, rtol=0, atol=tolerance)
        assert torch.equal(source, expected.source)
        torch.testing.assert_close(weight.double(), expected.weight, rtol=0, atol=tolerance)


@pytest.mark.parametrize("threads", [2, 3, 7])
def test_threads_and_streamed_blocks_give_the_same_posterior(threads):
    """Threads fold disjoint lane groups (7 threads for at most 4 groups: some idle); a budget of one byte streams
    the images one lane group at a time; both equal one thread with every image at once."""
    dataset = random_dataset(1, 8, 8, count=3 * lanes(torch.float64) + 5)
    x = noisy_batch(dataset, 0.3, seed=5)
    one = make_machine("bbels", dataset, dtype=torch.float64).posterior(x, 0.3, patch_size=3)
    torch.set_num_threads(threads)
    try:
        for budget in (None, 1):
            options = {} if budget is None else {"memory_budget": budget}
            many = make_machine("bbels", dataset, dtype=torch.float64, **options).posterior(x, 0.3, patch_size=3)
            torch.testing.assert_close(many.mean, one.mean, rtol=0, atol=1e-12)
            assert torch.equal(many.source, one.source)
    finally:
        torch.set_num_threads(1)


def test_without_the_compiled_kernel_auto_uses_products(monkeypatch, labelled_dataset):
    x = noisy_batch(labelled_dataset, 0.5, seed=6)
    expected = make_machine("bbels", labelled_dataset, dtype=torch.float64).posterior(x, 0.5, patch_size=3)
    monkeypatch.setattr(patchdb.windows, "_windows", None)
    assert not patchdb.windows.compiled()
    got = make_machine("bbels", labelled_dataset, dtype=torch.float64).posterior(x, 0.5, patch_size=3)
    torch.testing.assert_close(got.mean, expected.mean, rtol=0, atol=1e-12)
    with pytest.raises(PatchdbError, match="compiled kernel is missing.*pip install -e"):
        make_machine("bbels", labelled_dataset, backend=ExactBackend(method="windows"))(x.float(), 0.5, patch_size=3)


def test_unknown_exact_method_is_a_clear_error():
    with pytest.raises(PatchdbError, match="unknown exact method 'fast'; choose one of auto, windows, products"):
        ExactBackend(method="fast")


def kernel_inputs(patch_size: int = 3, dtype=torch.float32):
    """Valid arguments of patchdb._windows.fold for one 8x8 query against one lane group of random images."""
    images = torch.rand(lanes(dtype), 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
    grouped = LaneImages.from_images(images, patch_size, "zeros")
    queries = padded_images(torch.rand(1, 1, 8, 8, dtype=dtype), patch_size, "zeros").contiguous()
    tasks = window_tasks(dictionary_groups("bbels", patch_size, 8, 8), 8)
    return queries, grouped, tasks, WindowState.empty(1, 1, 8, 8, dtype, lanes(dtype))


def fold_arguments(queries, grouped, tasks, state, patch_size=3):
    return [grouped.isa, queries.numpy(), grouped.images.numpy(), grouped.squared_norms.numpy(), tasks.numpy(),
            state.shift.numpy(), state.normaliser.numpy(), state.weighted.numpy(), state.best.numpy(),
            state.best_code.numpy(), 1.0, 0.5, patch_size, 0, True]


def test_the_kernel_refuses_tasks_outside_the_image():
    queries, grouped, tasks, state = kernel_inputs()
    for bad in ([0, 9, 0, 2, 0, 0], [2, 4, 2, 4, 5, 0], [0, 2, 1, 3, 0, -2], [3, 3, 0, 2, 0, 0]):
        arguments = fold_arguments(queries, grouped, torch.tensor([bad]), state)
        with pytest.raises(ValueError, match="task 0 .* leaves the 8x8 image"):
            patchdb.windows._windows.fold(*arguments)


def test_the_kernel_refuses_mismatched_buffers():
    queries, grouped, tasks, state = kernel_inputs()
    arguments = fold_arguments(queries, grouped, tasks, state)
    fold = patchdb.windows._windows.fold
    with pytest.raises(ValueError, match="images: dimension 3 is 1, expected 2"):
        fold(arguments[0], queries.expand(1, 2, -1, -1).contiguous().numpy(), *arguments[2:])
    with pytest.raises(ValueError, match="best_code: expected a contiguous 4-d array of format 'i'"):
        fold(*arguments[:9], state.best_code.long().numpy(), *arguments[10:])
    with pytest.raises(ValueError, match="images: expected a contiguous 5-d array of format 'f'"):
        fold(*arguments[:2], grouped.images.double().numpy(), *arguments[3:])
    with pytest.raises(ValueError, match="patch size 4 does not fit"):
        fold(*arguments[:12], 4, 0, True)
    with pytest.raises(ValueError, match="instruction set 'neon' is not compiled in or not supported here"):
        fold("neon", *arguments[1:])


def test_state_means_what_the_kernel_documents():
    """After one fold: best is each lane's largest logit and normaliser the lane's sum of 2^(logit - shift), in float64."""
    queries, grouped, tasks, state = kernel_inputs(dtype=torch.float64)
    tasks = tasks[:1]  # the interior at shift (-5, -5): pixel (6, 6) paired with the patch at (1, 1)
    patchdb.windows._windows.fold(*fold_arguments(queries, grouped, tasks, state))
    iy0, iy1, ix0, ix1, sy, sx = tasks[0].tolist()
    assert (iy0, iy1, ix0, ix1, sy, sx) == (6, 7, 6, 7, -5, -5)
    query = queries[0, 0, 6:9, 6:9].reshape(-1)  # padded coordinates: the window of pixel i starts at i
    keys = grouped.images[0, 1:4, 1:4, 0].permute(2, 0, 1).reshape(lanes(torch.float64), -1)
    logits = 1.0 * keys @ query - 0.5 * keys.square().sum(dim=1)  # c1 = 1, c2 = 0.5
    torch.testing.assert_close(state.best[0, 6, 6], logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(state.normaliser[0, 6, 6] * torch.exp2(state.shift[0, 6, 6]), torch.exp2(logits),
                               rtol=1e-14, atol=0)
    torch.testing.assert_close(state.weighted[0, 6, 6, 0] * torch.exp2(state.shift[0, 6, 6]), torch.exp2(logits) * keys[:, 4],
                               rtol=1e-14, atol=0)
    untouched = torch.ones(8, 8, dtype=torch.bool)
    untouched[6, 6] = False
    assert torch.isinf(state.best[0][untouched]).all() and (state.normaliser[0][untouched] == 0).all()


def test_lane_images_hold_the_padded_images_and_norms():
    width = lanes(torch.float64)
    images = torch.randn(width + 3, 2, 6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grouped = LaneImages.from_images(images, 3, "circular")
    assert grouped.images.shape == (2, 8, 7, 2, width) and grouped.squared_norms.shape == (2, 6, 5, width)
    padded = padded_images(images, 3, "circular")
    for n in (0, width - 1, width + 2):
        assert torch.equal(grouped.images[n // width, ..., n % width].permute(2, 0, 1), padded[n])
        patch_norm = padded[n, :, 2:5, 1:4].square().sum()  # the patch centred at (2, 1)
        assert grouped.squared_norms[n // width, 2, 1, n % width].item() == pytest.approx(patch_norm.item(), abs=1e-12)
    assert (grouped.images[1, ..., 3:] == 0).all() and torch.isinf(grouped.squared_norms[1, ..., 3:]).all()
