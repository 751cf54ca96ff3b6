"""Maps with error bars: ensembles, Monte-Carlo dropout and the out-of-distribution channel.

``infer.py uncertainty=ensemble|mc_dropout|trees [ood=true]`` sweeps a :class:`TrustNet` in place of the
run's network. To the sweep it is one network whose outputs are, per grid point, the mean of
each target (named as the targets), one ``<target>_sd`` per target and, with ``ood=true``, one
``ood`` channel; so dense and patch mode, tiling, resumption, sharding and the map store work
unchanged, and a dense sweep stays dense: every member (or pass) runs densely over the tile and
the tile's means and variances are combined as they come (Welford's update: memory bounded by
the tile, never by the number of members).

- ``ensemble``: the members are the runs of a multirun folder (``run=MULTIRUN``) or
  ``members=[RUN_OR_CKPT, ...]``; each member's answer counts once. They must share the input
  contract: voxel size, patch shape, dense geometry, targets (names and kind) and intensity
  normalisation (a mismatch is refused naming the member). The CT is normalised once, with the
  first member's transform.
- ``trees``: the trees of one ``model=forest`` run, each tree's prediction one member (the mean
  map is the forest's own; patch mode, one computation of the features per grid point).
- ``mc_dropout``: ``mc_samples`` passes of the run's network with its dropout layers active
  (seeded by ``mc_seed``); a network without dropout is refused. Where the one dropout layer is
  the last step before the head (``cnn3d``), the trunk runs once and only the mask and the head
  are redrawn per pass (:meth:`TrustNet._mc_last_dropout`).
- SD: the sample standard deviation (``ddof = 1``) of the members' (passes') predictions in
  target units (proportions for compositions), i.e. their disagreement, not the noise of the
  labels.
- ``ood``: the distance of the features entering the head from the training spots' (``knn`` or
  ``mahalanobis``, :mod:`xpression.inference.ood`), averaged over the members, computed with
  dropout off.
- ``calibrate=true``: the SD channels times a per-target factor fitted on the held-out spots
  (:mod:`xpression.inference.calibration`), recorded in the metadata (``calibration``).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from xpression.inference.ood import require_features
from xpression.inference.predictor import InferenceError, Predictor, _attr

__all__ = ["METHODS", "TrustNet", "ChannelView", "dropout_layers", "ensemble_members", "resolve_trust_runs",
           "trust_predictor", "trust_channels"]

log = logging.getLogger(__name__)

METHODS = ("none", "ensemble", "mc_dropout", "trees")
# Run-config keys that change what a member's input means (besides voxel size and targets).
_CONTRACT_KEYS = ("data.intensity", "data.intensity_reference", "data.cache_dtype")


def trust_channels(targets: Sequence[str], sd: bool, ood: bool) -> list[str]:
    """Channel names of a trust map: the targets, then ``<target>_sd`` each, then ``ood``."""
    return list(targets) + ([f"{t}_sd" for t in targets] if sd else []) + (["ood"] if ood else [])


def dropout_layers(net: nn.Module) -> list[nn.Module]:
    """The dropout layers of ``net`` that drop anything (``p > 0``)."""
    return [m for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and float(m.p) > 0]


class _Welford:
    """Running mean and sum of squared deviations over tensors of one shape (float32)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        self.n += 1
        if self.mean is None:
            self.mean, self.m2 = x.clone(), torch.zeros_like(x)
            return
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    def sd(self) -> torch.Tensor:
        return torch.sqrt(torch.clamp(self.m2 / max(self.n - 1, 1), min=0))


def _takes(fn: Any, name: str) -> bool:
    return fn is not None and name in inspect.signature(fn).parameters


class TrustNet(nn.Module):
    """Several passes over ``members`` (``XPressionNet``s: ``forward_features``, ``head``, a
    backbone with ``dense_features`` for dense mode) combined into ``[means, sds, ood]``.

    ``method``: ``"ensemble"`` (one deterministic pass per member), ``"mc_dropout"`` (``samples``
    passes of the single member with its dropout active), ``"trees"`` (one forest's trees) or ``"none"`` (one pass, no SD: only
    for the ``ood`` channel). ``ood_fits``: one :class:`~xpression.inference.ood.OODFit` per
    member, or None (no ``ood`` channel).
    """

    def __init__(self, members: Sequence[nn.Module], method: str = "ensemble", samples: int = 20,
                 ood_fits: Sequence[Any] | None = None) -> None:
        super().__init__()
        if method not in METHODS:
            raise InferenceError(f"uncertainty must be one of {', '.join(METHODS)}, got {method!r}")
        if method in ("mc_dropout", "trees") and len(members) != 1:
            raise InferenceError(f"uncertainty={method} takes one model, got {len(members)}")
        if method == "trees" and not hasattr(members[0], "predict_spread"):
            raise InferenceError(f"uncertainty=trees: {type(members[0]).__name__} has no trees (a model=forest run has); "
                                 "use uncertainty=ensemble or mc_dropout")
        self.members = nn.ModuleList(members)
        self.method, self.samples = method, int(samples)
        self.with_sd = method != "none"
        self.with_ood = ood_fits is not None
        first = members[0]
        self.patch_shape = tuple(first.patch_shape)
        self.output_stride = getattr(first, "output_stride", None)
        self.dense_equivalent = bool(getattr(first, "dense_equivalent", False))
        self.views = int(_attr(first, "views") or 1)  # 2: patch and context view (a network's backbone, or the model)
        offset = getattr(first, "dense_offset", None) or getattr(getattr(first, "backbone", None), "dense_offset", None)
        if offset is not None:
            self.dense_offset = tuple(offset)
        # per-target factor on the SD channels (xpression.inference.calibration); 1 = the raw spread
        fc = getattr(getattr(first, "head", None), "fc", None)
        spec = getattr(first, "target_spec", None)  # a closed-form model's targets (it has no head)
        self.register_buffer("sd_scale", torch.ones(int(fc.out_features) if fc is not None
                                                    else len(spec.names) if spec is not None else 0))
        if self.with_ood:
            require_features(members)
            self.ood_method = ood_fits[0].method  # type: ignore[index]
            for i, fit in enumerate(ood_fits):  # type: ignore[arg-type]
                if fit.method != self.ood_method:
                    raise InferenceError(f"the members' out-of-distribution fits score differently: {fit.method} vs {self.ood_method}")
                if fit.method == "knn":
                    self.register_buffer(f"ood_bank_{i}", torch.as_tensor(fit.bank, dtype=torch.float32))
                    self.ood_k = fit.k
                else:
                    self.register_buffer(f"ood_mean_{i}", torch.as_tensor(fit.mean, dtype=torch.float32))
                    self.register_buffer(f"ood_whiten_{i}", torch.as_tensor(fit.whiten, dtype=torch.float32))

    # -- the passes ----------------------------------------------------------------------------
    def _passes(self) -> list[tuple[int, bool]]:
        """``(member, stochastic)`` per pass."""
        if self.method == "mc_dropout":
            return [(0, True)] * self.samples
        return [(i, False) for i in range(len(self.members))]

    def _set_dropout(self, net: nn.Module, active: bool) -> None:
        for m in dropout_layers(net):
            m.train(active)

    def _scaled(self, sd: torch.Tensor) -> torch.Tensor:
        """``(B, T, ...)`` SDs times the per-target calibration factor (none set: unchanged)."""
        if self.sd_scale.numel() == 0:
            return sd
        return sd * self.sd_scale.view((1, -1) + (1,) * (sd.ndim - 2)).to(sd.dtype)

    def _ood(self, i: int, feats: torch.Tensor) -> torch.Tensor:
        from xpression.inference.ood import knn_distance, mahalanobis

        with torch.autocast(device_type=feats.device.type, enabled=False):
            if self.ood_method == "knn":
                return knn_distance(feats.float(), getattr(self, f"ood_bank_{i}"), self.ood_k, dim=1)
            return mahalanobis(feats, getattr(self, f"ood_mean_{i}"), getattr(self, f"ood_whiten_{i}"), dim=1)

    def _mc_last_dropout(self, run: Any, head: Any) -> torch.Tensor | None:
        """MC dropout when the network's one dropout layer is the last step before the head (as
        in ``cnn3d``): the trunk runs once, and each pass only redraws the dropout mask on its
        features and reruns the head, so a dense sweep stays about as fast as without
        uncertainty. Checked, not assumed: the dropout layer's input (with dropout off) must be
        the features the head receives (up to the trailing crop a dense path may apply); else
        None (every pass then runs the whole network)."""
        net = self.members[0]
        drops = dropout_layers(net)
        if len(drops) != 1 or type(drops[0]) is not nn.Dropout:
            return None
        seen: dict = {}
        hook = drops[0].register_forward_hook(lambda m, args, out: seen.__setitem__("x", args[0]))
        try:
            _, feats = run(net, want_features=True)
        finally:
            hook.remove()
        x = seen.get("x")
        if x is None or x.ndim != feats.ndim or any(a < b for a, b in zip(x.shape, feats.shape)):
            return None
        if not torch.equal(x[tuple(slice(0, n) for n in feats.shape)], feats):
            return None
        stats = _Welford()
        p = float(drops[0].p)
        for _ in range(self.samples):
            stats.add(head(net, torch.nn.functional.dropout(feats, p, training=True)))
        out = [stats.mean, self._scaled(stats.sd())] + ([self._ood(0, feats).unsqueeze(1)] if self.with_ood else [])
        return torch.cat(out, dim=1)

    def _combine(self, run: Any, head: Any) -> torch.Tensor:
        """``run(member, want_features) -> (prediction, features or None)`` per pass;
        ``head(member, features) -> prediction``."""
        if self.method == "mc_dropout":
            fast = self._mc_last_dropout(run, head)
            if fast is not None:
                return fast
        stats, ood = _Welford(), None
        deterministic_feats: dict[int, torch.Tensor] = {}
        for i, stochastic in self._passes():
            net = self.members[i]
            self._set_dropout(net, stochastic)
            try:
                pred, feats = run(net, want_features=self.with_ood and not stochastic)
            finally:
                self._set_dropout(net, False)
            stats.add(pred)
            if feats is not None:
                deterministic_feats[i] = feats
        out = [stats.mean] + ([self._scaled(stats.sd())] if self.with_sd else [])
        if self.with_ood:
            for i in range(len(self.members)):
                if i not in deterministic_feats:  # mc_dropout: features with dropout off
                    _, deterministic_feats[i] = run(self.members[i], want_features=True)
                d = self._ood(i, deterministic_feats[i])
                ood = d if ood is None else ood + d
            out.append((ood / len(self.members)).unsqueeze(1))
        return torch.cat(out, dim=1)

    # -- the network interface the sweep uses ----------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` patches -> ``(B, C)``: means, SDs, ood."""
        if self.method == "trees":
            # the forest runs in numpy on the CPU; its answers join the trust map's buffers on x's device
            mean, sd, feats = (None if t is None else t.to(x.device) for t in
                               self.members[0].predict_spread(x, with_features=self.with_ood))
            out = [mean, self._scaled(sd)] + ([self._ood(0, feats).unsqueeze(1)] if self.with_ood else [])
            return torch.cat(out, dim=1)

        def head(net: nn.Module, feats: torch.Tensor) -> torch.Tensor:
            return net.head.activate(net.forward_head(feats)).float()

        def run(net: nn.Module, want_features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
            if not hasattr(net, "forward_features"):  # a closed-form model (ridge, forest): features in one pass
                if want_features:
                    pred, feats = net.predict_with_features(x)
                    return pred.float().to(x.device), feats.to(x.device)
                return net(x).float(), None
            feats = net.forward_features(x)
            return head(net, feats), (feats if want_features else None)

        return self._combine(run, head)

    def dense_forward(self, x: torch.Tensor, step: Sequence[int] | None = None, spot_average: bool = False,
                      context: torch.Tensor | None = None, context_stride: Sequence[int] | None = None) -> torch.Tensor:
        """Dense outputs ``(B, C, d, h, w)`` (or ``(B, C, H', W')`` for plane members), every
        ``step``-th position, as each member's own dense path gives them (multi-scale members
        also take the ``context`` block and its ``context_stride``)."""
        step_t = tuple(int(s) for s in (step or (1, 1, 1)))

        def run(net: nn.Module, want_features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
            dense = getattr(net.backbone, "dense_features", None)
            if dense is None:
                raise InferenceError(f"{type(net.backbone).__name__} has no dense mode; use mode=patch")
            kwargs: dict = {}
            if _takes(dense, "spot_average"):
                kwargs["spot_average"] = spot_average
            if context is not None:
                kwargs.update(context=context, context_stride=context_stride)
            native = _takes(dense, "step") and step_t != (1, 1, 1)
            if native:
                kwargs["step"] = step_t
            feats = dense(x, **kwargs)
            if not native and step_t != (1, 1, 1):
                keep = step_t if feats.ndim == 5 else step_t[1:]
                feats = feats[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in keep)]
            return head(net, feats), (feats if want_features else None)

        def head(net: nn.Module, feats: torch.Tensor) -> torch.Tensor:
            return net.head.activate(net.head.dense(feats), dim=1).float()

        return self._combine(run, head)


class ChannelView:
    """Channels ``[start, stop)`` of a ``(C, ...)`` array-like, read lazily (figures of the
    mean channels of a trust map)."""

    def __init__(self, array: Any, start: int, stop: int):
        self.array, self.start, self.stop = array, start, stop
        self.shape = (stop - start,) + tuple(array.shape[1:])

    def __getitem__(self, key: Any) -> np.ndarray:
        c, *rest = key if isinstance(key, tuple) else (key,)
        if isinstance(c, slice):
            lo, hi, st = c.indices(self.shape[0])
            c = slice(self.start + lo, self.start + hi, st)
        else:
            c = self.start + int(c)
        return self.array[(c, *rest)]


# -- from infer.py's config ------------------------------------------------------------------------


def _is_run_dir(path: Path) -> bool:
    from xpression.runfolder import run_config_path

    return path.is_dir() and (path / "checkpoints").is_dir() and run_config_path(path).is_file()


def ensemble_members(run: str | Path | None, members: Sequence[str] | None) -> list[Path]:
    """The member paths: ``members`` (run folders or checkpoints) when given (``run``, if set,
    must be one of them: it is not added), else the run folders directly inside the multirun
    folder ``run`` (in the order of their names, numbers numerically)."""
    if members:
        paths = [Path(str(m)).expanduser() for m in members]
        for p in paths:
            if not p.exists():
                raise InferenceError(f"members: {p} not found (give run folders or .ckpt files)")
        if run is not None and Path(str(run)).expanduser().resolve() not in {p.resolve() for p in paths}:
            raise InferenceError(f"run={run} is not among members={[str(p) for p in paths]}: give the members "
                                 "alone, or run=<multirun folder> without members")
        return paths
    if run is None:
        raise InferenceError("uncertainty=ensemble: give run=<multirun folder> or members=[RUN, ...]")
    root = Path(str(run)).expanduser()
    if _is_run_dir(root) or root.is_file():
        raise InferenceError(f"uncertainty=ensemble: {root} is a single run; give run=<multirun folder> "
                             "(its runs are the members) or members=[RUN, RUN, ...]")
    if not root.is_dir():
        raise InferenceError(f"run {root} not found (give a multirun folder or members=[...])")
    found = sorted((p for p in root.iterdir() if _is_run_dir(p)),
                   key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))
    if len(found) < 2:
        raise InferenceError(f"uncertainty=ensemble: {root} holds {len(found)} run folder(s); an ensemble needs at least 2")
    return found


def resolve_trust_runs(cfg: Any) -> tuple[Any, list[Any]]:
    """``(primary RunInfo, member RunInfos)``. The primary run gives the cohort, the normalisation
    and the map metadata: ``run`` itself, or for an ensemble its first member. Members are empty
    unless ``uncertainty=ensemble``. Raises before any model loads."""
    from xpression.inference.runs import resolve_run

    from omegaconf import OmegaConf

    method = str(cfg.get("uncertainty") or "none")
    if method != "ensemble":
        return resolve_run(cfg.run, cfg.checkpoint), []
    run = OmegaConf.select(cfg, "run", default=None, throw_on_missing=False) if OmegaConf.is_config(cfg) else cfg.get("run")
    infos = [resolve_run(p, cfg.checkpoint) for p in ensemble_members(run, cfg.get("members"))]
    _check_contract(infos)
    return infos[0], infos


def _check_contract(infos: Sequence[Any]) -> None:
    """Voxel size and normalisation settings of every member against the first (from the run
    folders; patch shape and targets are checked once the networks load)."""
    from xpression.inference.runs import _select

    first = infos[0]
    for info in infos[1:]:
        a, b = first.voxel_size_um, info.voxel_size_um
        if (a is None) != (b is None) or (a is not None and not np.allclose(a, b, rtol=1e-3)):
            raise InferenceError(f"ensemble member {info.run_dir} was trained at voxel size {b} um, "
                                 f"{first.run_dir} at {a} um: members must share the input contract")
        for key in _CONTRACT_KEYS:
            if _select(info.config, key) != _select(first.config, key):
                raise InferenceError(f"ensemble member {info.run_dir} has {key}={_select(info.config, key)!r}, "
                                     f"{first.run_dir} {_select(first.config, key)!r}: members must share the input contract")


def _net_contract(pred: Predictor, info: Any) -> dict:
    spec = info.spec.targets
    return {"targets": list(spec.get("names") or []), "kind": spec.get("kind"), "patch_shape": list(pred.patch_shape),
            "output_stride": None if pred.output_stride is None else list(pred.output_stride),
            "dense_equivalent": pred.dense_equivalent,
            "dense_offset": getattr(pred.net, "dense_offset", None)}


def trust_predictor(cfg: Any, info: Any, members: Sequence[Any], pred: Predictor) -> tuple[Predictor, dict | None]:
    """``pred`` (the primary run's network) wrapped in a :class:`TrustNet` as ``cfg`` asks
    (``uncertainty``, ``members``, ``mc_samples``, ``mc_seed``, ``ood``), and what the maps'
    metadata and identity record about it; ``(pred, None)`` when nothing is asked."""
    from xpression.inference.runs import load_predictor

    method = str(cfg.get("uncertainty") or "none")
    want_ood = bool(cfg.get("ood", False))
    if method not in METHODS:
        raise InferenceError(f"uncertainty must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "none" and bool(cfg.get("calibrate", False)):  # with or without ood: there is no SD to scale
        from xpression.config import CALIBRATE_NEEDS_METHOD

        raise InferenceError(CALIBRATE_NEEDS_METHOD)
    if method == "none" and not want_ood:
        return pred, None
    targets = list(pred.target_names or [])
    nets, infos = [pred.net], [info]
    if method == "ensemble":
        want = _net_contract(pred, info)
        for m in members[1:]:
            p = load_predictor(m, str(pred.device), pred.precision)
            have = _net_contract(p, m)
            diff = [k for k in want if have[k] != want[k]]
            if diff:
                raise InferenceError(f"ensemble member {m.run_dir} differs from {info.run_dir} in "
                                     + "; ".join(f"{k}: {have[k]} vs {want[k]}" for k in diff)
                                     + ": members must share the input contract")
            nets.append(p.net)
            infos.append(m)
        if len({i.sha256 for i in infos}) < len(infos):
            log.warning("the ensemble holds the same checkpoint more than once: its SD is 0 there")
    if method == "mc_dropout":
        if hasattr(pred.net, "predict_spread"):
            raise InferenceError(f"uncertainty=mc_dropout: {info.run_dir} holds a forest (no dropout); use uncertainty=trees")
        if not dropout_layers(pred.net):
            raise InferenceError(f"uncertainty=mc_dropout: the network of {info.run_dir} has no dropout layer "
                                 "(p > 0); train with dropout (e.g. model.backbone.dropout=0.3) or use uncertainty=ensemble")
        torch.manual_seed(int(cfg.get("mc_seed", 0)))
    fits = None
    if want_ood:
        from xpression.inference.ood import ood_fit_for_run

        ood_method = str(cfg.get("ood_method") or "mahalanobis")
        fits = [ood_fit_for_run(i, n, pred.device, ood_method) for i, n in zip(infos, nets)]
    samples = int(cfg.get("mc_samples", 20))
    net = TrustNet(nets, method, samples, fits).to(pred.device)
    calibration = None
    if bool(cfg.get("calibrate", False)):
        from xpression.inference.calibration import calibrate_trust_net

        calibration = calibrate_trust_net(net, infos, pred.device, names=targets)
        if method == "mc_dropout":
            torch.manual_seed(int(cfg.get("mc_seed", 0)))  # the sweep's masks as without calibration
    names = trust_channels(targets, method != "none", want_ood)
    wrapped = Predictor(net, device=pred.device, precision=pred.precision, target_names=names,
                        compile=bool(cfg.get("compile", False)), context_stride=pred.context_stride)
    meta = {"method": method, "targets": targets, "sd_channels": names[len(targets): 2 * len(targets)] if method != "none" else [],
            "ood_channel": "ood" if want_ood else None,
            "members": [{"run_dir": str(i.run_dir), "checkpoint": str(i.checkpoint), "checkpoint_sha256": i.sha256}
                        for i in infos],
            "mc_samples": samples if method == "mc_dropout" else None,
            "mc_seed": int(cfg.get("mc_seed", 0)) if method == "mc_dropout" else None,
            "calibration": calibration,
            "ood": None if fits is None else {"method": fits[0].method, "train_p99": float(np.mean([f.threshold for f in fits])),
                                              "fits": [f.to_dict() for f in fits]}}
    return wrapped, meta


def trust_identity(meta: dict | None) -> dict:
    """What makes a trust map this configuration's (a resumed store must match it)."""
    if meta is None:
        return {}
    return {"uncertainty": {"method": meta["method"], "members": [m["checkpoint_sha256"] for m in meta["members"]],
                            "mc_samples": meta["mc_samples"], "mc_seed": meta["mc_seed"],
                            "ood": meta["ood_channel"] is not None and (meta["ood"] or {}).get("method", "mahalanobis"),
                            "sd_scale": (meta.get("calibration") or {}).get("scale")}}
