#!/usr/bin/env bash
# `make benchmark`: CPU-sized `backbones`, `context` and `splits` experiments plus the ridge
# baseline on one cohort, then the report (benchmark.md / .csv / accuracy_vs_distance.png).
# Two streams run side by side with one thread each (2-core machine), about equally long: the
# paper's network (the costliest backbone) | the other backbones, context, splits, ridge.
# Every setting below can be overridden from the environment, e.g. EPOCHS=20 SEEDS=0,1,2,3,4.
set -euo pipefail
PY=${PY:-.venv/bin/python}
COHORT=${COHORT:-data/phantom_default/cohort.yaml}
OUT=${OUT:-runs/benchmark/$(date +%Y-%m-%d_%H-%M-%S)}
EPOCHS=${EPOCHS:-8}             # same budget for every network
SEEDS=${SEEDS:-0,1,2}
POINTS=${POINTS:-150}           # probe points per distance per trained section
SECTIONS=${SECTIONS:-[mock_0_s0,infected_0_s0]}  # trained sections; other volumes are held out
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}

mkdir -p "$OUT"
COMMON=("data.manifest=$COHORT" "data.sections=$SECTIONS" data.num_workers=0 data.persistent_workers=false
        data.pin_memory=false figures=false "off_plane.n_points=$POINTS" "hydra.sweeper.params.seed=\"$SEEDS\"")
NET=("trainer.max_epochs=$EPOCHS" +trainer.enable_progress_bar=false "~callbacks.progress_bar"
     "~callbacks.model_summary" model.warmup_steps=20)

run() {  # run <experiment> <folder> [overrides...]
    local name=$1 dir=$2; shift 2
    "$PY" train.py -m "experiment=$name" "hydra.sweep.dir=$OUT/$dir" "${COMMON[@]}" "$@" > "$OUT/$dir.log" 2>&1 \
        || { echo "experiment $name failed; see $OUT/$dir.log" >&2; return 1; }
    echo "$(date +%T) $dir done"
}

started=$(date +%s)
run backbones backbones_paper "${NET[@]}" hydra.sweeper.params.model=cnn3d_paper & a=$!
( run backbones backbones "${NET[@]}" 'hydra.sweeper.params.model="cnn3d,timm_resnet18,timm_convnext_atto,timm_vit_tiny,unet"' \
  && run context context "${NET[@]}" && run splits splits "${NET[@]}" && run ridge ridge ) & b=$!
status=0
wait $a || status=1
wait $b || status=1
[ $status -eq 0 ] || exit 1
"$PY" -m xpression.evaluation.benchmark "$OUT/backbones_paper" "$OUT/backbones" "$OUT/context" "$OUT/splits" "$OUT/ridge" --out "$OUT"
echo "benchmark wall time: $(( $(date +%s) - started )) s; report in $OUT"
