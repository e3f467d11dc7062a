#!/usr/bin/env bash
# The GPU visit as one command (issue #13). Two uses:
#
#   bash benchmarks/gpu_check.sh --fetch-wheels
#       here, with PyPI: downloads the CPython 3.12 x86_64 wheels qf needs beyond torch and Triton into
#       .gpu-wheels/ (git-ignored, ~54 MB: under the device tool's 64 MiB carry limit).
#   bash benchmarks/gpu_check.sh [--dry-run]
#       on the GPU machine (torch and Triton preinstalled, no internet), with .gpu-wheels carried along:
#       installs them offline, installs qf without dependencies, and runs benchmarks/gpu_check.py under a
#       7.5 minute limit; the markdown report goes to $OUT/gpu-report.md ($OUT: the device tool's folder,
#       else the current one). A failing step is reported and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu-wheels
# numba 0.61 / llvmlite 0.44: the newest pair whose wheels fit the carry limit (llvmlite 0.45+ is 56 MB alone);
# it needs numpy < 2.3 on the GPU machine (the report's first lines say which numpy it found).
PINNED="numba==0.61.2 llvmlite==0.44.0"
PKGS="numba llvmlite gguf pyyaml tqdm safetensors tokenizers sentencepiece jinja2 markupsafe click psutil"

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p "$WHEELS"
  pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform any -d "$WHEELS" $PINNED gguf pyyaml tqdm safetensors tokenizers sentencepiece jinja2 markupsafe \
    click psutil
  du -sh "$WHEELS"
  exit 0
fi

REPORT="${OUT:-.}/gpu-report.md"
if [ -d "$WHEELS" ]; then
  pip install -q --no-index --find-links "$WHEELS" --no-deps $PKGS 2>&1 | tail -3
fi
pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
python -c "import numpy, numba, torch; print('numpy', numpy.__version__, 'numba', numba.__version__, 'torch', torch.__version__)"
timeout 450 python benchmarks/gpu_check.py --out "$REPORT" "$@"
echo "gpu_check: exit $? - report at $REPORT"
