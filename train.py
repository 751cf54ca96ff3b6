"""Train a model on one or more ST sections: `python train.py [group=option ...] [key=value ...]`.

See conf/train.yaml for the groups; `python train.py --help` lists them.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from xpression.training import train

    return train(cfg)


if __name__ == "__main__":
    main()
