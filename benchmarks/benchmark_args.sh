# Sourced by run_benchmark.sh and lesion_placement.sh: the overrides every benchmark run gets, so
# rows of either script are scored alike. Reads PY, COHORT, SECTIONS, POINTS, MAX_PATCH_UM,
# TRAINER, EPOCHS and EXTRA; sets the arrays COMMON (data, probe, trainer) and NET (a network's
# training budget, early stopping after 5 epochs without progress as when the benchmark was
# measured, quiet logs).
SECTIONS=${SECTIONS:-[mock_0_s0,infected_0_s0]}  # trained sections; every other volume is an unseen animal
MAX_PATCH_UM=${MAX_PATCH_UM:-[134.4,400,400]}   # largest patch of any row: fixes the probe set for all rows
COMMON=("data.manifest=$COHORT" "data.sections=$SECTIONS" data.num_workers=0 data.persistent_workers=false
        data.pin_memory=false figures=false "trainer=$TRAINER" "off_plane.n_points=$POINTS"
        "off_plane.max_patch_um=$MAX_PATCH_UM")
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
COMMON+=("${EXTRA_ARGS[@]}")
NET=("trainer.max_epochs=$EPOCHS" callbacks.early_stopping.patience=5 ++trainer.enable_progress_bar=false "~callbacks.progress_bar"
     "~callbacks.model_summary" model.warmup_steps=20)
