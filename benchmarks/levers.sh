#!/usr/bin/env bash
# What makes the model learn: one lever per row, all on the benchmark cohort's two trained
# sections, the same patch (57.6 x 205 x 205 um), the same probe set and seeds, run side by side,
# then one report (benchmark.md) with every row beside its no-CT baselines:
#   short      cnn3d, 8 epochs (the CPU benchmark's budget)
#   long       cnn3d, LONG epochs
#   no_jitter  cnn3d, LONG epochs, no intensity jitter
#   histmatch  cnn3d, LONG epochs, every volume's histogram matched to mock_0 first
#   vit3d      vit3d_tiny, LONG epochs
#   resnet3d   resnet3d_valid, LONG epochs
#   ssl        cnn3d, LONG epochs, from an encoder pretrained without labels on every volume of the
#              cohort (python -m xpression.pretrain: masked-volume reconstruction, PRETRAIN_STEPS
#              steps, at most PRETRAIN_MINUTES minutes; $OUT/ssl_pretrain/encoder.ckpt, reused if there)
#   multiscale cnn3d on the patch + a second cnn3d on a 172.8 x 600 x 600 um context view
#              (every 3rd voxel of the low-pass filtered volume around the same centre), LONG epochs
#   recipe     the network recipe (train.py's default until model=forest): multiscale (its preset's context view, 3x the patch: the
#              same voxels), up to 150 epochs, early stopping after 30 without progress
#   forest     filter-bank features of the patch and the same context view + extremely randomised
#              trees (model=forest), fitted once: no epochs
# On a GPU: TRAINER=gpu benchmarks/levers.sh. On a 2-core CPU the defaults take hours (the 3D
# ViT dominates); THREADS=1 LONG=24 keeps it near half an hour. The cohort is generated when
# COHORT does not exist yet. SECTIONS picks the labelled sections every lever trains on (default
# the two above; e.g. SECTIONS=[mock_0_s0,infected_0_s0,vaccinated_0_s0] for three animals).
case "${1:-}" in
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;  # the header above
    "") ;;
    *) echo "error: $(basename "$0") takes no arguments (settings are environment variables; see --help)" >&2; exit 2 ;;  # not a run started by a typo
esac
set -euo pipefail
PY=${PY:-.venv/bin/python}
COHORT=${COHORT:-data/phantom_benchmark/cohort.yaml}
OUT=${OUT:-runs/levers/$(date +%Y-%m-%d_%H-%M-%S)}
TRAINER=${TRAINER:-cpu}
LONG=${LONG:-40}
SEEDS=${SEEDS:-0,1}
THREADS=${THREADS:-2}
SECTIONS=${SECTIONS:-[mock_0_s0,infected_0_s0]}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-1500}
PRETRAIN_MINUTES=${PRETRAIN_MINUTES:-10}
if [ ! -f "$COHORT" ]; then
    "$PY" -m xpression.phantom --out "$(dirname "$COHORT")" --preset benchmark --seed 0 --quiet \
        --workers "$(nproc)"
fi
mkdir -p "$OUT"
COMMON=(data=phantom_benchmark "data.manifest=$COHORT" "data.sections=$SECTIONS"
        data.num_workers=0 data.persistent_workers=false figures=false "trainer=$TRAINER"
        +off_plane=probe off_plane.n_points=150 "off_plane.max_patch_um=[134.4,400,400]"
        "sampler.patch_size_um=[57.6,205,205]" callbacks.early_stopping.patience=5 ++trainer.enable_progress_bar=false
        "~callbacks.progress_bar" "~callbacks.model_summary" ${EXTRA:-})
run() {  # run <name> [overrides...]
    local name=$1; shift
    OMP_NUM_THREADS=$THREADS "$PY" train.py -m "hydra.sweep.dir=$OUT/$name" "${COMMON[@]}" \
        "seed=$SEEDS" "$@" > "$OUT/$name.log" 2>&1 \
        || { echo "$name failed; see $OUT/$name.log" >&2; return 1; }
    echo "$(date +%T) $name done"
}
pretrain() {  # pretrain <name> [overrides...]: $OUT/<name>/encoder.ckpt from every volume of the cohort
    local name=$1; shift
    [ -f "$OUT/$name/encoder.ckpt" ] && { echo "$(date +%T) $name: reusing $OUT/$name/encoder.ckpt"; return 0; }
    OMP_NUM_THREADS=$THREADS "$PY" -m xpression.pretrain "hydra.run.dir=$OUT/$name" data=phantom_benchmark \
        "data.manifest=$COHORT" "patch.size_um=[57.6,205,205]" "pretrain.steps=$PRETRAIN_STEPS" \
        "pretrain.max_minutes=$PRETRAIN_MINUTES" pretrain.progress=false "$@" > "$OUT/$name.log" 2>&1 \
        || { echo "$name failed; see $OUT/$name.log" >&2; return 1; }
    echo "$(date +%T) $name done"
}
LEVERS=${LEVERS:-short long no_jitter histmatch vit3d resnet3d}  # a subset, e.g. LEVERS="short long"; ssl is not in the default set
lever() {  # lever <name>: its overrides
    case $1 in
        short) echo model=cnn3d trainer.max_epochs=8 ;;
        long) echo model=cnn3d "trainer.max_epochs=$LONG" ;;
        no_jitter) echo model=cnn3d "trainer.max_epochs=$LONG" data.augment.intensity_scale=0 data.augment.intensity_shift=0 ;;
        histmatch) echo model=cnn3d "trainer.max_epochs=$LONG" data.intensity_reference=mock_0 ;;
        vit3d) echo model=vit3d_tiny "trainer.max_epochs=$LONG" ;;
        resnet3d) echo model=resnet3d_valid "trainer.max_epochs=$LONG" ;;
        ssl) echo model=cnn3d "trainer.max_epochs=$LONG" "model.init_from=$OUT/ssl_pretrain/encoder.ckpt" ;;
        multiscale) echo model=multiscale_cnn3d "trainer.max_epochs=$LONG" "patch.context_um=[172.8,600,600]" ;;
        recipe) echo model=multiscale_cnn3d trainer.max_epochs=150 callbacks.early_stopping.patience=30 ;;
        forest) echo model=forest ;;
        *) echo "unknown lever '$1'" >&2; return 1 ;;
    esac
}
started=$(date +%s)
pids=() dirs=()
for name in $LEVERS; do
    read -r -a args <<< "$(lever "$name")"
    if [ "$name" = ssl ]; then
        { pretrain ssl_pretrain model=cnn3d && run "$name" "${args[@]}"; } & pids+=($!)
    else
        run "$name" "${args[@]}" & pids+=($!)
    fi
    dirs+=("$OUT/$name")
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
"$PY" -m xpression.evaluation.benchmark "${dirs[@]}" --out "$OUT" > "$OUT/report.log" 2>&1 || status=1
echo "levers wall time: $(( $(date +%s) - started )) s; report in $OUT/benchmark.md"
exit $status
