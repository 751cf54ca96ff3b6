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
