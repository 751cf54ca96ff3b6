#!/usr/bin/env bash
# The benchmark's 3D-vs-2D question on a cohort whose first lesion is placed 60-150 um off every
# section (`--param lesion_placement=off_plane`) instead of anywhere (the benchmark preset's
# `uniform`): the `context` depths at the 205 um field of view, scored per volume beside the
# no-CT baselines on the same probe set as `make benchmark`, then one report. Off-plane placement
# hides the lesion from the section, so it is the case where depth should matter most.
#   benchmarks/lesion_placement.sh            (about 15 CPU-minutes per seed on a 2-core CPU)
# Settings as `benchmarks/run_benchmark.sh` (EPOCHS, SEEDS, POINTS, OUT, EXTRA).
case "${1:-}" in
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;  # the header above
    "") ;;
    *) echo "error: $(basename "$0") takes no arguments (settings are environment variables; see --help)" >&2; exit 2 ;;  # not a run started by a typo
esac
set -euo pipefail
PY=${PY:-.venv/bin/python}
COHORT=${COHORT:-data/phantom_benchmark_offplane/cohort.yaml}
OUT=${OUT:-runs/lesion_placement/$(date +%Y-%m-%d_%H-%M-%S)}
EPOCHS=${EPOCHS:-8}
SEEDS=${SEEDS:-0,1,2,3,4}
POINTS=${POINTS:-150}
TRAINER=cpu
DEPTHS=${DEPTHS:-"[6.4,205,205],[57.6,205,205],[134.4,205,205]"}
if [ ! -f "$COHORT" ]; then
    "$PY" -m xpression.phantom --out "$(dirname "$COHORT")" --preset benchmark --seed 0 \
        --param lesion_placement=off_plane --quiet
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
mkdir -p "$OUT"
source "$(dirname "$0")/benchmark_args.sh"  # COMMON and NET, as make benchmark
"$PY" train.py -m experiment=context "hydra.sweep.dir=$OUT/context" "${COMMON[@]}" "${NET[@]}" \
    "hydra.sweeper.params.seed=\"$SEEDS\"" "patch.size_um=$DEPTHS" \
    > "$OUT/context.log" 2>&1 || { echo "context failed; see $OUT/context.log" >&2; exit 1; }
"$PY" -m xpression.evaluation.benchmark "$OUT/context" --out "$OUT" > "$OUT/report.log"
echo "report in $OUT/benchmark.md"
