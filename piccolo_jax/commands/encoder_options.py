"""Command-line options of the commands that encode (encode, evaluate, mine) and the Encoder they load."""

from __future__ import annotations

from piccolo_jax.parallel.processes import add_distributed_arguments


def add_encoder_arguments(parser, *, max_length: bool = True) -> None:
    """The command-line options every command that encodes shares (model, batching, dtype, placement,
    multi-host: `distributed.add_distributed_arguments`)."""
    parser.add_argument("--model", required=True, help="training run directory (e.g. runs/finetune: its "
                        "export/model), piccolo-jax model directory, Hugging Face BERT directory, or Hugging Face "
                        "hub id ORG/NAME[@REVISION] (the local cache first; HF_HUB_OFFLINE=1: the cache only)")
    parser.add_argument("--query-prefix", default=None, metavar="TEXT",
                        help="instruction before each query (default: the model's sentence-transformers query "
                             "prompt, else piccolo's '查询: '; '' for none)")
    parser.add_argument("--passage-prefix", default=None, metavar="TEXT",
                        help="instruction before each passage (default: the model's sentence-transformers document "
                             "prompt, else piccolo's '结果: '; '' for none)")
    parser.add_argument("--batch-size", type=int, default=None, help="at most this many texts per batch (as "
                        "sentence-transformers' batch_size; default: no limit, the token budget decides)")
    parser.add_argument("--tokens-per-batch", type=int, default=None,
                        help="computed tokens per batch; default: 1,024 per CPU device, 16,384 per GPU / TPU")
    if max_length:
        parser.add_argument("--max-length", type=int, default=None, help="token limit incl. [CLS]/[SEP] "
                            "(default: the model's sentence-transformers max_seq_length, else 512)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("--strategy", choices=("dp", "fsdp"), default="dp",
                        help="dp: parameters replicated; fsdp: parameters sharded over the devices (large models)")
    add_distributed_arguments(parser, heartbeat=True)


def check_prefix_arguments(parser, args) -> None:
    """--query-prefix / --passage-prefix contradict --no-instructions: a usage error (exit 2)."""
    given = [f for f, v in (("--query-prefix", args.query_prefix), ("--passage-prefix", args.passage_prefix))
             if v is not None]
    if given and getattr(args, "no_instructions", False):
        parser.error(f"{' and '.join(given)} and --no-instructions contradict each other: give one")


def encoder_from_args(args):
    """`Encoder.load` from the options of `add_encoder_arguments`. The model path (or hub id) is resolved
    first, so that a missing model is one line before JAX starts."""
    from piccolo_jax.io.run_dir import resolve_model_dir

    model = resolve_model_dir(args.model)
    from piccolo_jax.inference.encoder import Encoder

    return Encoder.load(model, dtype=args.dtype, strategy=args.strategy, max_length=getattr(args, "max_length", None),
                        query_prefix=args.query_prefix, passage_prefix=args.passage_prefix)
