#!/usr/bin/env bash
# `make benchmark [BUDGET=cpu|gpu]`: the `context`, `backbones`, `splits` and `labels` experiments on one
# cohort, every run scored per volume with its baselines (2D extrusion, kNN, per-animal mean,
# features + ridge on the same patch) on one probe set, then the report (benchmark.md / .csv,
# comparisons.csv, accuracy_vs_distance.png; see xpression/evaluation/benchmark.py).
#
# BUDGET=cpu (default): sized for a 2-core CPU in about 45 minutes: 5 seeds, 8 epochs, the four
#   patch depths and two fields of view of `context`, the paper's network, the small 3D CNN and
#   the UNet of `backbones`, both `splits`, and both `labels` (truth vs programs fitted from
#   counts). Two streams run side by side with one thread each; the paper's network (the
#   costliest row, about 520 CPU s per seed against about 385 for all the others together) is
#   split between them by seed so both end together.
# BUDGET=gpu: one GPU: 10 seeds, 30 epochs, every backbone, the paper's end-to-end recipe
#   (`experiment=paper`), 300 probe points per distance; one stream.
# Every setting below can be overridden from the environment, e.g. EPOCHS=20 SEEDS=0,1,2,3,4,5,6;
# EXTRA adds overrides to every run. For `context`: CONTEXT_BUFFER_UM (default 400, its widest
# patch): training spots within it of a held-out spatial block are dropped for every row;
# CONTEXT_PATCHES (default: the experiment's six) the patches (depth,height,width um) to sweep.
# A wiring check in minutes on the tiny phantom (not a benchmark): its sections are about 1 mm
# across, so a 400 um buffer, or a 400 um wide patch (which must not overlap a held-out one),
# leaves no training spots there; 205 um patches and a 100 um buffer leave some:
#   .venv/bin/python -m xpression.phantom --out data/phantom_tiny --preset tiny --seed 0 --quiet
#   COHORT=data/phantom_tiny/cohort.yaml SEEDS=0 EPOCHS=1 EXTRA="++trainer.limit_train_batches=2" \
#     CONTEXT_BUFFER_UM=100 CONTEXT_PATCHES="[6.4,205,205],[34,205,205],[134.4,205,205],[34,100,100]" \
#     bash benchmarks/run_benchmark.sh
case "${1:-}" in
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;  # the header above
    "") ;;
    *) echo "error: $(basename "$0") takes no arguments (settings are environment variables; see --help)" >&2; exit 2 ;;  # not a run started by a typo
esac
set -euo pipefail
PY=${PY:-.venv/bin/python}
COHORT=${COHORT:-data/phantom_default/cohort.yaml}
OUT=${OUT:-runs/benchmark/$(date +%Y-%m-%d_%H-%M-%S)}
BUDGET=${BUDGET:-cpu}
CONTEXT_BUFFER_UM=${CONTEXT_BUFFER_UM:-400}
CONTEXT_PATCHES=${CONTEXT_PATCHES:-}
case "$BUDGET" in
  cpu) : "${EPOCHS:=8}" "${SEEDS:=0,1,2,3,4}" "${POINTS:=150}" "${TRAINER:=cpu}" "${STREAMS:=2}" "${PAPER_RECIPE:=0}"
       : "${BACKBONES:=cnn3d,unet}" ;;
  gpu) : "${EPOCHS:=30}" "${SEEDS:=0,1,2,3,4,5,6,7,8,9}" "${POINTS:=300}" "${TRAINER:=gpu}" "${STREAMS:=1}" "${PAPER_RECIPE:=1}"
       : "${BACKBONES:=cnn3d,timm_resnet18,timm_convnext_atto,timm_vit_tiny,unet}" ;;
  *) echo "BUDGET must be cpu or gpu, got '$BUDGET'" >&2; exit 2 ;;
esac
[ -f "$COHORT" ] || { echo "cohort manifest $COHORT not found (COHORT=...)" >&2; exit 2; }
if [ "$TRAINER" = cpu ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}; fi

mkdir -p "$OUT"
source "$(dirname "$0")/benchmark_args.sh"  # COMMON and NET

run() {  # run <experiment> <folder> <seeds> [overrides...]; wall and CPU seconds go to <folder>.time
    local name=$1 dir=$2 seeds=$3; shift 3
    local TIMEFORMAT="%R s wall, %U s user, %S s sys"
    { time "$PY" train.py -m "experiment=$name" "hydra.sweep.dir=$OUT/$dir" "${COMMON[@]}" \
        "hydra.sweeper.params.seed=\"$seeds\"" "$@" > "$OUT/$dir.log" 2>&1 ; } \
        2> "$OUT/$dir.time" || {
            echo "experiment $name failed; see $OUT/$dir.log" >&2
            if [ "$name" = context ] && grep -q "split leaves no train spots" "$OUT/$dir.log"; then
                echo "  its split leaves no training spots on this cohort's sections (buffer CONTEXT_BUFFER_UM=$CONTEXT_BUFFER_UM um," \
                     "patches CONTEXT_PATCHES=${CONTEXT_PATCHES:-unset}): a small cohort such as the tiny phantom" \
                     "needs a smaller buffer and patches no wider than 205 um (see the wiring check atop $0)" >&2
            fi
            return 1; }
    echo "$(date +%T) $dir done: $(cat "$OUT/$dir.time")"
}

# The paper's network: its first seeds in stream A with `splits`, the rest in stream B with
# `context`, the other backbones and `labels` (about 4 / 5 of its seeds in A balances the two on a CPU).
IFS=, read -r -a SEED_LIST <<< "$SEEDS"
n_a=$(( (4 * ${#SEED_LIST[@]} + 4) / 5 ))
[ "$STREAMS" -ge 2 ] || n_a=${#SEED_LIST[@]}
PAPER_A=$(IFS=,; echo "${SEED_LIST[*]:0:n_a}")
PAPER_B=$(IFS=,; echo "${SEED_LIST[*]:n_a}")
PAPER_NET=(backbones "${NET[@]}" hydra.sweeper.params.model=cnn3d_paper)
stream_a() {
    run "${PAPER_NET[0]}" backbones_paper_a "$PAPER_A" "${PAPER_NET[@]:1}" \
    && run splits splits "$SEEDS" "${NET[@]}"
}
stream_b() {
    { [ -z "$PAPER_B" ] || run "${PAPER_NET[0]}" backbones_paper_b "$PAPER_B" "${PAPER_NET[@]:1}"; } \
    && run context context "$SEEDS" "${NET[@]}" "split.buffer_um=$CONTEXT_BUFFER_UM" \
           ${CONTEXT_PATCHES:+"patch.size_um=$CONTEXT_PATCHES"} \
    && run backbones backbones "$SEEDS" "${NET[@]}" "hydra.sweeper.params.model=\"$BACKBONES\"" \
    && run labels labels "$SEEDS" "${NET[@]}" \
    && if [ "$PAPER_RECIPE" = 1 ]; then run paper paper "$SEEDS"; fi
}
FOLDERS=(backbones_paper_a context backbones splits labels)
[ -n "$PAPER_B" ] && FOLDERS+=(backbones_paper_b)
[ "$PAPER_RECIPE" = 1 ] && FOLDERS+=(paper)

started=$(date +%s)
if [ "$STREAMS" -ge 2 ]; then
    stream_a & a=$!
    stream_b & b=$!
    status=0
    wait $a || status=1
    wait $b || status=1
    [ $status -eq 0 ] || exit 1
else
    stream_a && stream_b
fi
"$PY" -m xpression.evaluation.benchmark "${FOLDERS[@]/#/$OUT/}" --out "$OUT" > "$OUT/report.log"
echo "benchmark ($BUDGET budget) wall time: $(( $(date +%s) - started )) s; report in $OUT/benchmark.md"
