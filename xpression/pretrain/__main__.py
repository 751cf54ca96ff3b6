"""`python -m xpression.pretrain [key=value ...]`: see conf/pretrain.yaml."""

import hydra
from omegaconf import DictConfig

from xpression.config import CONF_DIR
from xpression.resolvers import register_resolvers

register_resolvers()  # the resolvers conf/ uses, before Hydra composes


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="pretrain")
def main(cfg: DictConfig) -> None:
    from xpression.cli import run_reporting_input_errors
    from xpression.pretrain.run import pretrain

    run_reporting_input_errors(pretrain, cfg)


if __name__ == "__main__":
    main()
