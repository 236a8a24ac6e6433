"""Mine hard negatives: encode queries and a corpus, search, sample negatives from a rank window.

    piccolo-jax mine --model runs/pretrain --input pairs.jsonl --output finetune.jsonl \\
        --window 10 100 --num-negatives 7

--model is a training run directory (its export/model), a piccolo-jax model directory, a Hugging Face
directory or a Hugging Face hub id ORG/NAME[@REVISION]. An existing --output is replaced only with
--overwrite.

Input: training JSONL in either record format, {"text": q, "text_pos": p} (uniem / piccolo) or
{"query": q, "pos": [p, ...], "prompt": ...} (BGE); existing negatives are replaced.
Corpus: --corpus FILE (JSONL with --corpus-field, or one passage per line), else every distinct positive
and negative of the input. Duplicate passages are searched once.
Output: {"text": q, "text_pos": p, "text_neg": [n1, ...]} per positive (--format uniem, default) or
{"query", "pos", "neg", "prompt"?} per record (--format bge). Negatives come from 0-based ranks
[START, END) of the exact cosine search, never a positive of the query nor the query itself, drawn
uniformly (seeded per query) and listed in rank order; rows whose window holds too few candidates get
fewer negatives and are counted. The output file appears only when complete.
Queries are encoded with their record's prompt, else the model's query prompt (its sentence-transformers
"query" prompt, else piccolo's "查询: "), passages with its document prompt (else "结果: "):
--query-prefix / --passage-prefix set others, --no-instructions none.

Multi-host: the same command in every process with --coordinator HOST:PORT --num-processes N
--process-id I (or under SLURM / on a TPU pod); each process encodes its share on its own devices, the
search runs over every process's devices, and process 0 writes the output (the lists one process over all
the devices writes). The others exit 0 when it is done.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from piccolo_jax.commands.errors import EXIT_USAGE, InputError, Parser, run_guarded


def read_records(path, columns: tuple[tuple[str, str], ...] = ()) -> list:
    """The records of the input: JSONL lines, or the rows of a table input (Parquet, Arrow, hub dataset),
    in any format the trainer reads, columns renamed by `columns` (--columns); the first bad one refused
    naming its file and line or row (unknown columns in the first: with the --columns to pass)."""
    from piccolo_jax.data import arrow_tables
    from piccolo_jax.data.jsonl_scan import CLI_HINT, schema_hint
    from piccolo_jax.data.records import BadRecord, UnknownSchema, parse_line

    mapping = dict(columns) or None
    if arrow_tables.is_table_input(path):
        from piccolo_jax.data.discovery import find_datasets
        from piccolo_jax.data.sources import open_sources

        try:
            name = find_datasets([str(path)])[0].name
            (source,) = open_sources([str(path)], skip_hint=CLI_HINT, columns={name: mapping} if mapping else None)
        except BadRecord as e:
            raise InputError(str(e)) from None
        if not len(source):
            raise InputError(f"{path}: no records (the table is empty)")
        return source.records(range(len(source)))
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")

    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                records.append(parse_line(raw, columns=mapping))
            except BadRecord as e:
                first = isinstance(e, UnknownSchema) and not records
                hint = f"; {schema_hint(CLI_HINT, Path(path).stem)}" if first else ""
                raise InputError(f"{path}:{lineno}: {e}{hint}") from None
    if not records:
        raise InputError(f"{path}: no records (the file is empty or blank)")
    return records


def read_corpus(path: Path, field: str | None) -> list[str]:
    """Passages to mine from: one a line, or one JSONL field a line; an empty passage is an error."""
    from piccolo_jax.io.text_files import check_text_input, iter_texts

    from piccolo_jax.data import arrow_tables

    if arrow_tables.is_table_input(path):
        if field is None:
            raise InputError(f"{path}: a table corpus needs --corpus-field naming the passage column")
        kind, opened = arrow_tables.open_input(path)
        items = (iter_texts(Path(opened), field) if kind == "jsonl" else
                 arrow_tables.table_texts(path, opened, field, option="--corpus-field"))
    else:
        check_text_input(path, field, option="--corpus-field")
        items = iter_texts(path, field)
    texts = []
    for line_id, text in items:
        if not text.strip():
            raise InputError(f"{path}:{line_id}: field {field!r} is empty")
        texts.append(text)
    if not texts:
        raise InputError(f"{path}: no passages (the file is empty or blank)")
    return texts


def output_exists(path: Path) -> str | None:
    """The refusal for an --output that exists (the wording of `convert`'s), or None when it does not."""
    return f"{path} exists (pass --overwrite to replace it)" if os.path.lexists(path) else None


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from piccolo_jax.commands.encode import input_path
    from piccolo_jax.commands.prepare_data import parse_columns
    from piccolo_jax.commands.encoder_options import add_encoder_arguments, check_prefix_arguments
    from piccolo_jax.parallel.processes import run_command

    p = Parser(prog=prog or "piccolo-jax mine", description=__doc__)
    add_encoder_arguments(p, max_length=False)  # passages use --passage-max-length
    p.add_argument("--input", required=True, type=input_path,
                   help="training records: JSONL, Parquet, Arrow, a save_to_disk directory or hf://datasets/ORG/NAME")
    p.add_argument("--output", required=True, type=Path, help="finetune JSONL to write (not an existing file "
                   "unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--corpus", type=input_path, default=None,
                   help="passages to mine from (default: the input's): text, JSONL, Parquet, Arrow or a hub dataset")
    p.add_argument("--corpus-field", default=None, help="JSONL field of --corpus (required for .jsonl; omit for "
                   "one passage a line)")
    p.add_argument("--window", type=int, nargs=2, default=(10, 100), metavar=("START", "END"),
                   help="0-based rank window [START, END) to sample from (default 10 100)")
    p.add_argument("--num-negatives", type=int, default=7, help="negatives per query (piccolo: 2 to 7)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--columns", default="", metavar="KEY=COLUMN,...",
                   help="read the input's columns as our record keys, e.g. text=question,text_pos=answer")
    p.add_argument("--format", choices=("uniem", "bge"), default="uniem", help="output record format")
    p.add_argument("--no-instructions", action="store_true", help="no query / passage prefixes")
    p.add_argument("--query-max-length", type=int, default=64, help="query token limit (piccolo: 64)")
    p.add_argument("--passage-max-length", type=int, default=None,
                   help="passage token limit (default: the model's max_seq_length, else 512)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    check_prefix_arguments(p, args)
    try:
        args.columns = parse_columns(args.columns) if args.columns else ()
    except ValueError as e:
        p.error(str(e))
    start, end = args.window
    if not 0 <= start < end:
        p.error(f"--window {start} {end}: need 0 <= START < END")
    if args.num_negatives < 1:
        p.error("--num-negatives must be positive")
    if args.corpus_field is not None and args.corpus is None:
        p.error("--corpus-field needs --corpus")
    if not args.overwrite and output_exists(args.output):  # before anything loads, as `convert` refuses
        sys.stderr.write(f"{p.prog}: error: {output_exists(args.output)}\n")
        return EXIT_USAGE
    return run_command(p.prog, args, lambda: run_guarded(p.prog, lambda: run(args)), command="mine", argv=argv,
                       outputs=(args.output,))


def run(args) -> int:
    from piccolo_jax.commands.encoder_options import encoder_from_args
    from piccolo_jax.inference.mining import mine_negatives, rows_for_output
    from piccolo_jax.parallel.processes import is_main_process, temp_path

    start, end = args.window
    records = read_records(args.input, args.columns)
    corpus = read_corpus(args.corpus, args.corpus_field) if args.corpus is not None else None
    if args.format == "uniem" and any(r.prompt for r in records):
        raise InputError(f"{args.input}: records carry a 'prompt', which the uniem format cannot hold; "
                         "use --format bge")
    enc = encoder_from_args(args)
    main = is_main_process()  # every process encodes and searches; process 0 writes
    mined, stats = mine_negatives(
        enc, records, corpus, window=(start, end), num_negatives=args.num_negatives, seed=args.seed,
        instructions=not args.no_instructions, query_max_length=args.query_max_length,
        passage_max_length=args.passage_max_length, batch_size=args.batch_size,
        tokens_per_batch=args.tokens_per_batch, show_progress=main and not args.no_progress)
    rows = rows_for_output(mined, args.format)
    if not main:
        return 0
    if not args.overwrite and output_exists(args.output):  # appeared while mining
        raise InputError(output_exists(args.output))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(args.output)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        os.replace(tmp, args.output)
    finally:
        if tmp.exists():
            tmp.unlink()
    stats.rows_written = len(rows)
    print(f"mine_negatives: {stats.queries} queries, corpus {stats.corpus_size} passages "
          f"({stats.corpus_duplicates_removed} duplicates merged), window [{start}, {end}), "
          f"{stats.rows_written} rows -> {args.output}; {stats.rows_short_of_negatives} row(s) got fewer "
          f"than {args.num_negatives} negatives, {stats.rows_without_negatives} got none")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
