"""Embed a corpus: JSONL (one field) or plain text (one text per line) -> .npy matrix + ids file.

    piccolo-jax encode --model runs/finetune --input corpus.jsonl --field text --id-field _id \\
        --output corpus.npy --kind passage

--model is a training run directory (its export/model), a piccolo-jax model directory, a Hugging Face
directory or a Hugging Face hub id ORG/NAME[@REVISION].

Writes OUTPUT (float32 [N, D], a NumPy .npy memory map filled chunk by chunk, so the corpus never has to fit
in memory) and OUTPUT with suffix .ids.txt (one id per line, row i of the matrix = line i): the
--id-field value for JSONL, else the 1-based line number of the text in the input file. Blank lines are
skipped (they keep their line numbers, so ids stay exact) and counted. A .jsonl input needs --field
(refused otherwise, listing the fields of its first record); every line is checked before the model
loads. Both files appear only when complete. Each chunk (--chunk-size texts) is sorted by length and bucketed by
the encoder.

Multi-host: run the same command in every process with --coordinator HOST:PORT --num-processes N
--process-id I (or under SLURM / on a TPU pod); every process reads the input, encodes its share of each
chunk on its own devices, receives the others' rows, and process 0 writes the files (the same bytes as
one process over all the devices would write). The others exit 0 when it is done.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def chunks(items: Iterator[tuple[str, str]], size: int) -> Iterator[tuple[list[str], list[str]]]:
    """(ids, texts) lists of at most `size` items."""
    ids: list[str] = []
    texts: list[str] = []
    for doc_id, text in items:
        ids.append(doc_id)
        texts.append(text)
        if len(texts) == size:
            yield ids, texts
            ids, texts = [], []
    if texts:
        yield ids, texts


def write_embeddings(enc, items, n_texts: int, out_path: Path | None, ids_path: Path | None, args, progress) -> int:
    """Encode chunk by chunk into a [n_texts, D] float32 .npy memory map; returns the rows written.
    Paths None (a process other than 0 of a multi-process run): encode, write nothing."""
    import numpy as np

    out = None if out_path is None else \
        np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=(n_texts, enc.dim))
    kind = None if args.kind == "none" else args.kind
    written = 0
    with open(os.devnull if ids_path is None else ids_path, "w", encoding="utf-8") as ids_file:
        for ids, texts in chunks(items, args.chunk_size):
            if written + len(texts) > n_texts:
                raise ValueError(f"{args.input}: changed while reading (more than {n_texts} texts)")
            e_nd = enc.encode(texts, kind=kind, batch_size=args.batch_size, tokens_per_batch=args.tokens_per_batch,
                              normalize=not args.no_normalize)
            if out is not None:
                out[written:written + len(texts)] = e_nd
            ids_file.writelines(i + "\n" for i in ids)
            written += len(texts)
            if progress is not None:
                progress.update(len(texts))
    if out is not None:
        out.flush()
    return written


def input_path(value: str):
    """An input argument: a hub dataset spec stays a string (a Path would fold its "//"), else a Path."""
    return value if "://" in value else Path(value)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from piccolo_jax.commands.encoder_options import add_encoder_arguments
    from piccolo_jax.commands.errors import Parser, run_guarded
    from piccolo_jax.parallel.processes import run_command

    p = Parser(prog=prog or "piccolo-jax encode", description=__doc__)
    add_encoder_arguments(p)
    p.add_argument("--input", required=True, type=input_path,
                   help="JSONL (with --field) or text file, one text per line; or a Parquet / Arrow file, a "
                        "save_to_disk directory or hf://datasets/ORG/NAME[:SPLIT] (with --field naming the column)")
    p.add_argument("--field", default=None, help="JSONL field holding the text (required for .jsonl; omit for a "
                   "plain text file)")
    p.add_argument("--id-field", default=None, help="JSONL field holding the id (default: line numbers)")
    p.add_argument("--output", required=True, type=Path, help="embeddings .npy (ids go to OUTPUT.ids.txt)")
    p.add_argument("--kind", choices=("query", "passage", "none"), default="none",
                   help="instruction prefix: query or passage (--query-prefix / --passage-prefix; default the "
                        "model's sentence-transformers prompts, else piccolo's '查询: ' / '结果: '), none (default)")
    p.add_argument("--chunk-size", type=int, default=100_000, help="texts read, sorted and encoded at a time")
    p.add_argument("--no-normalize", action="store_true", help="write raw pooled vectors (no L2 normalisation)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.field is None and args.id_field is not None:
        p.error("--id-field needs --field (a JSONL input)")
    if args.chunk_size < 1:
        p.error("--chunk-size must be positive")
    outputs = (args.output, args.output.with_suffix(".ids.txt"))
    return run_command(p.prog, args, lambda: run_guarded(p.prog, lambda: run(args)), command="encode", argv=argv,
                       outputs=outputs)


def run(args) -> int:
    from piccolo_jax.commands.encoder_options import encoder_from_args
    from piccolo_jax.commands.errors import InputError
    from piccolo_jax.io.text_files import check_text_input, count_lines, iter_texts
    from piccolo_jax.parallel.processes import is_main_process, temp_path

    from piccolo_jax.data import arrow_tables

    if arrow_tables.is_table_input(args.input):  # Parquet / Arrow / hub dataset: --field names the column
        if args.field is None:
            raise InputError(f"{args.input}: a table input needs --field naming the text column")
        kind, opened = arrow_tables.open_input(args.input)
        if kind == "jsonl":
            args.input = Path(opened)
        else:
            def texts():
                return arrow_tables.table_texts(args.input, opened, args.field, args.id_field)
            n_texts, n_blank = opened.num_rows, 0
    if not arrow_tables.is_table_input(args.input):
        check_text_input(args.input, args.field)
        n_texts, n_blank = count_lines(args.input)

        def texts():
            return iter_texts(args.input, args.field, args.id_field)
    if n_texts == 0:
        raise InputError(f"{args.input}: no texts (the file is empty or blank)")
    if args.field is not None:  # every record is checked before the model loads, not hours into encoding
        for _ in texts():
            pass
    enc = encoder_from_args(args)
    items = texts()
    if not is_main_process():  # encode its share, receive the rest, write nothing
        write_embeddings(enc, items, n_texts, None, None, args, None)
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    ids_path = args.output.with_suffix(".ids.txt")
    tmp_out, tmp_ids = temp_path(args.output), temp_path(ids_path)
    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=n_texts, unit="text", desc=f"encode {Path(args.input).name}")
    try:
        written = write_embeddings(enc, items, n_texts, tmp_out, tmp_ids, args, progress)
        if written != n_texts:
            raise InputError(f"{args.input}: changed while reading ({written} texts, counted {n_texts})")
        os.replace(tmp_out, args.output)
        os.replace(tmp_ids, ids_path)
    finally:
        for tmp in (tmp_out, tmp_ids):
            if tmp.exists():
                tmp.unlink()
        if progress is not None:
            progress.close()
    skipped = f"; {n_blank} blank line(s) skipped" if n_blank else ""
    print(f"encode: {n_texts} texts -> {args.output} [{n_texts}, {enc.dim}] float32 and {ids_path}{skipped}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
