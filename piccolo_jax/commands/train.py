"""Train a piccolo embedding model: `piccolo-jax train --stage pretrain|finetune` (= `python scripts/train.py`).

With no other arguments it trains the tiny config on the bundled sample data (CPU, under a minute):

    piccolo-jax train --stage pretrain                          # -> runs/pretrain
    piccolo-jax train --stage finetune --init runs/pretrain     # -> runs/finetune

Real recipes: --config pretrain / finetune (the bundled configs/pretrain.toml, configs/finetune.toml) with
--set data.paths=my/data/ (one path; several as a list: --set 'data.paths=["a/", "b.jsonl"]'). Any field
can be overridden with --set section.key=value, or for one stage only --set finetune.optim.lr=2e-5
(type-checked; unknown keys are refused before anything compiles).

The same command again continues the run: a finished run says so (and writes its export if missing), a
larger run.steps extends it, an interrupted one resumes from its latest checkpoint. SIGTERM / Ctrl-C stop
after the step in flight with a checkpoint, exit 0. Exit codes: 0 done or stopped on request, 1 failure
(failed save, non-finite training, lost peer), 2 bad configuration or input, 128+N killed by signal N.

Multi-host: under SLURM, on a TPU pod, or with JAX_COORDINATOR_ADDRESS set, jax.distributed is
initialised automatically; or pass --coordinator HOST:PORT --num-processes N --process-id I. Every
process runs the same command; a process that loses a peer exits 1 naming the last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

from piccolo_jax.parallel.processes import (
    SUPERVISED_ENV,
    add_distributed_arguments,
    init_distributed,
    multi_process,
    run_child,
)


def config_help() -> str:
    """--config's help: every bundled config by name, read from the configs directory (tiny first)."""
    from piccolo_jax.io.resources import bundled_configs

    names = sorted(bundled_configs(), key=lambda name: name != "tiny")
    named = ", ".join(f"{n} (default, CPU)" if n == "tiny" else n for n in names)
    return f"TOML config file, or a bundled one by name: {named}"


PROG = "piccolo-jax train"  # what every message of this command starts with: `PROG: error: ...`


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    from piccolo_jax.commands.errors import Parser

    p = Parser(prog=prog or PROG, description=__doc__)  # usage errors: `PROG: error: ...`, one line, exit 2
    p.add_argument("--stage", choices=("pretrain", "finetune"), required=True,
                   help="pretrain: weak pairs, in-batch loss; finetune: triplets with hard negatives, GTE loss")
    p.add_argument("--config", default="tiny", help=config_help())
    p.add_argument("--workdir", default=None, help="run directory (default: runs/<stage>); rerunning continues it")
    p.add_argument("--init", default=None,
                   help="start from an HF directory (e.g. piccolo-base-zh, bert-base-chinese), a piccolo-jax "
                        "model directory, a finished run directory (uses its export/model), or a Hugging Face hub "
                        "id ORG/NAME[@REVISION] (the local cache first; HF_HUB_OFFLINE=1: the cache only); its "
                        "tokenizer and its sentence-transformers prompts (as data.query_prefix / passage_prefix) come "
                        "with it unless the config sets them")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=2e-5 or --set finetune.optim.lr=2e-5 "
                        "(repeatable)")
    add_distributed_arguments(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p.parse_args(argv)


def supervise(argv: list[str], args, prog: str = PROG) -> int:
    """Run the trainer of this process as a child and report how it ended.

    JAX ends a process whose distributed service failed (another process died, most often the
    coordinator) with SIGABRT from C++, before Python can say anything. The supervisor outlives that and
    prints the one line a user needs: what was lost and where to resume from. Signals are forwarded.
    """
    from piccolo_jax.io.run_dir import EXIT_FAILURE, last_checkpoint_note

    rc = run_child("train", argv)
    if rc >= 0:
        return rc
    workdir = Path(args.workdir or f"runs/{args.stage}")
    who = args.process_id if args.process_id is not None else os.environ.get("SLURM_PROCID", "?")
    name = signal.Signals(-rc).name
    if -rc == signal.SIGABRT:
        sys.stderr.write(f"{prog}: error: process {who}: the JAX distributed service stopped this process (SIGABRT): "
                         f"another process of the run is gone (the coordinator {args.coordinator or ''} or a peer "
                         f"that stopped sending heartbeats); {last_checkpoint_note(workdir)}; rerun the same "
                         "command on every process to resume\n")
        return EXIT_FAILURE
    sys.stderr.write(f"{prog}: error: process {who}: the trainer was killed by {name}; "
                     f"{last_checkpoint_note(workdir)}; rerun the same command on every process to resume\n")
    return 128 - rc


def _leave(code: int) -> int:
    """After a failure that may leave Orbax or distributed-service threads behind: exit now (no hang)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or PROG
    args = parse_args(argv, prog)
    multi = multi_process(args)
    if multi and not args.print_config and os.environ.get(SUPERVISED_ENV) != "1":
        return supervise(argv, args, prog)

    from piccolo_jax.config import ConfigError, load_config
    from piccolo_jax.io.hub import is_hub_id, resolve_model_path
    from piccolo_jax.io.resources import find_config

    hub_init = args.init if args.init and is_hub_id(args.init) else None  # an id, not a path to make absolute
    # `init` set in load_config, an id too: the embedding width is then checked against the init model's
    overrides = list(args.overrides) + ([f"init={json.dumps(args.init)}"] if args.init else [])
    try:
        cfg = load_config(find_config(args.config), args.stage, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if hub_init:
        cfg = dataclasses.replace(cfg, init=hub_init)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False))
        return 0
    if hub_init:  # into the local cache now (downloaded when online): a missing id is one line before JAX
        try:
            resolve_model_path(hub_init)
        except FileNotFoundError as e:
            print(f"{prog}: error: --init {e}", file=sys.stderr)
            return 2
    from piccolo_jax.parallel.runtime import configure

    configure(cfg.run)  # before JAX starts its backends
    if multi:
        init_distributed(args, cfg.run.heartbeat_timeout_s)

    from piccolo_jax.io.run_dir import EXIT_FAILURE, EXIT_USAGE, RunError
    from piccolo_jax.training.checkpoint import CheckpointError
    from piccolo_jax.training.loop import train

    try:
        train(cfg, args.workdir or f"runs/{args.stage}")
    except RunError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        if isinstance(e, CheckpointError) or multi:
            return _leave(e.code)
        return e.code if e.code in (EXIT_FAILURE, EXIT_USAGE) else EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (second Ctrl-C); rerun the same command to resume from the latest checkpoint",
              file=sys.stderr)
        return _leave(130) if multi else 130
    if multi:
        import jax

        jax.distributed.shutdown()  # every process arrives here: leave together
    return 0
