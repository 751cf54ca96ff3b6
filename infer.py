"""Sweep a trained model over held-out volumes: `python infer.py run=<run folder> [cohort=... | volume=...]`.

Then, for a cohort with a truth spec (the synthetic ones), score the maps against it with the
baselines without CT beside the model (`evaluate=false` skips it). See conf/infer.yaml for the
options; `python infer.py --help` lists them.
"""

import hydra
from omegaconf import DictConfig

from xpression.resolvers import register_resolvers

register_resolvers()  # the resolvers conf/ uses, before Hydra composes


@hydra.main(version_base="1.3", config_path="conf", config_name="infer")
def main(cfg: DictConfig) -> None:
    from xpression.cli import log_into, run_reporting_input_errors
    from xpression.config import check_infer_config, check_output_writable
    from xpression.evaluation.maps import evaluate_inference
    from xpression.inference.pipeline import infer
    from xpression.inference.shards import dist_rank_world

    def infer_and_score(cfg: DictConfig) -> None:
        check_infer_config(cfg)
        check_output_writable(cfg.output)
        rank = dist_rank_world()[0]
        log_file = log_into(cfg.output, f"{cfg.task_name}.log" if rank == 0 else f"{cfg.task_name}.rank{rank}.log")
        summary = infer(cfg)
        if rank == 0:
            evaluate_inference(cfg, summary)
            print(f"maps of {len(summary['volumes'])} volume(s) in {cfg.output} (<volume>/maps.ome.zarr, summary.json; "
                  f"log: {log_file.name})", flush=True)

    run_reporting_input_errors(infer_and_score, cfg, interrupted="interrupted: the same command continues the sweep "
                                                                 "(the tiles written so far are kept)")


if __name__ == "__main__":
    main()
