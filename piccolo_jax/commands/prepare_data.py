"""Convert JSONL datasets (uniem/M3E/piccolo or FlagEmbedding format) into TFDS array_record datasets.

    piccolo-jax prepare --output data/tfds assets/data/finetune
    piccolo-jax prepare --output data/tfds --skip-bad-records --workers 16 corpus/a.jsonl corpus/b.JSONL

Each JSONL file becomes `OUTPUT/<name>/1.0.0/`, <name> being the file stem in snake_case; point the
training config's data paths at OUTPUT (or at single dataset directories). A directory input stands
for the .jsonl files directly inside it (any case); JSONL files in its subdirectories are refused,
list those directories themselves. Run again after editing inputs: unchanged files (same size and
SHA-256, same options) are reused, changed ones rebuilt; each line of output says which and why.
Files are cut into shards converted by --workers processes. Every dataset is built in a temporary
directory and renamed into place, so a failure leaves nothing behind.

Exit codes: 0 done, 2 bad input (bad record without --skip-bad-records, empty or all-bad file, two
inputs with one dataset name, missing or unsupported path), 1 any other failure. Needs
tensorflow-datasets and array-record (the `tfds` extra); TensorFlow is not needed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from concurrent.futures.process import BrokenProcessPool

from piccolo_jax.config.data import RECORD_FORMATS
from piccolo_jax.data.records import BadRecord


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="JSONL files or directories of JSONL files")
    parser.add_argument("--output", required=True, help="TFDS data_dir to write into")
    parser.add_argument("--record-format", default="auto", choices=RECORD_FORMATS)
    parser.add_argument("--skip-bad-records", action="store_true",
                        help="skip (and count) bad records instead of stopping at the first one")
    parser.add_argument("--max-record-bytes", type=int, default=1 << 20, help="longest accepted line")
    parser.add_argument("--workers", type=int, default=_cores(),
                        help="worker processes (default: the cores this process may use, %(default)s)")
    parser.add_argument("--shard-bytes", type=int, default=1 << 30,
                        help="most input bytes per shard (default 1 GiB)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.shard_bytes < 1 or args.max_record_bytes < 1:
        parser.error("--workers, --shard-bytes and --max-record-bytes must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    try:
        import array_record.python.array_record_module  # noqa: F401
        import tensorflow_datasets  # noqa: F401
    except ImportError as e:
        print(f"error: prepare needs tensorflow-datasets and array-record ({e}); "
              f"pip install 'piccolo-jax[tfds]'", file=sys.stderr)
        return 1
    from piccolo_jax.data.discovery import DatasetPathError
    from piccolo_jax.data.prepare import PrepareError, PrepareOptions, prepare

    options = PrepareOptions(args.record_format, args.skip_bad_records, args.max_record_bytes,
                             args.workers, args.shard_bytes)

    def report(outcome) -> None:
        how = {"built": "", "rebuilt": f"rebuilt ({outcome.reason}): ",
               "reused": f"reused ({outcome.reason}): "}[outcome.action]
        print(f"{outcome.path} -> {outcome.out}: {how}{outcome.records} records, "
              f"{outcome.bad_records} bad records skipped", flush=True)

    start = time.perf_counter()
    try:
        outcomes = prepare(args.inputs, args.output, options, report)
    except (PrepareError, BadRecord, DatasetPathError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenProcessPool as e:
        print(f"error: a worker process died ({e}); out of memory? try fewer --workers", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    built = sum(o.records for o in outcomes if o.action != "reused")
    if built:
        print(f"converted {built} records in {seconds:.1f} s ({built / seconds:,.0f} records/s, "
              f"{args.workers} workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
