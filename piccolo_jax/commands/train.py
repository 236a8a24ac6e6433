"""Train a piccolo embedding model: `python scripts/train.py --stage pretrain|finetune`.

With no other arguments it trains the tiny config on the bundled sample data (CPU, about two minutes):

    python scripts/train.py --stage pretrain                          # -> runs/pretrain
    python scripts/train.py --stage finetune --init runs/pretrain     # -> runs/finetune

Real recipes: --config configs/pretrain.toml / configs/finetune.toml. Any field can be overridden with
--set section.key=value (type-checked; unknown keys are refused before anything compiles). Restarting
with the same --workdir resumes from its latest checkpoint; SIGTERM / Ctrl-C save a checkpoint and exit 0.

Multi-host: under SLURM, on a TPU pod, or with JAX_COORDINATOR_ADDRESS set, jax.distributed is
initialised automatically; or pass --coordinator HOST:PORT --num-processes N --process-id I.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path



def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("pretrain", "finetune"), required=True,
                   help="pretrain: weak pairs, in-batch loss; finetune: triplets with hard negatives, GTE loss")
    p.add_argument("--config", default=None, help="TOML config (default: configs/tiny.toml)")
    p.add_argument("--workdir", default=None, help="run directory (default: runs/<stage>); resumed if it exists")
    p.add_argument("--init", default=None,
                   help="start from an HF directory (e.g. piccolo-base-zh, bert-base-chinese), a piccolo-jax "
                        "model directory, or a finished run directory (uses its export/model)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=2e-5 (repeatable)")
    p.add_argument("--coordinator", default=None, help="multi-host: coordinator HOST:PORT")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p.parse_args(argv)


def init_distributed(args) -> None:
    import jax

    if args.coordinator or args.num_processes:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif (int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "JAX_COORDINATOR_ADDRESS" in os.environ
          or "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ):
        jax.distributed.initialize()  # cluster auto-detection (SLURM, Cloud TPU, env vars)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    from piccolo_jax.config import ConfigError, load_config

    config_path = args.config or "configs/tiny.toml"  # paths inside configs are relative to the repo root
    overrides = list(args.overrides) + ([f'init="{args.init}"'] if args.init else [])
    try:
        cfg = load_config(config_path, args.stage, overrides)
    except ConfigError as e:
        print(f"train.py: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import json

        print(json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False))
        return 0
    init_distributed(args)
    from piccolo_jax.train import train

    train(cfg, args.workdir or f"runs/{args.stage}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
