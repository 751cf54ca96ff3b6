"""Small networks for the inference tests (not collected: no test_ prefix)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TinyValidNet(nn.Module):
    """Valid-padding 3D CNN: dense-equivalent, output stride (1, 2, 2), patch (5, 13, 13)."""

    patch_shape = (5, 13, 13)
    output_stride = (1, 2, 2)
    dense_equivalent = True

    def __init__(self, targets: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv3d(1, 4, 3)
        self.c2 = nn.Conv3d(4, 6, (1, 3, 3))
        self.dense = nn.Conv3d(6, targets, (3, 3, 3))  # Flatten -> Linear written as a conv
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool3d(F.relu(self.c1(x)), (1, 2, 2))
        y = F.relu(self.c2(y))
        return torch.softmax(self.dense(y), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert tuple(x.shape[2:]) == self.patch_shape, x.shape
        return self.dense_forward(x)[:, :, 0, 0, 0]


class TinySameNet(TinyValidNet):
    """The same layers with ``same`` padding before the dense layer: not dense-equivalent."""

    dense_equivalent = False

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool3d(F.relu(F.conv3d(x, self.c1.weight, self.c1.bias, padding=1)), (1, 2, 2))
        y = F.relu(F.conv3d(y, self.c2.weight, self.c2.bias, padding=(0, 1, 1)))
        return torch.softmax(self.dense(y), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_forward(x)[:, :, 0, 0, 0]


class TinyPlaneNet(nn.Module):
    """A 2D map over the central plane from ``D`` slices, like a U-Net: plane dense output."""

    patch_shape = (5, 9, 9)
    output_stride = (1, 1, 1)
    dense_equivalent = False

    def __init__(self, targets: int = 2):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(5, targets, 3, padding=1)

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x[:, 0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_forward(x)[:, :, 4, 4]


def make_run(run_dir, manifest, patch_shape=(5, 33, 33), voxel_size_um=(6.4, 6.4, 6.4), seed=0,
             names=("alveolar", "airway", "vascular", "infected", "immune", "remodelling"), backbone=None,
             legacy=False, context_um=None):
    """A train.py-like run folder with an untrained cnn3d (valid padding) checkpoint carrying its
    input spec and run config, as train.py writes them (``legacy``: neither, as checkpoints
    written before they carried them). ``context_um``: a multi-scale model's context view (the
    backbone then defaults to a multi-scale pair of those cnn3d)."""
    import json
    from pathlib import Path

    import pytorch_lightning as pl
    import yaml

    from xpression.data.input_spec import INPUT_SPEC_KEY, InputSpec, IntensitySpec
    from xpression.data.registration import SPOT_RADIUS_UM
    from xpression.models import XPressionModule
    from xpression.runfolder import RUN_CONFIG_KEY

    torch.manual_seed(seed)
    targets = {"names": list(names), "kind": "composition"}
    spec = InputSpec.build(np.asarray(patch_shape) * np.asarray(voxel_size_um), voxel_size_um, patch_shape,
                           SPOT_RADIUS_UM, IntensitySpec(seed=seed), "uint8", targets, context_um=context_um)
    small = {"name": "cnn3d", "widths": [4, 8, 8], "kernel_size": [[3, 5, 5], [3, 3, 3], [1, 3, 3]],
             "pool": [1, 2, 2], "padding": "valid", "dense_width": 16, "dropout": 0.0}
    backbone = backbone or (small if context_um is None else {"name": "multiscale", "fine": small})
    module = XPressionModule(backbone=backbone, target_spec=targets, patch_shape=list(patch_shape),
                             spot_radius_vox=spec.spot_radius_vox, input_spec=None if legacy else spec)
    run_dir = Path(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    cfg = {"seed": seed, "data": {"manifest": str(manifest), "sections": None, "cache_dtype": "uint8"},
           "sampler": {"voxel_size_um": None}}
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": pl.__version__, "epoch": 0, "global_step": 0}
    if not legacy:
        ckpt.update({INPUT_SPEC_KEY: module.checkpoint_spec(), RUN_CONFIG_KEY: cfg})
    torch.save(ckpt, run_dir / "checkpoints" / "best.ckpt")
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run_dir / "metrics.json").write_text(json.dumps({"voxel_size_um": list(voxel_size_um),
                                                      "patch_shape_vox": list(patch_shape)}))
    return run_dir


def two_volume_cohort(out: "Path") -> "Path":
    """A tiny phantom cohort of two small volumes (mock_0, infected_0) written to ``out``;
    returns its manifest."""
    import subprocess
    import sys
    from pathlib import Path

    subprocess.run([sys.executable, "-m", "xpression.phantom", "--out", str(out), "--preset", "tiny", "--volumes", "2",
                    "--size-um", "160", "500", "500", "--quiet", "--workers", "1"], check=True,
                   cwd=Path(__file__).resolve().parents[1])
    return Path(out) / "cohort.yaml"


def infer_config(**over):
    """The composed `infer.py` config (conf/infer.yaml and its groups) outside a Hydra app, quiet
    and with small tiles; ``over``: dotted keys to set (every test sets ``output`` itself)."""
    from omegaconf import OmegaConf

    from xpression.config import compose

    cfg = compose("infer", ["run=unset"])
    OmegaConf.set_struct(cfg, False)
    del cfg["paths"]  # Hydra's runtime folder
    cfg.progress = False
    cfg.tile_vox = [16, 64, 64]
    for k, v in over.items():
        OmegaConf.update(cfg, k, v)
    return cfg
