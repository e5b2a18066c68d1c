#!/usr/bin/env bash
# Issue 3, results: cpu preset, Fashion-MNIST, class-conditional ResNet with zero padding:
# train, calibrate bbELS (cosine, candidates 3..17), compare 100 seeds, then summarise.
# Usage: PATCHDB_DATA=/work/shared/data benchmarks/issue3_end_to_end.sh [RUNS_DIR] [CALIBRATION_SAMPLES]
#   RUNS_DIR defaults to runs/ (git-ignored); CALIBRATION_SAMPLES to 10 (the paper's method).
# Each stage's wall time goes to RUNS_DIR/issue3-times.txt and the medians to RUNS_DIR/issue3-results.md.
# Stages resume: train continues its checkpoint (a finished run returns at once).
set -euo pipefail
runs=${1:-runs}
samples=${2:-10}
run=$runs/fmnist-resnet-zeros-cond-cpu
patchdb() { python -c "from cli.main import main; main()" "$@"; }
stage() {
    local name=$1; shift
    local start=$(date +%s)
    "$@"
    echo "$name $(( $(date +%s) - start )) s (ended $(date -u +%H:%M:%S) UTC)" >> "$runs/issue3-times.txt"
}
mkdir -p "$runs"
stage train patchdb train --model resnet --dataset fashion-mnist --conditional --padding zeros --preset cpu --out "$run"
stage calibrate patchdb calibrate --model "$run" --machine bbels --candidates 3,5,...,17 --samples "$samples" \
    --metric cos --memory-gb 4 --out "$run/scales.json"
stage compare patchdb compare --model "$run" --machine bbels --num 100 --seed 0 --batch-size 20 --memory-gb 4 \
    --out "$runs/issue3-compare"
python - "$runs" <<'PY'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
report = json.loads((runs / "issue3-compare" / "compare.json").read_text())
lines = [f"scales ({report['scales_source']}): {report['scales']}", "",
         "| model vs network | median r | r quartiles | median R^2 | median MSE | seconds |", "| --- | --- | --- | --- | --- | --- |"]
for name, stats in report["summary"].items():
    r = stats["pearson_r"]
    lines.append(f"| {name} | {r['median']:.3f} | {r['q1']:.3f} - {r['q3']:.3f} | {stats['r_squared']['median']:.3f} "
                 f"| {stats['mse']['median']:.4f} | {report['seconds'][name]:.0f} |")
lines += ["", f"fraction of seeds where bbels beats IS: {report['fraction_bbels_beats_is']:.2f}",
          f"network sampling: {report['seconds']['network']:.0f} s", "", (runs / "issue3-times.txt").read_text()]
(runs / "issue3-results.md").write_text("\n".join(lines))
print("\n".join(lines))
PY
