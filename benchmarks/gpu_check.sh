#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): run from anywhere on a CUDA machine with torch preinstalled.
#   bash benchmarks/gpu_check.sh          # $OUT, if set, receives gpu_check.json and gpu_check.log
# Installing the extras may fail where pip cannot reach the internet: the check then uses what is installed
# (projidx itself from this checkout through PYTHONPATH) and says which parts it could not run.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not available"
timeout 90 "$PY" -m pip install -q -e ".[gpu,test]" >"$OUT/pip.log" 2>&1 \
  || echo "pip install -e .[gpu,test] failed (see $OUT/pip.log); continuing with what is installed"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 270 "$PY" benchmarks/gpu_check.py --out "$OUT/gpu_check.json" "$@" \
  2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
