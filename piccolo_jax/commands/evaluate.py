"""Evaluate an embedding model on local C-MTEB-style tasks: prints a table (x 100) and writes JSON.

    piccolo-jax evaluate --model MODEL_DIR bundled --output results.json   # the sample tasks, from any directory
    piccolo-jax evaluate --model RUN_DIR --mteb-tasks T2Retrieval,AFQMC   # mteb's tasks, data in the HF cache

MODEL_DIR is a Hugging Face directory, a piccolo-jax model directory, a training run directory (its
export/model), or a Hugging Face hub id ORG/NAME[@REVISION] (from the local cache; downloaded when online).

Each TASK argument is a task, or a directory whose entries (one level down) are tasks; `bundled` is the
sample set that ships with piccolo-jax (one task of each kind), from any directory. A file or directory
named `bundled` in the current directory wins over the sample set, as a local file wins over a bundled
config name (`./bundled` always means the local one; run from another directory for the sample set).

  retrieval  a directory with corpus.jsonl {"_id", "text", "title"?}, queries.jsonl {"_id", "text"} and
             qrels.tsv / qrels/test.tsv (query-id <TAB> corpus-id <TAB> score, optional header) or
             qrels.jsonl {"query-id", "corpus-id", "score"}
             -> ndcg@10, mrr@10, recall@1/10/100, map@100 (exact cosine search, top 100)
  STS        a .jsonl file of {"sentence1", "sentence2", "score"} -> cosine Spearman / Pearson
  reranking  a .jsonl file of {"query", "positive": [...], "negative": [...]} -> MAP, mrr@10

--dims 256,512,... also reports every local task's metrics on the first d coordinates of the embeddings,
renormalised (Matryoshka; each text is encoded once): table rows "NAME @d", JSON "dims": {"d": metrics}.

Queries and passages (retrieval and reranking) are encoded with the model's sentence-transformers prompts
("query", "document" in config_sentence_transformers.json; an export has the run's), else piccolo's
"查询: " / "结果: "; --query-prefix / --passage-prefix set others, --no-instructions turns the prefixes off
(for models trained without them). To reproduce the published
C-MTEB table, run the C-MTEB tasks with --mteb-tasks (the `mteb` package; each task's data must be in
the Hugging Face datasets cache, e.g. downloaded once online), or export each dataset into these layouts.
Retrieval numbers equal trec_eval's (pytrec_eval, as mteb uses it) on the same ranking.

Multi-host (local TASK paths): the same command in every process with --coordinator HOST:PORT
--num-processes N --process-id I (or under SLURM / on a TPU pod); each process encodes its share of the
texts on its own devices, every process computes the metrics on the gathered embeddings (the numbers one
process over all the devices gives), and process 0 prints the table and writes --output.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from piccolo_jax.commands.errors import InputError, Parser, run_guarded


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from piccolo_jax.commands.encoder_options import add_encoder_arguments, check_prefix_arguments
    from piccolo_jax.parallel.processes import multi_process, run_command

    p = Parser(prog=prog or "piccolo-jax evaluate", description=__doc__)
    add_encoder_arguments(p)
    p.add_argument("tasks", nargs="*", metavar="TASK",
                   help="task directory / .jsonl file, or a folder of them; `bundled`: the sample tasks that ship "
                        "with piccolo-jax (a local path named bundled wins)")
    p.add_argument("--mteb-tasks", default=None, metavar="NAME[,NAME...]",
                   help="also run these mteb tasks (e.g. T2Retrieval,AFQMC) with the mteb package, on data in the "
                        "Hugging Face datasets cache (HF_HOME); offline when HF_HUB_OFFLINE=1")
    p.add_argument("--output", type=Path, default=None, help="write results as JSON here")
    p.add_argument("--no-instructions", action="store_true", help="no query / passage prefixes")
    p.add_argument("--top-k", type=int, default=100, help="retrieval depth (recall@100 and map@100 need 100)")
    p.add_argument("--dims", default=None, metavar="D[,D...]",
                   help="Matryoshka: also the metrics on the first D coordinates (renormalised) of each embedding, "
                        "e.g. 256,512,1024 (local TASK paths; --mteb-tasks run at full width)")
    args = p.parse_args(argv)
    check_prefix_arguments(p, args)
    try:
        args.dims = _dims(args.dims)
    except ValueError as e:
        p.error(str(e))
    names = [n.strip() for n in (args.mteb_tasks or "").split(",") if n.strip()]
    if not args.tasks and not names:
        p.error("nothing to evaluate: give TASK paths and/or --mteb-tasks NAMES")
    if args.top_k < 10:
        p.error(f"--top-k {args.top_k}: ndcg@10 and mrr@10 need at least 10")
    if names and multi_process(args):
        p.error("--mteb-tasks runs in one process; evaluate local TASK paths across processes")
    return run_command(p.prog, args, lambda: run_guarded(p.prog, lambda: run(args, names)), command="evaluate",
                       argv=argv, outputs=() if args.output is None else (args.output,))


def run(args, mteb_names: list[str]) -> int:
    from piccolo_jax.commands.encoder_options import encoder_from_args
    from piccolo_jax.evaluation.runners import (
        evaluate_task,
        evaluate_task_at_dims,
        find_tasks,
        format_table,
        load_task,
    )
    from piccolo_jax.parallel.processes import is_main_process

    local = []  # every task file is read (and checked) before the model is loaded
    for path in find_tasks(args.tasks):
        kind, task = load_task(path)
        local.append((path, kind, task))
    mteb_tasks = _load_mteb_tasks(mteb_names) if mteb_names else []
    enc = encoder_from_args(args)
    too_wide = [d for d in args.dims if d > enc.dim]
    if too_wide:
        raise InputError(f"--dims {','.join(map(str, too_wide))}: wider than the model's embeddings ({enc.dim})")
    encode_kwargs = {"batch_size": args.batch_size, "tokens_per_batch": args.tokens_per_batch}
    results = {}
    for path, kind, task in local:
        start = time.perf_counter()
        options = dict(instructions=not args.no_instructions, top_k=args.top_k, **encode_kwargs)
        by_dim = None
        if args.dims:
            metrics, by_dim = evaluate_task_at_dims(enc, kind, task, args.dims, **options)
        else:
            metrics = evaluate_task(enc, kind, task, **options)
        name = path.stem if path.is_file() else path.name
        if name in results:
            name = str(path)
        results[name] = {"type": kind, "path": str(path), "metrics": metrics,
                         "seconds": round(time.perf_counter() - start, 3)}
        if by_dim is not None:
            results[name]["dims"] = {str(d): m for d, m in by_dim.items()}
    if not is_main_process():  # every process computed the same metrics; process 0 reports them
        return 0
    if results:
        print(format_table(results), end="")
    mteb_results = {}
    if mteb_tasks:
        from piccolo_jax.evaluation.mteb_model import MTEBModel, run_mteb_tasks

        model = MTEBModel(enc, instructions=not args.no_instructions,
                          name=f"piccolo-jax/{Path(args.model).resolve().name}", **encode_kwargs)
        mteb_results = run_mteb_tasks(model, mteb_tasks)
        print(("\n" if results else "") + format_mteb_table(mteb_results), end="")
    if args.output is not None:
        report = {"model": args.model, "instructions": not args.no_instructions,
                  "prefixes": None if args.no_instructions else {"query": enc.query_prefix,
                                                                  "passage": enc.passage_prefix},
                  "dtype": args.dtype,
                  "max_length": enc.max_length, "dim": enc.dim, "tasks": results}
        if args.dims:
            report["dims"] = args.dims
        if mteb_results:
            report["mteb"] = mteb_results
        _write_json(args.output, report)
        print(f"wrote {args.output}")
    return 0


def _dims(text: str | None) -> list[int]:
    """`--dims 256,512` -> [256, 512]: positive, distinct ints."""
    if text is None:
        return []
    try:
        dims = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--dims {text!r}: expected comma-separated ints, e.g. 256,512,1024") from None
    if not dims or any(d < 1 for d in dims) or len(set(dims)) != len(dims):
        raise ValueError(f"--dims {text!r}: expected distinct positive ints, e.g. 256,512,1024")
    return dims


def _load_mteb_tasks(names: list[str]) -> list:
    from piccolo_jax.evaluation.mteb_model import MTEBTasksUnavailable, load_mteb_tasks

    try:
        return load_mteb_tasks(names)
    except MTEBTasksUnavailable as e:
        raise InputError(str(e)) from None


def format_mteb_table(results: dict) -> str:
    """One line per task, split and subset: the task's main score x 100."""
    rows = [(name, split, entry.get("hf_subset", "default"), r["main_score"], entry.get("main_score"))
            for name, r in results.items() for split, entries in r["scores"].items() for entry in entries]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'[mteb]':<{width}}{'split':<12}{'subset':<12}{'metric':<18}{'score':>8}"]
    lines += [f"{n:<{width}}{sp:<12}{sub:<12}{m:<18}{100 * v:>8.2f}" for n, sp, sub, m, v in rows]
    return "\n".join(lines) + "\n"


def _write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    from piccolo_jax.parallel.processes import temp_path

    tmp = temp_path(path)
    try:
        tmp.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


if __name__ == "__main__":
    raise SystemExit(main())
