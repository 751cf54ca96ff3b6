#!/usr/bin/env bash
# Candidates for the default recipe at `make run`'s scale, on the default cohort (one section,
# infected_0_s0), each candidate over SEEDS, scored by the off-plane probe (planes 150-250 um from
# the section and the two unseen animals) beside the no-CT baselines, then one report
# (benchmark.md, paired differences with intervals). Candidates (a subset with RECIPES="..."):
#   cnn3d       the small 3D CNN on the 34 x 205 x 205 um patch, up to 30 epochs, early stopping
#               after 5 without progress (the former default; so are the budgets not named below)
#   multiscale  the same + a second cnn3d on a context view 3x as wide (102 x 615 x 615 um)
#   cnn3d_long  cnn3d, up to 60 epochs, early stopping after 15 epochs without progress (not 5)
#   cnn3d_ema   cnn3d, validated and saved with an exponential moving average of its weights (0.99)
#   cnn3d_deep  cnn3d on a 57.6 um deep patch (9 slices, not 5)
#   ms_deep     multiscale on the 57.6 um deep patch (context 172.8 x 615 x 615 um)
#   ms_long     multiscale, up to 60 epochs, patience 15
#   cnn3d_xlong cnn3d, up to 150 epochs, patience 30
#   ms_xlong    multiscale, up to 150 epochs, patience 30
#   ms_deep_long  multiscale on the 57.6 um deep patch, up to 60 epochs, patience 15
#   forest      model=forest (filter bank with signed distances + extremely randomised trees, its
#               preset's context view), fitted once
# forest is train.py's default recipe and make run's; ms_xlong the network recipe before it, cnn3d_xlong
# make run's before that (README "The default recipe").
# On a 2-core CPU: 17 s (cnn3d) to 80 s (ms_deep_long) per seed; all ten, 5 seeds: 28 min.
# REUSE=1: keep a candidate whose folder already holds runs (add candidates to an earlier OUT).
case "${1:-}" in
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;  # the header above
    "") ;;
    *) echo "error: $(basename "$0") takes no arguments (settings are environment variables; see --help)" >&2; exit 2 ;;  # not a run started by a typo
esac
set -euo pipefail
PY=${PY:-.venv/bin/python}
COHORT=${COHORT:-data/phantom_default/cohort.yaml}
OUT=${OUT:-runs/default_recipe/$(date +%Y-%m-%d_%H-%M-%S)}
SEEDS=${SEEDS:-0,1,2,3,4}
RECIPES=${RECIPES:-cnn3d cnn3d_xlong ms_xlong forest}  # former defaults and train.py's (forest)
mkdir -p "$OUT"
SHORT="trainer.max_epochs=30 callbacks.early_stopping.patience=5"
recipe() {
    case $1 in
        cnn3d) echo model=cnn3d patch.context_um=null $SHORT ;;
        multiscale) echo model=multiscale_cnn3d "patch.context_um=[102,615,615]" $SHORT ;;
        cnn3d_long) echo model=cnn3d patch.context_um=null trainer.max_epochs=60 callbacks.early_stopping.patience=15 ;;
        cnn3d_ema) echo model=cnn3d patch.context_um=null model.ema_decay=0.99 $SHORT ;;
        cnn3d_deep) echo model=cnn3d patch.context_um=null "patch.size_um=[57.6,205,205]" $SHORT ;;
        ms_deep) echo model=multiscale_cnn3d "patch.size_um=[57.6,205,205]" "patch.context_um=[172.8,615,615]" $SHORT ;;
        ms_long) echo model=multiscale_cnn3d "patch.context_um=[102,615,615]" trainer.max_epochs=60 callbacks.early_stopping.patience=15 ;;
        cnn3d_xlong) echo model=cnn3d patch.context_um=null trainer.max_epochs=150 callbacks.early_stopping.patience=30 ;;
        ms_xlong) echo model=multiscale_cnn3d "patch.context_um=[102,615,615]" trainer.max_epochs=150 callbacks.early_stopping.patience=30 ;;
        ms_deep_long) echo model=multiscale_cnn3d "patch.size_um=[57.6,205,205]" "patch.context_um=[172.8,615,615]" trainer.max_epochs=60 callbacks.early_stopping.patience=15 ;;
        forest) echo model=forest ;;
        *) echo "unknown recipe '$1'" >&2; return 1 ;;
    esac
}
started=$(date +%s)
dirs=()
for name in $RECIPES; do
    if [ -d "$OUT/$name" ] && [ "$(find "$OUT/$name" -name metrics.json | wc -l)" -gt 0 ] && [ -n "${REUSE:-}" ]; then
        echo "$(date +%T) $name: reusing $OUT/$name"; dirs+=("$OUT/$name"); continue
    fi
    read -r -a args <<< "$(recipe "$name")"
    t0=$(date +%s)
    "$PY" train.py -m "hydra.sweep.dir=$OUT/$name" "data.manifest=$COHORT" +off_plane=probe figures=false \
        "seed=$SEEDS" ++trainer.enable_progress_bar=false "~callbacks.progress_bar" "~callbacks.model_summary" \
        "${args[@]}" ${EXTRA:-} > "$OUT/$name.log" 2>&1 || { echo "$name failed; see $OUT/$name.log" >&2; exit 1; }
    echo "$(date +%T) $name done in $(( $(date +%s) - t0 )) s"
    dirs+=("$OUT/$name")
done
"$PY" -m xpression.evaluation.benchmark "${dirs[@]}" --out "$OUT" > "$OUT/report.log" 2>&1
echo "default recipe wall time: $(( $(date +%s) - started )) s; report in $OUT/benchmark.md"
