"""Sweep a trained model over held-out volumes: `python infer.py run=<run folder> [cohort=... | volume=...]`.

See conf/infer.yaml for the options; `python infer.py --help` lists them.
"""

import hydra
from omegaconf import DictConfig

import xpression  # noqa: F401  (registers the resolvers conf/ uses, before Hydra composes)


@hydra.main(version_base="1.3", config_path="conf", config_name="infer")
def main(cfg: DictConfig) -> None:
    from xpression.cli import run_reporting_input_errors
    from xpression.inference.pipeline import infer

    run_reporting_input_errors(infer, cfg)


if __name__ == "__main__":
    main()
