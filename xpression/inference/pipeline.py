"""``infer.py``: a trained run over held-out volumes -> maps, previews, figures, scores.

Order: check the config's values, resolve the run (checkpoint + config), check that the output
folder can be written, open every volume and check voxel sizes, grids and existing outputs (all
before any network compute), then per volume: tissue mask,
normaliser, sweep into ``<output>/<volume_id>/maps.ome.zarr``; rank 0 adds the CT preview,
optional BigTIFF and figures. Scoring the maps against a synthetic cohort's truth is the
evaluation layer's (``xpression.evaluation.maps``; ``infer.py`` runs it after the sweep).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from omegaconf import OmegaConf

from xpression.data.kinds import get_kind
from xpression.data.manifest import load_manifest
from xpression.data.mask import tissue_mask
from xpression.data.patches import ResampledVolume, same_voxel_size
from xpression.data.volume import VolumeError, open_volume
from xpression.inference.predictor import InferenceError, Predictor
from xpression.inference.runs import RunInfo, load_predictor
from xpression.inference.shards import dist_rank_world, process_device
from xpression.inference.sweep import ContextSource
from xpression.inference.sinks import check_exports, write_exports
from xpression.inference.uncertainty import ChannelView, resolve_trust_runs, trust_identity, trust_predictor
from xpression.inference.volume_sweep import SweepSettings, infer_volume, plan_grid
from xpression.inference.writers import _read_meta, read_maps, write_ct_preview

__all__ = ["infer", "VolumeJob", "exports", "plan_jobs", "sweep_settings"]

log = logging.getLogger(__name__)


@dataclass
class VolumeJob:
    """One volume to sweep: ``raw`` as opened; ``volume`` and ``normalize`` as the model reads it
    (:meth:`~xpression.data.input_spec.InputSpec.prepare`: the raw volume with its quantised
    normaliser, or, at another voxel size, the normalised resampled view with the quantisation)."""

    volume_id: str
    raw: Any
    section_z_um: float | None  # trained section of this volume (axial), if any
    out_dir: Path
    model_voxel_um: tuple[float, float, float]
    volume: Any = None
    normalize: Any = None
    context: Any = None  # a multi-scale model's ContextSource (xpression.inference.sweep)

    def __post_init__(self) -> None:
        # Until _prepare: the raw voxels on the model's lattice (grid checks, the CT preview).
        self.raw_view = (self.raw if same_voxel_size(self.raw.voxel_size_um, self.model_voxel_um)
                         else ResampledVolume(self.raw, self.model_voxel_um, None))
        if self.volume is None:
            self.volume = self.raw_view


def _plain(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def _open(path: Path, voxel_size_um: Any, model_vs: tuple, resample: bool, vid: str) -> Any:
    """The volume file, its voxel size checked against the model's (before any voxel is read)."""
    try:
        vol = open_volume(path, voxel_size_um)
    except VolumeError as exc:
        raise InferenceError(f"volume {vid}: {exc}") from exc
    if not same_voxel_size(vol.voxel_size_um, model_vs) and not resample:
        raise InferenceError(
            f"volume {vid} ({path}) has voxels of {list(vol.voxel_size_um)} um but the model was trained at "
            f"{list(model_vs)} um; pass resample=true to resample it on the fly (trilinear)")
    return vol


def plan_jobs(cfg: Any, info: RunInfo) -> tuple[list[VolumeJob], Any]:
    """The volumes to sweep (opened, voxel sizes checked) and the cohort (or None)."""
    out = Path(cfg.output)
    model_vs = info.voxel_size_um
    if cfg.get("volume"):
        path = Path(cfg.volume)
        vid = cfg.get("volume_id") or path.name.split(".")[0]
        vol = _open(path, cfg.get("voxel_size_um"), model_vs, bool(cfg.resample), vid)
        return [VolumeJob(vid, vol, None, out / vid, model_vs)], None
    manifest = cfg.get("cohort") or info.manifest
    if not manifest:
        raise InferenceError("nothing to sweep: give cohort=<cohort.yaml> or volume=<path>")
    cohort = load_manifest(manifest)
    trained = set(info.trained_sections or [s.id for s in cohort.sections])
    wanted = cfg.get("volumes")
    jobs = []
    for v in cohort.volumes:
        if wanted and v.id not in wanted:
            continue
        z = [s.z_um for s in v.sections if s.id in trained and s.is_axial]
        vol = _open(v.image, v.voxel_size_um, model_vs, bool(cfg.resample), v.id)
        jobs.append(VolumeJob(v.id, vol, z[0] if z else None, out / v.id, model_vs))
    if wanted and len(jobs) != len(set(wanted)):
        raise InferenceError(f"volumes {sorted(set(wanted) - {j.volume_id for j in jobs})} not in {cohort.path}")
    return jobs, cohort


def _prepare(job: VolumeJob, info: RunInfo) -> dict:
    """Set the job's model view and normaliser from the checkpoint's input spec (the training
    patch path); returns the normaliser's description for the map metadata."""
    try:
        job.volume, job.normalize = info.spec.prepare(job.raw)
        if info.spec.context is not None:
            job.context = ContextSource(*info.spec.prepare_context(job.raw), info.spec.context)
    except ValueError as err:
        raise InferenceError(f"volume {job.volume_id}: {err}") from err
    transform = job.normalize.transform if job.volume is job.raw else job.volume.transform
    inner = transform.to_dict() if hasattr(transform, "to_dict") else {}
    return {**inner, "quantised": info.spec.quantisation, "intensity": info.spec.intensity.describe(),
            "resampled_to_um": None if job.volume is job.raw else list(info.voxel_size_um)}


def _mask(volume: Any, cfg: Any) -> Any:
    if not cfg.mask.enabled:
        return None
    params = {k: v for k, v in _plain(cfg.mask).items() if k != "enabled"}
    return tissue_mask(volume, **params)


def sweep_settings(cfg: Any) -> SweepSettings:
    """The sweep settings of an ``infer.py`` config (its grid, sweep and store keys)."""
    return SweepSettings(
        spacing_um=tuple(cfg.spacing_um), mode=cfg.mode, tile_vox=cfg.tile_vox if isinstance(cfg.tile_vox, (str, type(None)))
        else tuple(cfg.tile_vox), overlap=cfg.overlap, batch_size=cfg.batch_size, prefetch=cfg.prefetch,
        readers=cfg.get("readers"), pad_tiles=cfg.get("pad_tiles"), levels=cfg.levels, overwrite=cfg.overwrite,
        progress=cfg.progress)


def exports(cfg: Any) -> list[str]:
    """The map sinks to write besides the OME-Zarr store (``exports``; ``bigtiff=true`` adds it)."""
    names = [str(n) for n in (cfg.get("exports") or [])]
    return names + (["bigtiff"] if cfg.get("bigtiff") and "bigtiff" not in names else [])


def _precheck(jobs: list[VolumeJob], pred: Predictor, cfg: Any, identity: dict) -> None:
    """Grids, map sinks and existing outputs, for every volume, before any compute."""
    check_exports(exports(cfg))
    for job in jobs:
        plan_grid(job.volume, pred, cfg.spacing_um, cfg.mode, (job.section_z_um, None, None))
        meta = _read_meta(job.out_dir / "maps.ome.zarr")
        if meta is not None and not cfg.overwrite and meta.get("identity", {}).get("checkpoint_sha256") != identity["checkpoint_sha256"]:
            raise InferenceError(
                f"{job.out_dir / 'maps.ome.zarr'} holds maps of a different run (checkpoint "
                f"{meta.get('identity', {}).get('checkpoint_sha256', '?')[:12]}, run {meta.get('identity', {}).get('run_dir')}); "
                "choose another output or pass overwrite=true")


def scan_check(cfg: Any, info: RunInfo, jobs: list[VolumeJob]) -> dict | None:
    """Each swept volume's noise against the noise of the run's training volumes
    (:mod:`xpression.data.scan_check`); a warning names every volume outside them by more than
    ``NOISE_TOLERANCE``. None when ``scan_check=false`` or the training volumes cannot be opened."""
    from xpression.data.scan_check import NOISE_TOLERANCE, noise_ratio, scan_noise

    if not cfg.get("scan_check", True) or not info.manifest:
        return None
    measured: dict[str, float] = {}  # by file: a training volume swept again is read once

    def noise_of(volume: Any) -> float:
        key = str(Path(volume.path).resolve()) if getattr(volume, "path", None) else str(id(volume))
        if key not in measured:
            measured[key] = scan_noise(volume)
        return measured[key]

    try:
        cohort = load_manifest(info.manifest)
        trained = set(info.trained_sections or [s.id for s in cohort.sections])  # as plan_jobs reads it
        training = {v.id: noise_of(open_volume(v.image, v.voxel_size_um)) for v in cohort.volumes
                    if any(s.id in trained for s in v.sections)}
    except (OSError, ValueError, VolumeError) as err:  # the training cohort moved or is gone: nothing to compare with
        log.info("scan check skipped: the run's training volumes cannot be read (%s)", err)
        return None
    if not training:
        return None
    lo, hi = min(training.values()), max(training.values())
    rows = {}
    for job in jobs:
        noise = noise_of(job.raw)
        ratio = noise_ratio(noise, training)
        flagged = bool(np.isfinite(ratio) and not 1 / NOISE_TOLERANCE <= ratio <= NOISE_TOLERANCE)
        rows[job.volume_id] = {"noise": noise, "ratio": ratio, "flagged": flagged}
        if flagged:
            log.warning("%s: scan noise %.3f of its intensity range, %.1fx outside the training scans' %.3f-%.3f: its maps "
                        "may be worse than their SD and ood say (README, 'Unseen animals scanned differently')",
                        job.volume_id, noise, ratio, lo, hi)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["volume_id,noise,ratio_to_training,flagged"] + [f"{v},{r['noise']:.6g},{r['ratio']:.4g},{r['flagged']}" for v, r in rows.items()]
    (out / "scan_check.csv").write_text("\n".join(lines) + "\n")
    return {"training": training, "volumes": rows, "tolerance": NOISE_TOLERANCE, "csv": str(out / "scan_check.csv")}


def infer(cfg: Any) -> dict:
    """Run the whole sweep described by the ``conf/infer.yaml`` config; returns a summary."""
    from xpression.config import check_infer_config, check_output_writable

    check_infer_config(cfg)
    # [uncertainty hook] the run, or an ensemble's members (xpression.inference.uncertainty)
    info, members = resolve_trust_runs(cfg)
    check_output_writable(cfg.output)  # before the model loads
    pred = load_predictor(info, process_device(cfg.device), cfg.precision, compile=bool(cfg.get("compile", False)))
    # [uncertainty hook] ensemble / MC dropout / ood: one network with <target>_sd and ood channels
    pred, trust = trust_predictor(cfg, info, members, pred)
    if pred.device.type == "cuda":
        import torch

        torch.cuda.set_device(pred.device)
        if cfg.get("cudnn_benchmark", True):
            torch.backends.cudnn.benchmark = True  # tiles of one shape: each convolution autotuned once
    if cfg.mode == "dense" and not pred.can_dense:
        from xpression.models.closed_form import ClosedFormModel

        model = getattr(pred.net, "members", [pred.net])[0]
        if isinstance(model, ClosedFormModel) or info.spec.context is not None:
            what = (f"{type(model).__name__} (fitted, no dense mode)" if isinstance(model, ClosedFormModel)
                    else "multi-scale model whose encoders have no dense mode")
            log.info("%s: predicting patch by patch (mode=patch)", what)
            cfg.mode = "patch"
    jobs, cohort = plan_jobs(cfg, info)
    earlier = earlier_summary(cfg, info, cohort)  # before any sweep: a folder of another run or cohort is refused
    identity = {**info.identity(), **trust_identity(trust)}
    _precheck(jobs, pred, cfg, identity)
    rank, world = dist_rank_world()
    spec = info.spec.targets
    genes = _gene_loadings(cfg, info, spec, jobs, identity)  # hook: gene maps (xpression.inference.genes)
    meta_common = {"run_config": info.config, "checkpoint": str(info.checkpoint), "target_kind": spec.get("kind"),
                   "target_colors": spec.get("colors"), "target_reference": spec.get("reference"),
                   "infer_config": _plain(cfg)}
    if trust is not None:
        meta_common["uncertainty"] = trust
    summary: dict = {"run_dir": str(info.run_dir), "cohort": str(cohort.path) if cohort is not None else None, "volumes": {}}
    if rank == 0:
        checked = scan_check(cfg, info, jobs)
        if checked is not None:
            summary["scan_check"] = checked
    settings = sweep_settings(cfg)
    for job in jobs:
        norm_meta = _prepare(job, info)
        mask = _mask(job.raw, cfg)
        res = infer_volume(
            job.volume, pred, job.out_dir / "maps.ome.zarr", settings, mask=mask, normalize=job.normalize,
            identity=identity, anchor_um=(job.section_z_um, None, None), rank=rank, world=world, context=job.context,
            metadata={**meta_common, "volume_id": job.volume_id, "normalizer": norm_meta,
                      "ct": {"path": str(getattr(job.raw, "path", "")), "preview": "../ct_preview.ome.zarr"}})
        for note in res.notes:
            log.info("%s grid: %s", job.volume_id, note)
        summary["volumes"][job.volume_id] = {"path": str(res.path), "tiles": res.tiles_computed, "seconds": round(res.seconds, 2),
                                             "grid": res.grid.to_dict(), "notes": res.notes, "skipped": res.skipped,
                                             "section_z_um": job.section_z_um}
        if rank == 0:
            _extras(job, res, pred, cfg, meta_common["target_kind"])
            if genes is not None:  # hook: gene maps (xpression.inference.genes)
                from xpression.inference.genes import write_gene_maps

                path = write_gene_maps(res.path, genes, overwrite=bool(cfg.overwrite))
                summary["volumes"][job.volume_id]["genes"] = {"path": str(path), "genes": genes.genes, "units": genes.units}
    # the volumes swept into this folder before stay listed (and scored) beside this call's
    summary["volumes"] = {**{k: v for k, v in earlier.get("volumes", {}).items() if k not in summary["volumes"]},
                          **summary["volumes"]}
    if rank == 0:
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


# What infer.py (and its scoring) writes beside summary.json in the output folder.
_SCORE_FILES = ("evaluation.csv", "gene_evaluation.csv", "uncertainty.csv", "scan_check.csv")


def earlier_summary(cfg: Any, info: RunInfo, cohort: Any) -> dict:
    """``<output>/summary.json`` of an earlier call of this run over this cohort (or volume), whose
    volumes the new summary keeps listing; ``{}`` when there is none or ``overwrite=true``.

    Raises:
        InferenceError: the folder's summary.json is unreadable, or records another run or cohort,
            or the folder holds score files without one (they would be replaced): choose another
            output, or pass overwrite=true.
    """
    path = Path(cfg.output) / "summary.json"
    if bool(cfg.get("overwrite", False)):
        return {}
    fix = "choose another output=, or pass overwrite=true to replace what is there"
    if not path.is_file():
        taken = [name for name in _SCORE_FILES if (path.parent / name).exists()]
        if taken:  # a folder holding scores without the summary they belong to: not ours to replace
            raise InferenceError(f"{path.parent} holds {', '.join(taken)} but no summary.json of infer.py; {fix}")
        return {}
    try:
        earlier = json.loads(path.read_text())
        recorded = (str(earlier["run_dir"]), earlier.get("cohort"), dict(earlier["volumes"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InferenceError(f"{path} is not a summary infer.py wrote ({type(err).__name__}: {err}); {fix}") from None
    now = (str(info.run_dir), str(cohort.path) if cohort is not None else None)
    if recorded[:2] != now:
        what = "run" if recorded[0] != now[0] else "cohort"
        raise InferenceError(f"{path} records maps of a different {what} ({recorded[0] if what == 'run' else recorded[1]}); {fix}")
    return earlier


def matched_names(names: list[str], reference: Mapping[str, str] | None) -> list[str]:
    """Target names for figures: a fitted program with the known program it was matched to (by
    which the scores name it) beside its own name, ``program_2 (~ immune)``; others as they are."""
    reference = reference or {}
    return [f"{n} (~ {reference[n]})" if reference.get(n) and reference[n] != n else n for n in names]


def trust_label(trust: Mapping[str, Any]) -> Callable[[str], str]:
    """The colour-bar label of an uncertainty map's channel: ``<target>_sd`` or the ood channel."""
    calibrated = " (calibrated)" if trust.get("calibration") else ""
    ood = (trust.get("ood") or {}).get("method") or "mahalanobis"
    units = "training spreads" if ood == "mahalanobis" else "feature distance"

    def label(name: str) -> str:
        if name == trust.get("ood_channel"):
            return f"ood: {ood} distance\nfrom the training spots ({units})"
        return f"{name.removesuffix('_sd')}: SD{calibrated}\n(target units)"

    return label


def _gene_loadings(cfg: Any, info: RunInfo, spec: dict, jobs: list[VolumeJob], identity: dict) -> Any:
    """``genes=[...]``: the run's gene loadings restricted to them, and every existing gene store
    checked, before any sweep (None without ``genes``)."""
    if not cfg.get("genes"):
        return None
    from xpression.inference.genes import check_gene_store, gene_loadings

    twice = sorted({g for g in cfg.genes if list(cfg.genes).count(g) > 1})
    if twice:  # each would be a map channel and a score row of its own
        raise InferenceError(f"genes=[...] names {', '.join(map(str, twice))} more than once")

    if spec.get("kind", "composition") != "composition":
        raise InferenceError(f"genes=[...] needs a composition target (compartments or programs); this run predicts "
                             f"{spec.get('kind')}")
    loadings = gene_loadings(info, list(spec.get("names") or [])).select(list(cfg.genes))
    for job in jobs:
        check_gene_store(job.out_dir / "genes.ome.zarr", identity, loadings, bool(cfg.overwrite))
    return loadings


def _extras(job: VolumeJob, res: Any, pred: Predictor, cfg: Any, kind: str | None) -> None:
    from xpression.inference.figures import plot_depth_proportions, plot_orthoviews

    maps, meta = read_maps(res.path)
    trust = meta.get("uncertainty")  # [uncertainty hook] figures of the mean channels; the SD/ood ones apart
    if trust:
        full, maps = maps, ChannelView(maps, 0, len(trust["targets"]))
    ct = None
    if cfg.ct_preview:
        ct_path = job.out_dir / "ct_preview.ome.zarr"
        if not ct_path.exists() or cfg.overwrite or res.tiles_computed:
            write_ct_preview(job.raw_view, res.grid, ct_path, overwrite=True)
        import zarr

        ct = zarr.open_group(str(ct_path), mode="r")["0"]
    for name, path in write_exports(exports(cfg), res.path, job.out_dir,
                                    job.out_dir / "ct_preview.ome.zarr" if cfg.ct_preview else None).items():
        log.info("%s: %s maps in %s", job.volume_id, name, path)
    if cfg.figures:
        names, colors = list(trust["targets"] if trust else meta["targets"]), meta.get("target_colors")
        names = matched_names(names, meta.get("target_reference"))
        label = f"predicted {get_kind(kind or 'composition').value_label}"
        plot_orthoviews(maps, res.grid, names, job.out_dir / "figures" / "orthoviews.png", ct=ct, title=job.volume_id,
                        section_z_um=job.section_z_um, value_label=label, colors=colors)
        plot_depth_proportions(maps, res.grid, names, job.out_dir / "figures" / "proportions_by_depth.png",
                               kind=kind or "composition", title=job.volume_id, section_z_um=job.section_z_um,
                               colors=colors)
        if trust:
            extra = [i for i, t in enumerate(meta["targets"]) if t in trust["sd_channels"] or t == trust["ood_channel"]]
            plot_orthoviews(full, res.grid, list(meta["targets"]), job.out_dir / "figures" / "uncertainty.png", ct=ct,
                            title=f"{job.volume_id}: {trust['method']} SD and ood", section_z_um=job.section_z_um,
                            channels=extra, value_label=trust_label(trust))
