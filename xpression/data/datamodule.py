"""The LightningDataModule: cohort manifest -> batches of (CT patch, target) tensors.

Cheap metadata (``voxel_size_um``, ``patch_shape_vox``, then ``target_spec``) is available
before any voxel is read. ``setup()`` reads one normalised slab per section (the patch depth
plus margins, over the spots' extent), caches it in shared memory, and patches become slices
of it. Loader batches carry the patches as cached (``uint8`` levels ``round(255 x)``, or
``float16``): a quarter of the bytes through worker processes, pinned memory and the bus.
:func:`image_to_float` turns them into the float32 ``[0, 1]`` intensities the networks take;
:meth:`XPressionDataModule.on_after_batch_transfer` does so on the device for every Lightning
loop (and augments training batches there), :meth:`XPressionDataModule.device_batch` outside one.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from xpression.data.augment import TRANSFORM_NAMES, Augment, keeps_shape, transform_patch
from xpression.data.context import ContextView
from xpression.data.geometry import DataError, SlabGrid
from xpression.data.input_spec import InputSpec, IntensitySpec, resolve_reference
from xpression.data.intensity import SCALINGS, IntensityNormalizer
from xpression.data.manifest import Cohort, load_manifest
from xpression.data.mask import tissue_mask
from xpression.data.patches import QUANTISATIONS, cut_patch, image_to_float, patches_inside, read_slab, slab_grid
from xpression.data.placement import check_patch_fits, placement_problem
from xpression.data.registration import SPOT_RADIUS_UM
from xpression.data.sampling import SpotEpochSampler, SpotSampler
from xpression.data.sections import Section, load_section
from xpression.data.splits import SpatialBlocksSplit
from xpression.data.targets import ObsmTarget, TargetSpec, dominant_index
from xpression.data.volume import VolumeError, open_volume

__all__ = ["XPressionDataModule", "PatchDataset", "image_to_float"]

log = logging.getLogger(__name__)


def keep_training_share(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Split labels with all but a seeded random ``fraction`` of the ``train`` spots marked
    ``excluded`` (a label budget; the held-out spots are untouched)."""
    labels = np.asarray(labels).astype(object)
    rows = np.flatnonzero(labels == "train")
    if fraction >= 1.0 or not len(rows):
        return labels.astype(str)
    keep = max(1, int(round(fraction * len(rows))))
    dropped = np.random.default_rng([seed, 23]).permutation(rows)[keep:]
    labels[dropped] = "excluded"
    log.info("train_fraction %.3g: %d of %d training spots kept", fraction, keep, len(rows))
    return labels.astype(str)


def _instantiate(obj: Any, default: Any) -> Any:
    if obj is None:
        return default
    if hasattr(obj, "keys") and "_target_" in obj:
        from hydra.utils import instantiate

        return instantiate(obj)
    return obj


def _collate(data: Any) -> Any:
    return data if isinstance(data, (dict, PooledBatch)) else torch.utils.data.default_collate(data)


def _shared(array: np.ndarray) -> torch.Tensor:
    """``array`` in shared memory: worker processes (fork, spawn or forkserver) receive a handle
    to it, never a pickled copy of the data. Where shared memory is too small (containers with
    a small /dev/shm) it stays in private memory, which forked workers still share."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if not shm_has_room(t.nbytes):
        log.warning("slab cache of %.0f MB kept in private memory (/dev/shm has %.0f MB free)", t.nbytes / 1e6,
                    (shm_free_bytes() or 0) / 1e6)
        return t
    try:
        out = torch.empty(t.shape, dtype=t.dtype).share_memory_()
    except RuntimeError as err:
        log.warning("slab cache of %.0f MB kept in private memory (no shared memory: %s)", t.nbytes / 1e6, err)
        return t
    out.copy_(t)
    return out


_POOLS: "weakref.WeakValueDictionary[tuple[int, int], BatchPool]" = weakref.WeakValueDictionary()
_POOL_IDS = itertools.count()


class BatchPool:
    """Batch slots in shared memory for the workers of one loader: ``per_worker`` slots for each
    worker (its ``prefetch_factor``, the most batches it has in flight). Allocated and touched
    in the main process before the workers start, so a batch costs neither a fresh shared-memory
    segment (``shm_open``, ``mmap``, a page fault for every 4 KiB on both sides) nor a file
    descriptor passed to the main process for each of its tensors: a worker writes into a free
    slot of its own and sends a :class:`PooledBatch` (three integers); the main process's
    pin-memory thread copies the slot into pinned memory and frees it.

    A slot is taken (``busy``) by its worker and freed by the main process only; a worker that
    finds none of its slots free builds its batch in fresh shared memory, as without a pool."""

    def __init__(self, workers: int, per_worker: int, batch_size: int, item_shape: Sequence[int], dtype: torch.dtype,
                 n_targets: int):
        slots = int(workers) * int(per_worker)
        self.per_worker, self.batch_size = int(per_worker), int(batch_size)
        self.image = torch.empty((slots, self.batch_size, *item_shape), dtype=dtype).share_memory_()
        self.target = torch.empty((slots, self.batch_size, int(n_targets)), dtype=torch.float32).share_memory_()
        self.index = torch.empty((slots, self.batch_size), dtype=torch.int64).share_memory_()
        self.busy = torch.zeros(slots, dtype=torch.int32).share_memory_()
        self.key = (os.getpid(), next(_POOL_IDS))
        self._next = 0
        self._register()

    def _register(self) -> None:
        self._busy = self.busy.numpy()
        _POOLS[self.key] = self

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_busy"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._register()

    @staticmethod
    def bytes_for(workers: int, per_worker: int, batch_size: int, item_shape: Sequence[int], dtype: torch.dtype,
                  n_targets: int) -> int:
        """Shared memory (bytes) a pool of these arguments takes: image, target and index slots."""
        item = int(np.prod(item_shape)) * torch.empty(0, dtype=dtype).element_size()
        return int(workers) * int(per_worker) * int(batch_size) * (item + 4 * int(n_targets) + 8)

    def claim(self, worker: int) -> int | None:
        """A free slot of ``worker`` (now taken), or None."""
        base = worker * self.per_worker
        for j in range(self.per_worker):
            slot = base + (self._next + j) % self.per_worker
            if not self._busy[slot]:
                self._busy[slot] = 1
                self._next = (slot - base + 1) % self.per_worker
                return slot
        return None

    def take(self, slot: int, rows: int, pin: bool = True) -> dict[str, torch.Tensor]:
        """The batch in ``slot`` copied out (into pinned memory if ``pin``); the slot is freed."""
        copy_out = (lambda t: t.pin_memory()) if pin else (lambda t: t.clone())
        out = {"image": copy_out(self.image[slot, :rows]), "target": copy_out(self.target[slot, :rows]),
               "index": copy_out(self.index[slot, :rows])}
        self._busy[slot] = 0
        return out


def shm_free_bytes(path: str = "/dev/shm") -> int | None:
    """Free bytes of the shared-memory file system (None where there is none to ask)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return int(st.f_bavail) * int(st.f_frsize)


def shm_has_room(nbytes: int, share: float = 1.0) -> bool:
    """Whether ``nbytes`` fit in ``share`` of the free shared memory (True where it cannot be
    asked). Pages of a full /dev/shm fail when touched, with a bus error that ends the process,
    not with an exception: ask before allocating."""
    free = shm_free_bytes()
    return free is None or nbytes <= free * share


class PooledBatch:
    """A worker's batch left in a :class:`BatchPool` slot. The loader's pin-memory thread turns it
    into the batch dict (``pin_memory``), so only the pool's key and the slot travel."""

    __slots__ = ("key", "slot", "rows")

    def __init__(self, key: tuple[int, int], slot: int, rows: int):
        self.key, self.slot, self.rows = key, slot, rows

    def __reduce__(self) -> tuple:
        return PooledBatch, (self.key, self.slot, self.rows)

    def pin_memory(self, device: Any = None) -> dict[str, torch.Tensor]:
        # called by the pin-memory thread, which runs only with a GPU (a plain copy without one)
        return _POOLS[self.key].take(self.slot, self.rows, pin=torch.cuda.is_available())


class PatchDataset(Dataset):
    """Patches sliced from cached slabs. Items are spot-table rows, ``(row, du_um, dv_um)``
    for a patch shifted in the section plane, or ``(row, du_um, dv_um, transform)`` for a patch
    under a fixed symmetry (index into ``augment.TRANSFORM_NAMES``). ``__getitems__`` returns a
    whole batch dict whose ``image`` has the slabs' dtype (see the module doc).

    The slabs live in shared memory: pickling the dataset (worker processes started by spawn or
    forkserver) sends handles, not voxels; in a worker, each batch is written straight into
    shared memory, so handing it to the main process copies nothing: into a slot of the
    loader's :class:`BatchPool` where it has one (:meth:`pooled`; the worker then returns a
    :class:`PooledBatch`, which the pin-memory thread turns into the batch dict), else into a
    fresh segment.

    With a ``context`` view (a multi-scale model), ``context_slabs`` and ``context_hw`` hold its
    filtered slabs and each row's centre in them; ``image`` is then ``(B, 2, D, H, W)``: the patch,
    then the context view around the same centre (shifted and transformed with it)."""

    def __init__(self, slabs: dict[str, tuple[np.ndarray, SlabGrid]], section: np.ndarray, centre_hw: np.ndarray, targets: np.ndarray, patch_shape: Sequence[int],
                 context: ContextView | None = None, context_slabs: dict[str, tuple[np.ndarray, SlabGrid]] | None = None,
                 context_hw: np.ndarray | None = None):
        self._tensors = {sid: (_shared(data), grid) for sid, (data, grid) in slabs.items()}
        self._context_tensors = {sid: (_shared(data), grid) for sid, (data, grid) in (context_slabs or {}).items()}
        self._views()
        self.context = context
        self.context_hw = None if context_hw is None else np.asarray(context_hw, dtype=np.int64)
        self.section = np.asarray(section)
        self.centre_hw = np.asarray(centre_hw, dtype=np.int64)
        self.targets = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
        self.half = np.array([int(p) // 2 for p in patch_shape])
        self.patch_shape = tuple(int(2 * h + 1) for h in self.half)
        self.batch_pool: BatchPool | None = None  # see pooled()

    def _views(self) -> None:
        self.slabs = {sid: (t.numpy(), grid) for sid, (t, grid) in self._tensors.items()}
        self.context_slabs = {sid: (t.numpy(), grid) for sid, (t, grid) in self._context_tensors.items()}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["slabs"], state["context_slabs"]  # numpy views would pickle their data; the shared tensors go instead
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._views()

    @property
    def channels(self) -> int:
        """1 (the patch) or 2 (the patch and its context view)."""
        return 1 if self.context is None else 2

    def __len__(self) -> int:
        return len(self.section)

    def patch(self, item: Any) -> tuple[np.ndarray, int]:
        """The raw cached patch (D, H, W) for one item (under its symmetry, if any), and its row."""
        row, du, dv = (item, 0.0, 0.0) if np.isscalar(item) else (item[0], item[1], item[2])
        transform = 0 if np.isscalar(item) or len(item) < 4 else int(item[3])
        row = int(row)
        data, grid = self.slabs[self.section[row]]
        h0, w0 = self.centre_hw[row]
        h, w = h0, w0
        if du or dv:
            h += int(np.rint(dv / grid.spacing_um[1]))
            w += int(np.rint(du / grid.spacing_um[2]))
        _, hh, hw = self.half
        h = int(np.clip(h, hh, data.shape[1] - hh - 1))
        w = int(np.clip(w, hw, data.shape[2] - hw - 1))
        patch = cut_patch(data, grid, h, w, self.patch_shape)
        if self.context is not None:  # the same shift, on the context slab's grid
            cdata, cgrid = self.context_slabs[self.section[row]]
            ch, cw = self.context_hw[row] + (h - h0, w - w0)  # type: ignore[index]
            patch = np.stack([patch, self.context.cut(cdata, cgrid, int(ch), int(cw))])
        return (transform_patch(patch, TRANSFORM_NAMES[transform]) if transform else patch), row

    def __getitems__(self, items: Sequence[Any]) -> dict[str, torch.Tensor] | PooledBatch:
        return self._batch(items, pooled=True)

    def __getitem__(self, item: Any) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self._batch([item], pooled=False).items()}

    def _batch(self, items: Sequence[Any], pooled: bool) -> dict[str, torch.Tensor] | PooledBatch:
        patches, rows = zip(*(self.patch(i) for i in items))
        n = len(patches)
        shape = (n, self.channels) + self.patch_shape
        dtype = torch.from_numpy(np.empty(0, patches[0].dtype)).dtype  # patches may be flipped views
        index = torch.as_tensor(rows, dtype=torch.int64)
        worker = torch.utils.data.get_worker_info()
        pool = self.batch_pool if pooled and worker is not None else None
        slot = pool.claim(worker.id) if pool is not None and n <= pool.batch_size and pool.image.dtype == dtype else None
        if slot is not None:  # a worker with a free slot: the batch stays there (see BatchPool)
            image = pool.image[slot, :n]
            pool.index[slot, :n] = index
            torch.index_select(self.targets, 0, index, out=pool.target[slot, :n])
        elif worker is not None:  # a worker: build the batch in shared memory
            storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * patches[0].itemsize)
            image = torch.empty(0, dtype=dtype).set_(storage, 0, shape)
        else:
            image = torch.empty(shape, dtype=dtype)
        np.stack(patches, out=image.numpy() if self.context is not None else image.numpy()[:, 0])
        if slot is not None:
            return PooledBatch(pool.key, slot, n)
        return {"image": image, "target": self.targets[index], "index": index}

    def pooled(self, workers: int, per_worker: int, batch_size: int) -> "PatchDataset":
        """This dataset (sharing its slabs) with a :class:`BatchPool` of its own for one loader's
        ``workers``; itself where shared memory cannot hold the pool."""
        dtype = next(iter(self._tensors.values()))[0].dtype
        args = (workers, per_worker, batch_size, (self.channels, *self.patch_shape), dtype, self.targets.shape[1])
        need = BatchPool.bytes_for(*args)
        if not shm_has_room(need, share=0.5):  # leave room for the batches that do not fit a slot
            log.warning("no shared batch slots for the loader workers: they need %.0f MB of /dev/shm, which has "
                        "%.0f MB free; each batch gets fresh shared memory", need / 1e6, (shm_free_bytes() or 0) / 1e6)
            return self
        try:
            pool = BatchPool(*args)
        except RuntimeError as err:
            log.warning("no shared batch slots for the loader workers (%s); each batch gets fresh shared memory", err)
            return self
        out = copy.copy(self)
        out.batch_pool = pool
        return out


class XPressionDataModule(pl.LightningDataModule):
    """Spots of one or more ST sections (one or more volumes) as CT-patch batches.

    ``manifest``: path to ``cohort.yaml`` or a loaded ``Cohort``. ``target``, ``sampler``,
    ``split``: config objects (or Hydra dicts with ``_target_``) from ``xpression.data.targets``,
    ``.sampling`` and ``.splits``. ``sections``: section ids to use (default all).
    ``max_residual_um``: landmark residual bound (um); ``max_drop_fraction``: largest share of a
    section's spots whose patch may leave the volume; ``slab_margin_um``: extra slab depth on
    each side (um); ``cache_dtype``: ``uint8`` or ``float16``; ``augment``: an :class:`Augment`
    applied to training batches after transfer to the device (None = default, False = off);
    ``check_tissue_mask``: fail on an empty tissue mask and log spots off the mask;
    ``intensity_reference``: a volume id (or path) whose intensity histogram every volume is
    matched to before normalisation (default: each volume's own robust range).
    ``intensity``: ``robust`` (robust percentile range -> [0, 1]) or ``divide255`` (8-bit
    values / 255, as the original study).
    ``train_fraction``: the share of the split's training spots used, a random subset fixed by
    ``seed`` (the rest are marked ``excluded``; held-out spots unchanged): label-budget ablations.
    ``normalizers``: ``{volume_id: IntensityNormalizer | its to_dict()}`` to reuse; others come
    from :attr:`intensity_spec`. After ``setup``, ``.normalizers`` holds the ones used.
    :meth:`input_spec` is everything a model trained on these batches needs to be fed new volumes
    the same way (it travels in the checkpoint; :mod:`xpression.data.patches` is the one path).
    """

    def __init__(
        self,
        manifest: str | Path | Any,
        target: Any = None,
        sampler: Any = None,
        split: Any = None,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
        sections: Sequence[str] | None = None,
        augment: Any = None,
        max_residual_um: float = SPOT_RADIUS_UM,
        max_drop_fraction: float = 0.5,
        slab_margin_um: float = 0.0,
        cache_dtype: str = "uint8",
        check_tissue_mask: bool = True,
        normalizers: dict[str, Any] | None = None,
        intensity_reference: str | None = None,
        intensity: str = "robust",
        train_fraction: float = 1.0,
    ):
        super().__init__()
        self.manifest = manifest
        self.target = _instantiate(target, ObsmTarget())
        self.sampler = _instantiate(sampler, SpotSampler())
        self.split = _instantiate(split, SpatialBlocksSplit())
        aug = _instantiate(augment, Augment())
        self.augment = None if aug is False else aug
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.pin_memory, self.persistent_workers = bool(pin_memory), bool(persistent_workers) and int(num_workers) > 0
        self.seed = int(seed)
        self.section_ids = None if sections is None else [str(s) for s in sections]
        self.max_residual_um, self.max_drop_fraction = float(max_residual_um), float(max_drop_fraction)
        self.slab_margin_um, self.cache_dtype = float(slab_margin_um), cache_dtype
        if cache_dtype not in QUANTISATIONS:
            raise DataError(None, f"data.cache_dtype must be one of {', '.join(QUANTISATIONS)}, got {cache_dtype!r}")
        self.check_tissue_mask = check_tissue_mask
        self.normalizers: dict[str, Any] = dict(normalizers or {})
        self.intensity_reference = intensity_reference
        if intensity not in SCALINGS:
            raise DataError(None, f"data.intensity must be one of {', '.join(SCALINGS)}, got {intensity!r}")
        self.intensity = str(intensity)
        if not 0.0 < float(train_fraction) <= 1.0:
            raise DataError(None, f"data.train_fraction must lie in (0, 1], got {train_fraction!r}")
        self.train_fraction = float(train_fraction)
        self._intensity_spec: IntensitySpec | None = None
        self._meta: dict | None = None
        self._prepared: dict | None = None
        self._datasets: dict[str, PatchDataset] | None = None
        self._aug_gen: torch.Generator | None = None
        self._train_sampler: SpotEpochSampler | None = None
        self._epoch = 0

    # -- cheap metadata ----------------------------------------------------------------------------
    def _load_meta(self) -> dict:
        if self._meta is not None:
            return self._meta
        cohort = self.manifest if isinstance(self.manifest, Cohort) else load_manifest(self.manifest)
        entries = list(cohort.sections)
        if self.section_ids is not None:
            unknown = sorted(set(self.section_ids) - {s.id for s in entries})
            if unknown:
                raise DataError(cohort.path, f"unknown section ids {unknown}; sections: {[s.id for s in entries]}")
            entries = [s for s in entries if s.id in self.section_ids]
        if not entries:
            raise DataError(cohort.path, "no ST sections to train on")
        volumes = {}
        for vid in dict.fromkeys(s.volume_id for s in entries):
            ventry = cohort.volume(vid)
            try:
                volumes[vid] = open_volume(ventry.image, ventry.voxel_size_um)
            except VolumeError as err:
                raise DataError(err.path or ventry.image, err.problem) from err
        vs = self.sampler.voxel_size_um
        first = volumes[entries[0].volume_id].voxel_size_um
        model_vs = tuple(float(v) for v in (first if vs is None else np.broadcast_to(np.asarray(vs, float), (3,))))
        shape = self.sampler.geometry.shape_vox(model_vs)
        patch_um = tuple(float(n * v) for n, v in zip(shape, model_vs))
        for vid, volume in volumes.items():
            check_patch_fits(volume, patch_um, vid)
        turning = [n for n in getattr(self.sampler, "copy_transforms", None) or [] if not keeps_shape(n, shape[1], shape[2])]
        if turning:
            raise DataError(cohort.path, f"sampler.copy_transforms {turning} would turn the {shape[1]} x {shape[2]} voxel "
                                         "patch on its side; use a square patch or shape-keeping symmetries")
        context = None
        if getattr(self.sampler, "context_um", None) is not None:
            try:
                context = ContextView.of(self.sampler.context_um, self.sampler.geometry.size_um, shape, model_vs,
                                         edges=getattr(self.sampler, "context_edges", "mirror"))
            except ValueError as err:
                raise DataError(None, str(err)) from err
            log.info("context view: %s um around each patch, every %s model voxels (%s um voxels)",
                     [round(e, 1) for e in context.extent_um], list(context.stride), [round(v, 2) for v in context.step_um])
        self._meta = {"cohort": cohort, "entries": entries, "volumes": volumes, "voxel_size_um": model_vs, "patch_shape": shape,
                      "context": context}
        return self._meta

    @property
    def voxel_size_um(self) -> tuple[float, float, float]:
        """The model's voxel size (z, y, x) um: ``sampler.voxel_size_um`` or the first volume's."""
        return self._load_meta()["voxel_size_um"]

    @property
    def patch_shape_vox(self) -> tuple[int, int, int]:
        """Patch (D, H, W) voxels at the model voxel size (odd, centred on the spot)."""
        return self._load_meta()["patch_shape"]

    @property
    def context(self) -> ContextView | None:
        """The context view of a multi-scale model (``sampler.context_um``), or None."""
        return self._load_meta()["context"]

    @property
    def target_spec(self) -> TargetSpec:
        """Target names and kind (reads the ST sections and computes targets, no CT voxels)."""
        return self._prepare()["spec"]

    @property
    def spots(self) -> pd.DataFrame:
        """One row per usable spot (batch ``index`` = row number)."""
        return self._prepare()["spots"]

    @property
    def spot_radius_um(self) -> float:
        """The spot radius a model's spot value stands for (um): the platform's nominal Visium
        spot radius. (Each section's registered radius, ``spots.spot_radius_um``, varies with
        the landmark fit and is used for jitter; the model's disk does not.)"""
        return SPOT_RADIUS_UM

    @property
    def intensity_spec(self) -> IntensitySpec:
        """How every volume's intensities are normalised (samples the reference volume once)."""
        if self._intensity_spec is None:
            ref = resolve_reference(self.intensity_reference, self._load_meta()["cohort"])
            try:
                self._intensity_spec = IntensitySpec.fit(self.intensity, *(ref or (None, None)), seed=self.seed)
            except ValueError as err:
                raise DataError(None, str(err)) from err
        return self._intensity_spec

    def input_spec(self) -> InputSpec:
        """The input contract of a model trained on this data module (see ``InputSpec``)."""
        return InputSpec.build(self.sampler.geometry.size_um, self.voxel_size_um, self.patch_shape_vox,
                               self.spot_radius_um, self.intensity_spec, self.cache_dtype, self.target_spec,
                               None if self.context is None else self.context.size_um,
                               "mirror" if self.context is None else self.context.edges)

    # -- sections, targets, spot table, split ---------------------------------------------------------
    def _margin(self, section: Section) -> tuple[float, float, float]:
        jitter = float(getattr(self.sampler, "jitter_fraction", 0.0)) * section.spot_radius_um
        return (self.slab_margin_um, self.slab_margin_um + jitter, self.slab_margin_um + jitter)

    def _grid_for(self, section: Section, volume: Any) -> SlabGrid:
        return slab_grid(section.plane, volume, section.uv_um, self.patch_shape_vox, self.voxel_size_um, self._margin(section))

    def _inside(self, section: Section, grid: SlabGrid, volume: Any) -> np.ndarray:
        return patches_inside(volume, grid, grid.index_of(section.uv_um), self.patch_shape_vox)

    def _prepare(self) -> dict:
        if self._prepared is not None:
            return self._prepared
        meta = self._load_meta()
        sections: dict[str, Section] = {}
        for entry in meta["entries"]:
            voxel = meta["volumes"][entry.volume_id].voxel_size_um
            sections[entry.id] = load_section(entry, max_residual_um=self.max_residual_um, voxel_size_um=voxel)
        values, spec = self.target.compute({sid: s.adata for sid, s in sections.items()})
        frames, grids, keep_targets = [], {}, []
        context, context_grids, context_hw = self.context, {}, []
        for sid, sec in sections.items():
            volume = meta["volumes"][sec.volume_id]
            grid = self._grid_for(sec, volume)
            inside = self._inside(sec, grid, volume)
            lost = int((~inside).sum())
            if lost:
                log.info("section %s: %d of %d spots dropped (patch leaves the volume)", sid, lost, len(inside))
            if lost > self.max_drop_fraction * len(inside):
                patch_um = np.asarray(self.patch_shape_vox) * np.asarray(self.voxel_size_um)
                raise placement_problem(sec, volume, inside, patch_um, self.max_drop_fraction)
            grids[sid] = grid
            hw = grid.index_of(sec.uv_um)[inside]
            pts = sec.points_um[inside]
            vox = volume.to_voxel(pts)
            frames.append(pd.DataFrame({
                "section_id": sid, "volume_id": sec.volume_id, "barcode": sec.barcodes[inside],
                "z_um": pts[:, 0], "y_um": pts[:, 1], "x_um": pts[:, 2],
                "z_vox": vox[:, 0], "y_vox": vox[:, 1], "x_vox": vox[:, 2],
                "u_um": sec.uv_um[inside, 0], "v_um": sec.uv_um[inside, 1],
                "px_x": sec.px[inside, 0], "px_y": sec.px[inside, 1],
                "spot_radius_um": sec.spot_radius_um, "slab_h": hw[:, 0], "slab_w": hw[:, 1],
            }))
            keep_targets.append(values[sid][inside])
            if context is not None:  # the view may leave the volume (read with its fill): no spot is dropped for it
                context_grids[sid] = context.grid(sec.plane, volume, sec.uv_um, self._margin(sec))
                context_hw.append(context_grids[sid].index_of(sec.uv_um)[inside])
        spots = pd.concat(frames, ignore_index=True)
        targets = np.concatenate(keep_targets).astype(np.float32)
        dom = dominant_index(targets, spec.kind)
        spots["dominant_idx"] = dom
        spots["dominant"] = np.asarray(spec.names, dtype=object)[dom]
        if self.check_tissue_mask:
            self._check_mask(spots, meta)
        planes = {sid: sections[sid].plane for sid in grids}
        size_um = self.sampler.geometry.extent_um(self.voxel_size_um)
        spots["split"] = keep_training_share(self.split.assign(spots, planes, size_um, self.seed), self.train_fraction, self.seed)
        self._prepared = {"sections": sections, "spec": spec, "spots": spots, "targets": targets, "grids": grids, "planes": planes,
                          "context_grids": context_grids, "context_hw": np.concatenate(context_hw) if context_hw else None}
        return self._prepared

    def _check_mask(self, spots: pd.DataFrame, meta: dict) -> None:
        for vid in spots["volume_id"].unique():
            volume = meta["volumes"][vid]
            try:
                mask = tissue_mask(volume)
            except VolumeError as err:
                raise DataError(err.path or volume.path, f"tissue mask: {err.problem}") from err
            if not mask.mask.any():
                raise DataError(volume.path, "the tissue mask is empty (no tissue found in the volume)")
            rows = spots["volume_id"].to_numpy() == vid
            off = int((~mask.contains(spots.loc[rows, ["z_um", "y_um", "x_um"]].to_numpy())).sum())
            if off:
                log.info("volume %s: %d of %d spots fall outside the CT tissue mask", vid, off, int(rows.sum()))

    # -- heavy reading ---------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Read, normalise and cache one slab per section (once), then build the datasets."""
        if self._datasets is not None:
            return
        prep, meta = self._prepare(), self._load_meta()
        norms = {k: IntensityNormalizer.from_dict(v) if isinstance(v, dict) else v for k, v in self.normalizers.items()}
        slabs, context_slabs = {}, {}
        for sid, grid in prep["grids"].items():
            vid = prep["sections"][sid].volume_id
            volume = meta["volumes"][vid]
            if vid not in norms:
                try:
                    norms[vid] = self.intensity_spec.transform_for(volume)
                except ValueError as err:
                    raise DataError(volume.path, str(err)) from err
            slabs[sid] = (read_slab(volume, grid, norms[vid], self.cache_dtype), grid)
            log.info("section %s: cached slab %s (%s, %.1f MB)", sid, slabs[sid][0].shape, self.cache_dtype, slabs[sid][0].nbytes / 1e6)
            if self.context is not None:
                cgrid = prep["context_grids"][sid]
                context_slabs[sid] = (self.context.read_slab(volume, cgrid, norms[vid], self.cache_dtype), cgrid)
                log.info("section %s: cached context slab %s (%.1f MB)", sid, cgrid.shape, context_slabs[sid][0].nbytes / 1e6)
        self.normalizers = norms
        spots = prep["spots"]
        full = PatchDataset(slabs, spots["section_id"].to_numpy(), spots[["slab_h", "slab_w"]].to_numpy(), prep["targets"], self.patch_shape_vox,
                            self.context, context_slabs, prep["context_hw"])
        self._datasets = {"all": full}
        self._aug_gen = torch.Generator().manual_seed(self.seed)

    def _rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.spots["split"].to_numpy() == split)

    def _loader(self, sampler: Any, workers: int | None = None) -> DataLoader:
        """A loader over ``sampler``'s spots with ``workers`` processes (default: ``num_workers``)."""
        if self._datasets is None:
            self.setup()
        dataset = self._datasets["all"]
        workers = self.num_workers if workers is None else int(workers)
        persistent = self.persistent_workers and workers > 0
        pin = self.pin_memory and torch.cuda.is_available()  # page-locking helps only a GPU copy
        prefetch = 2 if workers > 0 else None
        if pin and persistent:
            # One set of workers for the loader's life: each worker's slots are its own. Their
            # batches reach the caller through the pin-memory thread, which frees the slots.
            dataset = dataset.pooled(workers, prefetch, self.batch_size)
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, num_workers=workers,
            pin_memory=pin, persistent_workers=persistent, collate_fn=_collate, prefetch_factor=prefetch,
        )

    def train_sampler(self) -> SpotEpochSampler:
        """The training epoch sampler (built from the sampler config and the training rows)."""
        rows = self._rows("train")
        if len(rows) == 0:
            raise DataError(None, "the split left no training spots")
        spots = self.spots
        return self.sampler.build(rows, spots["dominant_idx"].to_numpy()[rows], spots["spot_radius_um"].to_numpy()[rows], self.seed)

    def train_dataloader(self) -> DataLoader:
        self._train_sampler = self.train_sampler()
        self._train_sampler.set_epoch(self._epoch)
        return self._loader(self._train_sampler)

    def set_epoch(self, epoch: int) -> None:
        """Make epoch ``epoch``'s draws and augmentations depend only on (seed, epoch), so a
        resumed run replays an uninterrupted one."""
        self._epoch = int(epoch)
        if self._train_sampler is not None:
            self._train_sampler.set_epoch(self._epoch)
        if self._aug_gen is not None:
            self._aug_gen.manual_seed(self.seed * 1_000_003 + self._epoch)

    def val_dataloader(self) -> DataLoader:
        return self._loader(SpotEpochSampler(self._rows("val"), shuffle=False))

    def test_dataloader(self) -> DataLoader:
        return self._loader(SpotEpochSampler(self._rows("test"), shuffle=False))

    def predict_dataloader(self) -> DataLoader:
        """Every spot of the table in row order, whatever its split, cut in the main process: a
        single pass over slabs cached in memory is quicker than starting loader workers for it
        (``benchmarks/post_fit.py``: 572 spots of 21 x 129 x 129 voxels in 0.29 s, 0.57 s with 2
        workers), and the passes after a fit (spot predictions, the ridge) each made new ones."""
        return self._loader(SpotEpochSampler(np.arange(len(self.spots)), shuffle=False), workers=0)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """On the device the batch was moved to: float32 intensities for every loop, and the
        augmentation for training batches."""
        batch = {**batch, "image": image_to_float(batch["image"])}
        trainer = getattr(self, "trainer", None)
        if self.augment is not None and trainer is not None and trainer.training:
            batch["image"] = self.augment(batch["image"], self._aug_gen)
        return batch

    def device_batch(self, batch: dict, device: torch.device | str = "cpu") -> dict:
        """A loader batch on ``device`` with float32 intensities (what a Lightning loop feeds the
        model), for use outside a Trainer; no augmentation."""
        moved = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        return {**moved, "image": image_to_float(moved["image"])}

    def apply_augment(self, batch: dict) -> dict:
        """Float32 intensities and the training augmentation, for use outside a Trainer
        (benchmarks, tests), on whatever device the batch is."""
        batch = {**batch, "image": image_to_float(batch["image"])}
        if self.augment is None:
            return batch
        return {**batch, "image": self.augment(batch["image"], self._aug_gen)}
