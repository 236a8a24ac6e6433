"""Convert datasets (JSONL, Parquet, Arrow, Hugging Face hub datasets) into TFDS array_record datasets.

    piccolo-jax prepare --output data/tfds assets/data/finetune
    piccolo-jax prepare --output data/tfds --skip-bad-records --workers 16 corpus/a.jsonl corpus/b.JSONL
    piccolo-jax prepare --output data/tfds faq.parquet shards/ hf_saved/ hf://datasets/ORG/NAME:train
    piccolo-jax prepare --output data/tfds --columns text=question,text_pos=answer faq.parquet

Each dataset becomes `OUTPUT/<name>/1.0.0/`, <name> being its name in snake_case: a file's stem
(`a.jsonl`, `faq.parquet`), the NAME of Parquet shards `NAME-00000-of-00004.parquet`, the directory of a
`datasets.Dataset.save_to_disk`, a hub dataset's NAME. Point the training config's data paths at OUTPUT
(or at single dataset directories). A directory input stands for the data files directly inside it (any
case); data files in its subdirectories are refused, list those directories themselves. Records are
read as the trainer reads them: uniem / piccolo, FlagEmbedding and sentence-transformers keys or
columns, or your own columns renamed by --columns (applied to every input). Run again after editing
inputs: unchanged inputs (same sizes and SHA-256, same options and column map) are reused, changed ones
rebuilt; each line of output says which and why. Inputs are cut into shards (JSONL by bytes, Parquet /
Arrow by rows, streamed, never loaded whole) converted by --workers processes. Every dataset is built in
a temporary directory and renamed into place, so a failure leaves nothing behind. A prepared record
remembers where it came from: "file:line", or "file row N" (N from 1) for a Parquet / Arrow row.

Exit codes: 0 done, 2 bad input (bad record without --skip-bad-records, unknown columns, empty or all-bad
input, two inputs with one dataset name, missing or unsupported path, bad --columns), 1 any other
failure. Needs tensorflow-datasets and array-record (the `tfds` extra); TensorFlow is not needed.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from concurrent.futures.process import BrokenProcessPool

from piccolo_jax.commands.errors import Parser
from piccolo_jax.config.data import RECORD_FORMATS, RECORD_KEYS
from piccolo_jax.data.records import BadRecord


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_columns(text: str) -> tuple[tuple[str, str], ...]:
    """`--columns text=question,text_pos=answer` -> (("text", "question"), ("text_pos", "answer")): our record
    keys (config.data.RECORD_KEYS) read from the named columns. ValueError (one line) when malformed."""
    pairs: dict[str, str] = {}
    for item in text.split(","):
        ours, sep, theirs = (part.strip() for part in item.partition("="))
        if not sep or not ours or not theirs:
            raise ValueError(f"--columns {text!r}: expected KEY=COLUMN[,KEY=COLUMN...] (e.g. "
                             f"text=question,text_pos=answer), got {item.strip()!r}")
        if ours not in RECORD_KEYS:
            raise ValueError(f"--columns: {ours!r} is not a record key; expected one of {sorted(RECORD_KEYS)}")
        if ours in pairs:
            raise ValueError(f"--columns: {ours!r} is mapped twice ({pairs[ours]!r} and {theirs!r})")
        pairs[ours] = theirs
    return tuple(pairs.items())


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = Parser(prog=prog or "piccolo-jax prepare", description=__doc__)  # one-line usage errors, exit 2
    error = f"{parser.prog}: error:"
    parser.add_argument("inputs", nargs="+",
                        help="JSONL / Parquet / Arrow files, Parquet shard groups, save_to_disk directories, "
                             "directories of those, hf://datasets/ORG/NAME[/CONFIG][:SPLIT][@REVISION]")
    parser.add_argument("--output", required=True, help="TFDS data_dir to write into")
    parser.add_argument("--record-format", default="auto", choices=RECORD_FORMATS)
    parser.add_argument("--skip-bad-records", action="store_true",
                        help="skip (and count) bad records instead of stopping at the first one")
    parser.add_argument("--max-record-bytes", type=int, default=1 << 20, help="longest accepted JSONL line")
    parser.add_argument("--columns", default="", metavar="KEY=COLUMN,...",
                        help="read your columns as our record keys, for every input: e.g. "
                             f"text=question,text_pos=answer (keys: {', '.join(sorted(RECORD_KEYS))})")
    parser.add_argument("--workers", type=int, default=_cores(),
                        help="worker processes (default: the cores this process may use, %(default)s)")
    parser.add_argument("--shard-bytes", type=int, default=1 << 30,
                        help="most input bytes per shard (default 1 GiB)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.shard_bytes < 1 or args.max_record_bytes < 1:
        parser.error("--workers, --shard-bytes and --max-record-bytes must be >= 1")
    try:
        columns = parse_columns(args.columns) if args.columns else ()
    except ValueError as e:
        print(f"{error} {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    try:
        import array_record.python.array_record_module  # noqa: F401
        import tensorflow_datasets  # noqa: F401
    except ImportError as e:  # an extra not installed: the invocation cannot work here (exit 2, as bad input)
        print(f"{error} prepare needs tensorflow-datasets and array-record, the tfds extra ({e}): "
              f"pip install 'piccolo-jax[tfds]'", file=sys.stderr)
        return 2
    from piccolo_jax.data.discovery import DatasetPathError
    from piccolo_jax.data.prepare import PrepareError, PrepareOptions, prepare

    options = PrepareOptions(args.record_format, args.skip_bad_records, args.max_record_bytes,
                             args.workers, args.shard_bytes, columns=columns)

    def report(outcome) -> None:
        how = {"built": "", "rebuilt": f"rebuilt ({outcome.reason}): ",
               "reused": f"reused ({outcome.reason}): "}[outcome.action]
        print(f"{outcome.path} -> {outcome.out}: {how}{outcome.records} records, "
              f"{outcome.bad_records} bad records skipped", flush=True)

    start = time.perf_counter()
    try:
        outcomes = prepare(args.inputs, args.output, options, report)
    except (PrepareError, BadRecord, DatasetPathError, FileNotFoundError) as e:
        print(f"{error} {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{error} {e}", file=sys.stderr)
        return 1
    except BrokenProcessPool as e:
        print(f"{error} a worker process died ({e}); out of memory? try fewer --workers", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    built = sum(o.records for o in outcomes if o.action != "reused")
    if built:
        print(f"converted {built} records in {seconds:.1f} s ({built / seconds:,.0f} records/s, "
              f"{args.workers} workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
