"""Evaluate an embedding model on local C-MTEB-style tasks: prints a table (x 100) and writes JSON.

    python scripts/evaluate.py --model MODEL_DIR assets/eval --output results.json

Each TASK argument is a task, or a directory whose entries (one level down) are tasks:

  retrieval  a directory with corpus.jsonl {"_id", "text", "title"?}, queries.jsonl {"_id", "text"} and
             qrels.tsv / qrels/test.tsv (query-id <TAB> corpus-id <TAB> score, optional header) or
             qrels.jsonl {"query-id", "corpus-id", "score"}
             -> ndcg@10, mrr@10, recall@1/10/100, map@100 (exact cosine search, top 100)
  STS        a .jsonl file of {"sentence1", "sentence2", "score"} -> cosine Spearman / Pearson
  reranking  a .jsonl file of {"query", "positive": [...], "negative": [...]} -> MAP, mrr@10

Queries are encoded with piccolo's "查询: " prefix and passages with "结果: " (retrieval and reranking);
--no-instructions turns the prefixes off (for models trained without them). To reproduce the published
C-MTEB table, export each C-MTEB dataset into these layouts, or run the `mteb` package with
`piccolo_jax.evaluation.MTEBModel(Encoder.load(MODEL_DIR))` as the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path



def main(argv: list[str] | None = None, prog: str | None = None) -> int | None:
    from piccolo_jax.inference import add_encoder_arguments

    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_encoder_arguments(p)
    p.add_argument("tasks", nargs="+", metavar="TASK", help="task directory / .jsonl file, or a folder of them")
    p.add_argument("--output", type=Path, default=None, help="write results as JSON here")
    p.add_argument("--no-instructions", action="store_true", help="no query / passage prefixes")
    p.add_argument("--top-k", type=int, default=100, help="retrieval depth (recall@100 and map@100 need 100)")
    args = p.parse_args(argv)

    from piccolo_jax.evaluation import evaluate_path, find_tasks, format_table
    from piccolo_jax.inference import encoder_from_args

    try:
        paths = find_tasks(args.tasks)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    enc = encoder_from_args(args)
    results = {}
    for path in paths:
        start = time.perf_counter()
        kind, metrics = evaluate_path(enc, path, instructions=not args.no_instructions, top_k=args.top_k,
                                      batch_size=args.batch_size, tokens_per_batch=args.tokens_per_batch)
        name = path.stem if path.is_file() else path.name
        if name in results:
            name = str(path)
        results[name] = {"type": kind, "path": str(path), "metrics": metrics,
                         "seconds": round(time.perf_counter() - start, 3)}
    print(format_table(results), end="")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        report = {"model": args.model, "instructions": not args.no_instructions, "dtype": args.dtype,
                  "max_length": enc.max_length, "tasks": results}
        args.output.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
