"""Filter-bank features + extremely randomised trees (``model=forest``).

The multi-scale features of :mod:`xpression.models.filterbank` (Gaussian mean, air and bright
fractions, local sd, gradient and Laplacian at scales from one voxel to about 100 um, read from
the patch and its context view) feed an ensemble of extremely randomised regression trees
(scikit-learn ``ExtraTreesRegressor``, one multi-output forest), fitted once on the training
spots. Few fitted numbers per label and features that are invariant to rotations and flips make
it learn from a few hundred spots what a network needs far more of; see the README's "What makes
the model learn" for how it scores beside the networks.

The fitted trees are stored as flat tensors (one node table for all trees), so a checkpoint holds
numbers only and is read back without scikit-learn; :func:`predict_trees` walks them as
scikit-learn does (a sample goes left where its float32 feature is ``<=`` the node's threshold)
and gives the same predictions.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from xpression.config import ConfigError
from xpression.data.input_spec import InputSpec
from xpression.models.closed_form import ClosedFormModel, map_rows
from xpression.models.filterbank import FilterBank

__all__ = ["FilterBankForest", "predict_trees", "tree_leaves", "trees_to_arrays"]

log = logging.getLogger(__name__)

# the flat node table of the fitted trees (state-dict buffers) and each one's dtype
TREE_KEYS = {"tree_feature": torch.int64, "tree_threshold": torch.float64, "tree_left": torch.int64,
             "tree_right": torch.int64, "tree_value": torch.float64, "tree_roots": torch.int64}


def trees_to_arrays(estimators: Sequence[Any]) -> dict[str, np.ndarray]:
    """scikit-learn regression trees -> one flat node table: ``tree_feature``, ``tree_threshold``,
    ``tree_left``, ``tree_right`` (global node indices, -1 at leaves), ``tree_value`` ``(nodes, T)``
    and ``tree_roots`` (each tree's first node)."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in TREE_KEYS}
    offset = 0
    for est in estimators:
        t = est.tree_
        left, right = t.children_left.astype(np.int64), t.children_right.astype(np.int64)
        parts["tree_feature"].append(np.where(left >= 0, t.feature, 0).astype(np.int64))
        parts["tree_threshold"].append(t.threshold.astype(np.float64))
        parts["tree_left"].append(np.where(left >= 0, left + offset, -1))
        parts["tree_right"].append(np.where(right >= 0, right + offset, -1))
        parts["tree_value"].append(t.value.reshape(t.node_count, -1).astype(np.float64))
        parts["tree_roots"].append(np.array([offset], np.int64))
        offset += t.node_count
    return {k: np.concatenate(v) for k, v in parts.items()}


def predict_trees(x: np.ndarray, feature: np.ndarray, threshold: np.ndarray, left: np.ndarray, right: np.ndarray,
                  value: np.ndarray, roots: np.ndarray) -> np.ndarray:
    """``(N, F)`` features -> ``(N, T)``: the mean over trees of each sample's leaf value."""
    return tree_leaves(x, feature, threshold, left, right, value, roots).mean(axis=1)


def tree_leaves(x: np.ndarray, feature: np.ndarray, threshold: np.ndarray, left: np.ndarray, right: np.ndarray,
                value: np.ndarray, roots: np.ndarray) -> np.ndarray:
    """``(N, F)`` features -> ``(N, trees, T)``: each sample's leaf value in every tree. Each
    step moves only the (sample, tree) paths not yet at a leaf."""
    x32 = np.asarray(x, np.float32)  # scikit-learn's trees compare float32 features with float64 thresholds
    n, trees = len(x32), len(roots)
    node = np.tile(roots, n)                     # (sample, tree) paths, sample-major
    sample = np.repeat(np.arange(n), trees)
    walking = np.flatnonzero(left[node] >= 0)
    while walking.size:
        here = node[walking]
        step = np.where(x32[sample[walking], feature[here]] <= threshold[here], left[here], right[here])
        node[walking] = step
        walking = walking[left[step] >= 0]
    return value[node].reshape(n, trees, -1)


class FilterBankForest(ClosedFormModel):
    """Filter-bank features of the patch (and its context view) + extremely randomised trees.

    Args:
        target_spec: names and kind of the targets.
        patch_shape: ``(D, H, W)`` voxels of every view.
        spot_radius_vox: accepted (and unused) so every model is built with the same arguments.
        sigmas_um: the filter bank's scales (um); each must fit a view (see
            :class:`~xpression.models.filterbank.FilterBank`).
        air_threshold, bright_threshold: normalised intensities below which a voxel is air and
            above which it is bright.
        distance_below, distance_above, distance_cap_um: levels of the filter bank's signed-distance
            features and their cap (um); none by default.
        share_below, share_above: further levels of the filter bank's shares; none by default.
        n_trees: trees in the forest.
        min_samples_leaf: training spots a leaf keeps at least (larger: smoother maps).
        max_features: share of the features drawn at each split.
        seed: the forest's random draws.
        input_spec: the data's input contract (voxel size, context view); default: the data
            module's, taken by :meth:`fit`.
    """

    family = "forest"

    def __init__(self, target_spec: Any, patch_shape: Sequence[int], spot_radius_vox: float | None = None,
                 sigmas_um: Sequence[float] = (6.4, 12.8, 25.6, 51.2, 102.4, 204.8), air_threshold: float = 0.3,
                 bright_threshold: float = 0.75, distance_below: Sequence[float] = (),
                 distance_above: Sequence[float] = (), distance_cap_um: float = 300.0, share_below: Sequence[float] = (),
                 share_above: Sequence[float] = (), n_trees: int = 300, min_samples_leaf: int = 3,
                 max_features: float = 0.5, seed: int = 0, input_spec: InputSpec | dict | None = None) -> None:
        super().__init__(target_spec, patch_shape, input_spec)
        self.sigmas_um = [float(s) for s in sigmas_um]
        self.air_threshold, self.bright_threshold = float(air_threshold), float(bright_threshold)
        self.distance_below = [float(t) for t in distance_below]
        self.distance_above = [float(t) for t in distance_above]
        self.distance_cap_um = float(distance_cap_um)
        self.share_below = [float(t) for t in share_below]
        self.share_above = [float(t) for t in share_above]
        self.n_trees, self.min_samples_leaf = int(n_trees), int(min_samples_leaf)
        self.max_features, self.seed = float(max_features), int(seed)
        if self.n_trees < 1 or self.min_samples_leaf < 1 or not 0 < self.max_features <= 1:
            raise ConfigError([f"model: n_trees and min_samples_leaf must be >= 1 and max_features in (0, 1], got "
                               f"{self.n_trees}, {self.min_samples_leaf}, {self.max_features}"])
        for key, dtype in TREE_KEYS.items():
            self.register_buffer(key, torch.zeros(0, dtype=dtype))
        self._bank: FilterBank | None = None
        if self.input_spec is not None:
            self.bank  # a scale no view reaches fails at construction, before any data is read

    @property
    def views(self) -> int:
        """Input channels: the patch, and the context view when the data has one."""
        return 1 if self.input_spec is None else self.input_spec.views

    @property
    def bank(self) -> FilterBank:
        if self._bank is None:
            if self.input_spec is None:
                raise RuntimeError("FilterBankForest has no input spec (voxel size); call fit(datamodule) or pass input_spec")
            steps = [self.input_spec.voxel_size_um]
            if self.input_spec.context is not None:
                steps.append(self.input_spec.context.step_um)
            self._bank = FilterBank(self.patch_shape, steps, self.sigmas_um, self.air_threshold, self.bright_threshold,
                                    self.distance_below, self.distance_above, self.distance_cap_um,
                                    self.share_below, self.share_above)
        return self._bank

    @property
    def fitted(self) -> bool:
        return self.tree_roots.numel() > 0

    def features(self, views: np.ndarray) -> np.ndarray:
        return self.bank(views)

    def fit_arrays(self, x: np.ndarray, y: np.ndarray) -> None:
        from sklearn.ensemble import ExtraTreesRegressor

        forest = ExtraTreesRegressor(n_estimators=self.n_trees, min_samples_leaf=self.min_samples_leaf,
                                     max_features=self.max_features, random_state=self.seed).fit(x, y)
        for key, value in trees_to_arrays(forest.estimators_).items():
            setattr(self, key, torch.from_numpy(value))
        order = np.argsort(forest.feature_importances_)[::-1][:5]
        log.info("forest: %d training spots, %d features, %d trees (%d nodes); most used: %s", len(x), x.shape[1],
                 self.n_trees, len(self.tree_feature),
                 ", ".join(f"{self.bank.names[i]} {forest.feature_importances_[i]:.2f}" for i in order))

    def _trees(self) -> list[np.ndarray]:
        """The stored trees' arrays (TREE_KEYS order), as :func:`tree_leaves` takes them."""
        return [getattr(self, k).cpu().numpy() for k in TREE_KEYS]

    def predict_features(self, x: np.ndarray) -> np.ndarray:
        trees = self._trees()
        return map_rows(lambda rows: predict_trees(rows, *trees), x)

    def predict_spread(self, x: torch.Tensor, with_features: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(B, C, D, H, W)`` views -> ``forward(x)`` ``(B, T)``, the sample SD (ddof 1) over the
        trees of each tree's prediction (in target units) and, ``with_features``, the ood features
        (:meth:`standardised`), from one computation of the features."""
        feats = self.tensor_features(x)
        trees = self._trees()
        leaves = map_rows(lambda rows: tree_leaves(rows, *trees), feats)
        each = self.valid(leaves.reshape(-1, leaves.shape[-1])).reshape(leaves.shape)
        mean = self.valid(leaves.mean(axis=1))  # what predict_from_features gives
        sd = each.std(axis=1, ddof=1 if leaves.shape[1] > 1 else 0).astype(np.float32)
        ood = torch.from_numpy(self.standardised(feats)) if with_features else None
        return torch.from_numpy(mean), torch.from_numpy(sd), ood

    def hyper_parameters(self) -> dict:
        return {**super().hyper_parameters(), "sigmas_um": list(self.sigmas_um), "air_threshold": self.air_threshold,
                "bright_threshold": self.bright_threshold, "distance_below": list(self.distance_below),
                "distance_above": list(self.distance_above), "distance_cap_um": self.distance_cap_um, "share_below": list(self.share_below),
                "share_above": list(self.share_above), "n_trees": self.n_trees,
                "min_samples_leaf": self.min_samples_leaf, "max_features": self.max_features, "seed": self.seed}
