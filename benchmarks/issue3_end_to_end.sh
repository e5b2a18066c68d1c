#!/usr/bin/env bash
# Issue 3, results: cpu preset, Fashion-MNIST, class-conditional ResNet with zero padding:
# train, calibrate (bbELS, 10 trajectories, candidates 3..17, cosine), compare 100 seeds.
# Usage: PATCHDB_DATA=/work/shared/data benchmarks/issue3_end_to_end.sh [RUNS_DIR]   (default runs/)
# Each stage's wall time goes to RUNS_DIR/issue3-times.txt; a finished stage is resumed/skipped by the tools
# themselves (train resumes its checkpoint; delete RUN/scales.json to recalibrate).
set -euo pipefail
runs=${1:-runs}
run=$runs/fmnist-resnet-zeros-cond-cpu
patchdb() { python -c "from cli.main import main; main()" "$@"; }
stage() {
    local name=$1; shift
    local start=$(date +%s)
    "$@"
    echo "$name $(( $(date +%s) - start )) s (ended $(date -u +%H:%M:%S))" >> "$runs/issue3-times.txt"
}
mkdir -p "$runs"
stage train patchdb train --model resnet --dataset fashion-mnist --conditional --padding zeros --preset cpu --out "$run"
stage calibrate patchdb calibrate --model "$run" --machine bbels --candidates 3,5,...,17 --samples 10 --metric cos \
    --memory-gb 4 --out "$run/scales.json"
stage compare patchdb compare --model "$run" --machine bbels --num 100 --seed 0 --batch-size 20 --memory-gb 4 \
    --out "$runs/issue3-compare"
