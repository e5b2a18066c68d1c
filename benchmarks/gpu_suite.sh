#!/usr/bin/env bash
# The GPU checks and figures, in one run on a machine with a CUDA GPU (a lent one has no internet):
#   benchmarks/gpu_suite.sh DATA_DIR OUT_DIR [SECONDS [STEPS]]
# DATA_DIR holds fashion-mnist/train-*-ubyte.gz; torch (CUDA), Triton, faiss, h5py and click must be importable.
# Within SECONDS (default 480), most important first, each step cut short when the time is spent:
#   1. the GPU tests that CI skips (the fused kernel against a direct posterior; machines, CLI and the indexed
#      backend on CUDA against the CPU);
#   2. the fused kernel alone (benchmarks/bench_fused.py: each configuration at each patch size, against products);
#   3. the exact backend on the GPU, bbELS, paper scales, 20 steps: 1,000 images, 8 samples, with the fused
#      method and with matrix products (their ratio and agreement); all 60,000 images, 100 samples (fused);
#      class 0, 20 seeds (fused); each saved as OUT_DIR/exact-*.pt for comparison with the CPU's exact samples;
#   4. the whole test suite; 5. the top-k backend on the GPU, class 0, 20 seeds (store built on the CPU).
# On a lent machine without faiss (this workplace's): carry a faiss-cpu wheel in .whl and the two train files in
# .gpu-data/fashion-mnist (benchmarks/gpu_prepare.sh puts both there), then: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bash benchmarks/gpu_suite.sh .gpu-data $OUT 480
# STEPS: a regular expression; only the steps whose names match it run (default: all).
# Everything goes to OUT_DIR/gpu.log (JSON lines from the benchmarks) and OUT_DIR/*.pt.
set -uo pipefail
data=$1
out=$2
deadline=$(( $(date +%s) + ${3:-480} ))
only=${4:-.}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PATCHDB_DATA="$data"
exec > >(tee -a "$out/gpu.log") 2>&1

step() {  # step NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds (less if the deadline is nearer)
    local name=$1 limit=$2 left=$(( deadline - $(date +%s) ))
    shift 2
    [[ $name =~ $only ]] || return 0
    (( left < limit )) && limit=$left
    if (( limit < 10 )); then echo "== $name: skipped, no time left"; return 1; fi
    echo "== $(date +%T) $name (at most ${limit} s): $*"
    local start=$SECONDS
    timeout "$limit" "$@"
    local status=$?
    echo "== $name: exit $status after $(( SECONDS - start )) s"
    return $status
}

nvidia-smi -L
python3 -c "import torch, triton, faiss, h5py, numpy; print('torch', torch.__version__, torch.cuda.get_device_name(), 'triton', triton.__version__, 'faiss', faiss.__version__, 'numpy', numpy.__version__)"
python3 setup.py -q build_ext --inplace > "$out/build.log" 2>&1 &  # the CPU kernels, for the CPU side of the tests
build=$!
exact=(python3 benchmarks/bench_exact.py run --device cuda --memory-gib 72 --data-dir "$data")  # 72 GiB: every scale's dictionaries at 60,000 images stay cached, within an H100's 80 GB (the peak is reported)
step gpu-tests 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_fused.py tests/test_machines.py tests/test_cli.py tests/test_store.py -k "fused or gpu"
wait "$build"
step fused-kernels 90 sh -c "python3 benchmarks/bench_fused.py time --images 3000 --batch 100 | tee '$out/fused-kernels.jsonl'"
step exact-1000-8-fused 40 "${exact[@]}" --images 1000 --batch 8 --method fused --save "$out/exact-1000-8-fused.pt"
step exact-1000-8-products 60 "${exact[@]}" --images 1000 --batch 8 --method products --save "$out/exact-1000-8-products.pt"
step exact-60000-100 200 "${exact[@]}" --images 60000 --batch 100 --method fused --progress --profile-step 2 --save "$out/exact-60k-100-fused.pt"
step exact-class0-20 60 "${exact[@]}" --label 0 --batch 20 --method fused --save "$out/exact-class0-20-fused.pt"
step tests 150 python3 -m pytest -q -p no:cacheprovider tests
step topk-class0 250 python3 benchmarks/bench_topk.py --label 0 --seeds 20 --device cuda --memory-gib 48 --threads 0 \
    --data-dir "$data" --store-dir /tmp/stores --setting topk=4096,tol=1e-2,fallback=estimate --setting topk=16384,tol=1e-2,fallback=estimate \
    --out "$out/topk-class0-gpu.json"
echo "== done $(date +%T)"
