#!/usr/bin/env bash
# Issue 3, results: cpu preset, Fashion-MNIST, class-conditional network (ResNet or UNet) with zero padding:
# train, calibrate bbELS (cosine, candidates 3..17 unless given), compare 100 seeds (with the single-step agreement on
# 100 held-out test images), then summarise.
# Usage: PATCHDB_DATA=/work/shared/data benchmarks/issue3_end_to_end.sh [RUNS_DIR] [CALIBRATION_SAMPLES] [MODEL] [TRAIN_SEED] [CANDIDATES]
#   RUNS_DIR defaults to runs/ (git-ignored); CALIBRATION_SAMPLES to 10 (the paper's method); MODEL to resnet (or unet);
#   TRAIN_SEED (train --seed: initial weights, shuffles, times and noise) to 0; CANDIDATES (calibrate --candidates) to
#   3,5,...,17, the setting of the runs recorded before calibrate's per-architecture defaults.
# Each stage's wall time goes to RUNS_DIR/issue3-MODEL-times.txt and the medians to RUNS_DIR/issue3-MODEL-results.md
# (for resnet: RUNS_DIR/issue3-times.txt and issue3-results.md, the names of the first runs); a TRAIN_SEED other than
# 0 adds -seedS to every name, and CANDIDATES other than 3,5,...,17 add -cLARGEST to the schedule's and the
# comparison's names (the same trained network is calibrated again). The 100 compared noise seeds are 0..99 whatever TRAIN_SEED is.
# Stages resume: train continues its checkpoint (a finished run returns at once).
set -euo pipefail
runs=${1:-runs}
samples=${2:-10}
model=${3:-resnet}
train_seed=${4:-0}
candidates=${5:-3,5,...,17}
case $model in
    resnet) suffix= ;;
    unet) suffix=-unet ;;
    *) echo "MODEL must be resnet or unet, got $model" >&2; exit 2 ;;
esac
seed_suffix=$([ "$train_seed" = 0 ] || echo "-seed$train_seed")
candidates_suffix=$([ "$candidates" = 3,5,...,17 ] || echo "-c${candidates##*,}")
suffix=$suffix$seed_suffix$candidates_suffix
run=$runs/fmnist-$model-zeros-cond-cpu$seed_suffix
compare=$runs/issue3-compare$suffix
times=$runs/issue3$suffix-times.txt
patchdb() { python -c "from cli.main import main; main()" "$@"; }
stage() {
    local name=$1; shift
    local start=$(date +%s)
    "$@"
    echo "$name $(( $(date +%s) - start )) s (ended $(date -u +%H:%M:%S) UTC)" >> "$times"
}
mkdir -p "$runs"
stage train patchdb train --model "$model" --dataset fashion-mnist --conditional --padding zeros --preset cpu --seed "$train_seed" --out "$run"
schedule=$run/scales$candidates_suffix.json
stage calibrate patchdb calibrate --model "$run" --machine bbels --candidates "$candidates" --samples "$samples" \
    --metric cos --memory-gb 4 --out "$schedule"
stage compare patchdb compare --model "$run" --machine bbels --scales "$schedule" --num 100 --seed 0 --batch-size 20 \
    --memory-gb 4 --single-step --out "$compare"
python - "$compare" "$times" "$runs/issue3$suffix-results.md" <<'PY'
import json, sys
from pathlib import Path
compare, times, results = map(Path, sys.argv[1:])
report = json.loads((compare / "compare.json").read_text())
lines = [f"network: {report['network']}", f"scales ({report['scales_source']}): {report['scales']}", "",
         "| model vs network | median r | r quartiles | median R^2 | median MSE | seconds |", "| --- | --- | --- | --- | --- | --- |"]
for name, stats in report["summary"].items():
    r = stats["pearson_r"]
    lines.append(f"| {name} | {r['median']:.3f} | {r['q1']:.3f} - {r['q3']:.3f} | {stats['r_squared']['median']:.3f} "
                 f"| {stats['mse']['median']:.4f} | {report['seconds'][name]:.0f} |")
lines += ["", f"fraction of seeds where bbels beats IS: {report['fraction_bbels_beats_is']:.2f}",
          f"network sampling: {report['seconds']['network']:.0f} s"]
if "single_step" in report:
    agreement = report["single_step"]
    names = [name for name in agreement if name not in ("dataset", "t")]
    lines += ["", f"single-step agreement with the network's score on {agreement['dataset']} (median r):", "",
              "| t | " + " | ".join(names) + " |", "| --- " * (len(names) + 1) + "|"]
    lines += [f"| {t:.2f} | " + " | ".join(f"{agreement[name]['median'][i]:.3f}" for name in names) + " |"
              for i, t in enumerate(agreement["t"])]
lines += ["", times.read_text()]
results.write_text("\n".join(lines))
print("\n".join(lines))
PY
