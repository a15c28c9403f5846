"""Train with the RASFT loss family on Megatron-Core (one process, or torchrun / srun + torchrun).

  python -m megatron_rasft train --config run.toml [--set loss.method=sft ...] [--resume]
  torchrun --nproc-per-node 8 -m megatron_rasft train --config run.toml

Without CUDA the run uses gloo and Megatron-Core on CPU. See examples/ for configs.
"""
HELP = "train a model (RASFT loop, GRPO, or any baseline loss) on Megatron-Core"

from megatron_rasft.commands import error


def add_arguments(p):
    p.add_argument("--config", help="TOML run configuration (sections: model, parallel, loss, "
                                    "grpo, weighting, rollout, train, checkpoint, eval)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.optim.lr=1e-5")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/ckpt/latest if present")


def main(args) -> int:
    import dataclasses
    import os

    from megatron_rasft.config import load_config

    cfg = load_config(args.config, args.set)  # first: a bad config is refused before torch and Megatron load
    if args.resume:
        cfg = cfg.replaced(checkpoint=dataclasses.replace(cfg.checkpoint, resume=True))

    from megatron_rasft.parallel.groups import destroy_distributed
    from megatron_rasft.rounds.coordination import RoundFailed
    from megatron_rasft.rundir import StaleRunDir
    from megatron_rasft.train.loop import NonFiniteLoss, train

    # destroy_distributed: every rank gets there together (a finished run, or an error each rank
    # raises at the same point: a NaN step, a failed round, a stale run directory), so the groups
    # are torn down while the interpreter is whole. Left to interpreter exit, gloo's worker threads
    # can still own tensors then, and the process aborts (SIGABRT, "terminate called without an
    # active exception") instead of returning its exit code. Any other exception leaves the groups
    # alone: a rank that raised alone must not wait on its peers.
    try:
        out = train(cfg)
    except StaleRunDir as e:  # a run directory or checkpoint of an older format: one line, as for a bad config
        if os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0":  # every rank reads the same files; one says it
            error(e)
        destroy_distributed()
        return 2
    except NonFiniteLoss as e:
        error(e)
        destroy_distributed()
        return 3
    except RoundFailed as e:  # the rollout server died and did not come back; a checkpoint was saved
        error(e)
        destroy_distributed()
        return 4
    destroy_distributed()
    print(f"done: {out['step']} steps, {out['tokens']} tokens; checkpoint {out['checkpoint']}", flush=True)
    return 0
