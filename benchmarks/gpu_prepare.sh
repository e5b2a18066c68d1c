#!/usr/bin/env bash
# Prepares, on this (CPU) machine, what benchmarks/gpu_suite.sh needs on a lent GPU machine that has no internet and
# no faiss: a faiss-cpu wheel for its Python 3.12 in .whl/ and Fashion-MNIST's training files in .gpu-data/, both
# kept out of git (.git/info/exclude). Usage, from the repository root: bash benchmarks/gpu_prepare.sh [DATA_DIR]
# (DATA_DIR holds fashion-mnist/train-*-ubyte.gz; default ../shared/data). Then one device call, carrying
# .whl and .gpu-data:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site \
#     PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True && bash benchmarks/gpu_suite.sh .gpu-data $OUT 480
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
data=${1:-../shared/data}
faiss_version=$(.venv/bin/python -c "import faiss; print(faiss.__version__)")
for path in /.whl/ /.gpu-data/; do grep -qxF "$path" .git/info/exclude || echo "$path" >> .git/info/exclude; done
mkdir -p .whl .gpu-data/fashion-mnist
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "faiss-cpu==$faiss_version"
cp "$data"/fashion-mnist/train-*-ubyte.gz .gpu-data/fashion-mnist/
du -sh .whl .gpu-data
