"""`piccolo-jax <command> [options]`: the one entry point (also reachable as `python -m piccolo_jax`).

    piccolo-jax train --stage pretrain          # tiny config on the bundled sample data -> runs/pretrain
    piccolo-jax convert hf2jax HF_DIR OUT_DIR   # weights between Hugging Face format and ours
    piccolo-jax encode | evaluate | mine | prepare ...

`piccolo-jax <command> --help` lists each command's options. Exit codes: 0 done (or stopped on request),
1 failure, 2 bad configuration, input or invocation.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module under piccolo_jax.commands, one-line summary)
COMMANDS = {
    "train": ("train", "train or resume a run: --stage pretrain|finetune"),
    "convert": ("convert", "convert weights: hf2jax / jax2hf"),
    "encode": ("encode", "embed a corpus into a .npy matrix"),
    "evaluate": ("evaluate", "retrieval / STS / reranking metrics, local tasks or mteb"),
    "mine": ("mine_negatives", "mine hard negatives into finetune JSONL"),
    "prepare": ("prepare_data", "convert JSONL / Parquet / Arrow / hub datasets into TFDS array_record"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [__doc__.strip().splitlines()[0], "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from piccolo_jax import __version__

        print(f"piccolo-jax {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        sys.stderr.write(f"piccolo-jax: error: unknown command {name!r}; expected one of {', '.join(COMMANDS)}\n")
        return 2
    module = importlib.import_module(f"piccolo_jax.commands.{COMMANDS[name][0]}")
    return int(module.main(argv[1:], prog=f"piccolo-jax {name}") or 0)


if __name__ == "__main__":
    sys.exit(main())
