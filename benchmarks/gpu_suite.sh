#!/usr/bin/env bash
# The GPU checks and figures, in one run on a machine with a CUDA GPU (a lent one has no internet):
#   benchmarks/gpu_suite.sh DATA_DIR OUT_DIR [SECONDS [STEPS]]
# DATA_DIR holds fashion-mnist/train-*-ubyte.gz; faiss must be importable. Within SECONDS (default 480),
# most important first, each step cut short when the time is spent:
#   1. the whole test suite, with the CUDA tests that CI skips;
#   2. the exact backend on the GPU: bbELS, paper scales, 20 steps, the first 1,000 images (1 sample),
#      all 60,000 (2 seeds, saved as exact references for bench_topk.py --exact-samples; 100 seeds
#      too when 2 took under a second each), class 0 (20 seeds, saved likewise), 1,000 images (16 samples);
#   3. the top-k backend against the exact one on the GPU, class 0, 20 seeds (store built on the CPU).
# STEPS: a regular expression; only the steps whose names match it run (default: all).
# Everything goes to OUT_DIR/gpu.log (JSON lines from the benchmarks) and OUT_DIR/*.pt.
set -uo pipefail
data=$1
out=$2
deadline=$(( $(date +%s) + ${3:-480} ))
only=${4:-.}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
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
python3 -c "import torch, faiss, h5py, numpy; print('torch', torch.__version__, torch.cuda.get_device_name(), 'faiss', faiss.__version__, 'numpy', numpy.__version__)"
exact=(python3 benchmarks/bench_exact.py run --device cuda --memory-gib 64 --data-dir "$data")
step tests 150 python3 -m pytest -q -p no:cacheprovider tests
step exact-60000-8 150 "${exact[@]}" --images 60000 --batch 8
step exact-1000 60 "${exact[@]}" --images 1000
step exact-60000-2 150 "${exact[@]}" --images 60000 --batch 2 --save "$out/exact-60k-2seeds.pt"
if python3 -c "import torch, sys; sys.exit(torch.load('$out/exact-60k-2seeds.pt')['seconds'] > 2.0)" 2>/dev/null; then
    step exact-60000-100 120 "${exact[@]}" --images 60000 --batch 100
fi
step exact-class0-20 120 "${exact[@]}" --label 0 --batch 20 --save "$out/exact-class0-20seeds.pt"
step exact-1000-16 60 "${exact[@]}" --images 1000 --batch 16
step topk-class0 250 python3 benchmarks/bench_topk.py --label 0 --seeds 20 --device cuda --memory-gib 48 --threads 0 \
    --data-dir "$data" --store-dir /tmp/stores --setting topk=4096,tol=1e-2,fallback=estimate --setting topk=16384,tol=1e-2,fallback=estimate --setting topk=65536,tol=1e-2,fallback=estimate \
    --out "$out/topk-class0-gpu.json"
echo "== done $(date +%T)"
