"""Train a model on one or more ST sections: `python train.py [group=option ...] [key=value ...]`.

See conf/train.yaml for the groups; `python train.py --help` lists them. `python train.py
resume=RUN` continues an interrupted run in its folder (README, "Training").
"""

import hydra
from omegaconf import DictConfig

from xpression.resolvers import register_resolvers

register_resolvers()  # the resolvers conf/ uses, before Hydra composes


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from xpression.cli import run_reporting_input_errors
    from xpression.training import train

    return run_reporting_input_errors(train, cfg)


if __name__ == "__main__":
    main()
