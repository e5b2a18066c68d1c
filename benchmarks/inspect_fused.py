"""Compile the fused kernel (patchdb.fused) for a Hopper GPU without one, and read its machine code: per configuration
and depth block, the shared memory, registers, spills (local stores), tensor-core instructions (HGMMA) and the waits
between them. Needs Triton installed (it brings ptxas and cuobjdump); no GPU.

    python benchmarks/inspect_fused.py
"""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from patchdb import fused  # noqa: E402

SIGNATURE = {"query_ptr": "*fp16", "key_ptr": "*fp16", "norm_bias_ptr": "*fp32", "log_multiplicity_ptr": "*fp32",
             "value_ptr": "*fp32", "max_ptr": "*fp32", "normaliser_ptr": "*fp32", "weighted_ptr": "*fp32",
             "best_ptr": "*fp32", "best_entry_ptr": "*i64",
             "num_rows": "i32", "num_entries": "i32", "depth": "i32", "low_offset": "i32", "entries_per_split": "i32",
             "scale": "fp32", "negligible_bits": "fp32", "CHANNELS": "constexpr", "CHANNELS_PADDED": "constexpr",
             "BLOCK_ROWS": "constexpr", "BLOCK_ENTRIES": "constexpr", "BLOCK_DEPTH": "constexpr"}
ALIGNED = list(range(10)) + [12, 13, 14]
"""The arguments a real launch specialises as multiples of 16: the pointers, depth, low_offset, entries_per_split."""


def main() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    attrs = {(index,): [["tt.divisibility", 16]] for index in ALIGNED}
    for rows, entries, warps, stages in fused.CONFIGS:
        for depth_block in (32, 64):
            constants = {"CHANNELS": 1, "CHANNELS_PADDED": 2, "BLOCK_ROWS": rows, "BLOCK_ENTRIES": entries,
                         "BLOCK_DEPTH": depth_block}
            compiled = triton.compile(ASTSource(fused._kernel(), SIGNATURE, constants, attrs=attrs),
                                      target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                cubin.write(compiled.asm["cubin"])
                cubin.flush()
                sass = subprocess.run([tools / "cuobjdump", "-sass", cubin.name],
                                      capture_output=True, text=True, check=True).stdout
                usage = subprocess.run([tools / "cuobjdump", "-res-usage", cubin.name],
                                       capture_output=True, text=True, check=True).stdout
            registers = re.search(r"REG:(\d+)", usage)
            print(json.dumps({"config": [rows, entries, warps, stages], "depth_block": depth_block,
                              "shared_kib": compiled.metadata.shared // 1024,
                              "registers": int(registers.group(1)) if registers else None,
                              "spill_stores": len(re.findall(r"\bSTL\b", sass)), "hgmma": sass.count("HGMMA"),
                              "hgmma_waits": sass.count("WARPGROUP.DEPBAR.LE gsb0, 0x0"),
                              "async_copies": compiled.asm["ttgir"].count("async_copy_global_to_local")}))


if __name__ == "__main__":
    main()
