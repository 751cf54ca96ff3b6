#!/usr/bin/env bash
# `make benchmark`: CPU-sized `backbones`, `context` and `splits` experiments plus the ridge
# baseline on one cohort, then the report (benchmark.md / .csv / accuracy_vs_distance.png).
# Two streams run side by side with one thread each (2-core machine): backbones | the rest.
# Every setting below can be overridden from the environment, e.g. EPOCHS=20 SEEDS=0,1,2,3,4.
set -euo pipefail
PY=${PY:-.venv/bin/python}
COHORT=${COHORT:-data/phantom_default/cohort.yaml}
OUT=${OUT:-runs/benchmark/$(date +%Y-%m-%d_%H-%M-%S)}
EPOCHS=${EPOCHS:-10}            # same budget for every network
SEEDS=${SEEDS:-0,1,2}
POINTS=${POINTS:-150}           # probe points per distance per trained section
SECTIONS=${SECTIONS:-[mock_0_s0,infected_0_s0]}  # trained sections; other volumes are held out
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}

mkdir -p "$OUT"
COMMON=("data.manifest=$COHORT" "data.sections=$SECTIONS" data.num_workers=0 data.persistent_workers=false
        data.pin_memory=false figures=false "off_plane.n_points=$POINTS" "hydra.sweeper.params.seed=\"$SEEDS\"")
NET=("trainer.max_epochs=$EPOCHS" +trainer.enable_progress_bar=false "~callbacks.progress_bar"
     "~callbacks.model_summary" model.warmup_steps=20)

run() {  # run <experiment> [overrides...]
    local name=$1; shift
    "$PY" train.py -m "experiment=$name" "hydra.sweep.dir=$OUT/$name" "${COMMON[@]}" "$@" > "$OUT/$name.log" 2>&1 \
        || { echo "experiment $name failed; see $OUT/$name.log" >&2; return 1; }
    echo "$(date +%T) $name done"
}

started=$(date +%s)
run backbones "${NET[@]}" & a=$!
( run context "${NET[@]}" && run splits "${NET[@]}" && run ridge ) & b=$!
status=0
wait $a || status=1
wait $b || status=1
[ $status -eq 0 ] || exit 1
"$PY" -m xpression.evaluation.benchmark "$OUT/backbones" "$OUT/context" "$OUT/splits" "$OUT/ridge" --out "$OUT"
echo "benchmark wall time: $(( $(date +%s) - started )) s; report in $OUT"
