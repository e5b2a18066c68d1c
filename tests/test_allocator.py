"""retain_freed_memory: a step that frees and reallocates its temporaries takes no page faults for them again."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from patchdb.allocator import retain_freed_memory

REPO = Path(__file__).resolve().parents[1]
GLIBC = platform.libc_ver()[0] == "glibc"

# like a sampling step: 160 MB of temporaries of 20 MB each, freed together; faults counted after two such steps
STEPS = """
import resource
import torch
from patchdb.allocator import retain_freed_memory
assert retain_freed_memory()
def step():
    temporaries = [torch.ones(5 * 1024**2) for _ in range(8)]
    del temporaries
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def printed_count(script: str) -> int:
    """The number that script prints, run in a fresh interpreter (the allocator is set once per process)."""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout)


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's malloc's")
def test_retained_memory_is_reused_without_page_faults():
    # the four steps touch 640 MB (163,840 pages); without the setting, glibc faulted a quarter of them in again in
    # nine runs of ten (it hands the freed top of its heap back, unless a small block happens to lie above it)
    assert printed_count(STEPS) < 4 * 160 * 1024**2 / 4096 / 10


# a block larger than the heap's free top: mapped on its own, or (large_blocks) taken from the heap, which grows
MAPPED_BLOCKS = """
import ctypes
import torch
from patchdb.allocator import retain_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
assert retain_freed_memory(large_blocks={large_blocks})
before = mallinfo2().hblks
block = torch.empty(2 * 1024**3, dtype=torch.uint8)  # never touched: no memory is used
print(mallinfo2().hblks - before)
"""


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's malloc's")
@pytest.mark.parametrize("large_blocks, mapped", [(True, 0), (False, 1)])
def test_large_blocks_come_from_the_heap_if_asked(large_blocks, mapped):
    assert printed_count(MAPPED_BLOCKS.format(large_blocks=large_blocks)) == mapped


@pytest.mark.skipif(GLIBC, reason="on glibc the setting applies")
def test_elsewhere_nothing_is_set():
    assert retain_freed_memory() is False
