#!/usr/bin/env bash
# Every GPU figure of the project in one run, on a bare GPU machine (see benchmarks/gpu_check.py).
#
#   benchmarks/gpu_check.sh               # from the repository root; results in $OUT (default gpu_check_out/)
#   benchmarks/gpu_check.sh --cpu-smoke   # every stage tiny on the CPU (what the tests run)
#
# The GPU image lacks some of the project's dependencies: they travel as wheels in .whl/
# (fetched beforehand with ../shared/device/fetch-wheels.sh, see README "GPU check") and are
# installed into /tmp/site here. Nothing is downloaded.
set -uo pipefail
export PYTHONUNBUFFERED=1
# pandas 3 (string dtype) with anndata: allow writing the phantom's string indices
export ANNDATA_ALLOW_WRITE_NULLABLE_STRINGS=1
OUT=${OUT:-$PWD/gpu_check_out}
PY=${PY:-python3}
mkdir -p "$OUT"
if [ "${1:-}" != "--cpu-smoke" ] && compgen -G ".whl/*.whl" > /dev/null; then
  t0=$(date +%s)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -5 | tee -a "$OUT/gpu_check.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "installing .whl/ failed" | tee -a "$OUT/gpu_check.txt"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
  echo "wheels installed in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/gpu_check.txt"
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi > /dev/null && nvidia-smi -L 2>&1 | tee -a "$OUT/gpu_check.txt"
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1 | tee -a "$OUT/gpu_check.txt"
OUT=$OUT "$PY" benchmarks/gpu_check.py --out "$OUT" "$@"
