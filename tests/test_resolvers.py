"""`${phantom:DIR,PRESET}` generates a missing cohort once and then reuses it."""

from omegaconf import OmegaConf

from xpression.resolvers import register_resolvers

register_resolvers()
from xpression.resolvers import ensure_phantom


def test_phantom_resolver_generates_once(tmp_path):
    cfg = OmegaConf.create({"manifest": f"${{phantom:{tmp_path}/c,tiny}}"})
    path = cfg.manifest
    assert path == str(tmp_path / "c" / "cohort.yaml")
    stamp = (tmp_path / "c" / "cohort.yaml").stat().st_mtime_ns
    assert ensure_phantom(str(tmp_path / "c"), "tiny") == path
    assert (tmp_path / "c" / "cohort.yaml").stat().st_mtime_ns == stamp  # reused, not regenerated


def test_scale_takes_one_factor_or_one_per_axis():
    import pytest

    from xpression.resolvers import scale

    register_resolvers()
    cfg = OmegaConf.create({"size": [57.6, 205.0, 205.0], "x3": "${scale:${size},3}", "deep": "${scale:${size},[7,4,4]}"})
    assert cfg.x3 == pytest.approx([172.8, 615.0, 615.0])
    assert cfg.deep == pytest.approx([403.2, 820.0, 820.0])
    OmegaConf.resolve(cfg)  # what `train.py --cfg job --resolve` does: a resolver's list must be storable
    assert list(cfg.deep) == pytest.approx([403.2, 820.0, 820.0])
    with pytest.raises(ValueError, match="2 factors for 3 values"):
        scale([1.0, 2.0, 3.0], [1, 2])
