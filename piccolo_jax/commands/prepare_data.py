"""Convert JSONL datasets (uniem/M3E/piccolo or FlagEmbedding format) into TFDS array_record datasets.

    python scripts/prepare_data.py --output data/tfds assets/data/finetune
    python scripts/prepare_data.py --output data/tfds --skip-bad-records corpus/a.jsonl corpus/b.jsonl

Each JSONL file becomes `OUTPUT/<name>/1.0.0/`, <name> being the file stem in snake_case. Point the
training config's data paths at OUTPUT (or at single dataset directories). Needs tensorflow-datasets,
array-record and importlib_resources (the `tfds` extra); TensorFlow is not needed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


from piccolo_jax.data.config import RECORD_FORMATS  # noqa: E402
from piccolo_jax.data.records import BadRecord  # noqa: E402
from piccolo_jax.data.sources import find_dataset_paths  # noqa: E402


def main(argv: list[str] | None = None, prog: str | None = None) -> int | None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="JSONL files or directories of JSONL files")
    parser.add_argument("--output", required=True, help="TFDS data_dir to write into")
    parser.add_argument("--record-format", default="auto", choices=RECORD_FORMATS)
    parser.add_argument("--skip-bad-records", action="store_true",
                        help="skip (and count) bad records instead of stopping at the first one")
    parser.add_argument("--max-record-bytes", type=int, default=1 << 20, help="longest accepted line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    from piccolo_jax.data import tfds_store  # imports tensorflow_datasets
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    files = [p for p in find_dataset_paths(args.inputs) if p.endswith(".jsonl")]
    if not files:
        parser.error(f"no .jsonl files in {args.inputs}")
    for path in files:
        try:
            out = tfds_store.write_dataset(path, args.output, record_format=args.record_format,
                                           skip_bad_records=args.skip_bad_records,
                                           max_record_bytes=args.max_record_bytes)
        except BadRecord as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        builder = tfds.builder_from_directory(out)
        with open(os.path.join(out, tfds_store.SOURCE_FILE), encoding="utf-8") as f:
            bad = sum(json.load(f)["bad_records"].values())
        print(f"{path} -> {out}: {builder.info.splits['train'].num_examples} records, {bad} bad records skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
