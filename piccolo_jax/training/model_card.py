"""The model card of an export: `export/hf/README.md` in Hugging Face's format, as sentence-transformers
writes one with every save.

YAML front matter (library, pipeline tag, tags, language, base model when `init` is a hub id, dataset
names, and `model-index` with the evaluation results when the run evaluated), then the training recipe as
it ran (stage, steps, global batch and chunks, loss and temperature, optimizer, lengths, instructions,
datasets with their record counts, devices, time) and the evaluation table. Every YAML value is written as
JSON (YAML 1.2 reads JSON scalars and lists as they are), so any name or path is quoted safely.
"""

from __future__ import annotations

import json
from typing import Any

from piccolo_jax.config import TrainConfig
from piccolo_jax.io.hub import is_hub_id, parse_hub_id


def _yaml(key: str, value: Any, indent: int = 0) -> list[str]:
    pad = " " * indent
    if isinstance(value, list) and value and isinstance(value[0], dict):
        lines = [f"{pad}{key}:"]
        for item in value:
            first = True
            for k, v in item.items():
                sub = _yaml(k, v, indent + 2)
                if first:
                    sub[0] = f"{pad}- " + sub[0][len(pad) + 2:]
                    first = False
                lines += sub
        return lines
    if isinstance(value, dict):
        lines = [f"{pad}{key}:"]
        for k, v in value.items():
            lines += _yaml(k, v, indent + 2)
        return lines
    return [f"{pad}{key}: {json.dumps(value, ensure_ascii=False)}"]


def _task_of(metric: str) -> str:
    """eval/<kind>/<metric> -> the Hugging Face task type of model-index."""
    kind = metric.split("/")[1]
    return {"retrieval": "Retrieval", "sts": "STS", "reranking": "Reranking"}.get(kind, kind)


def model_card(cfg: TrainConfig, step: int, *, name: str, datasets: dict[str, dict] | None = None,
               evaluation: dict[str, float] | None = None, devices: str = "", seconds: float | None = None,
               max_seq_length: int | None = None, prompts: tuple[str, str] = ("", "")) -> str:
    """README.md text. `datasets`: the loader's report ({name: {"task", "records", ...}}); `evaluation`:
    {"eval/<kind>/<metric>": value} of the last evaluation; `devices`: e.g. "8 x tpu, 2 processes"."""
    datasets = datasets or {}
    evaluation = {k: v for k, v in (evaluation or {}).items() if k.startswith("eval/")}
    front: dict[str, Any] = {
        "library_name": "sentence-transformers",
        "pipeline_tag": "sentence-similarity",
        "tags": ["sentence-transformers", "sentence-similarity", "feature-extraction", "piccolo-jax"],
        "language": ["zh"],
    }
    if cfg.init and is_hub_id(cfg.init):
        front["base_model"] = parse_hub_id(cfg.init)[0]  # ORG/NAME without @REVISION
    if datasets:
        front["datasets"] = sorted(datasets)
    if evaluation:
        by_task: dict[str, list] = {}
        for key, value in sorted(evaluation.items()):
            by_task.setdefault(_task_of(key), []).append({"type": key.split("/", 2)[2], "value": round(value, 6)})
        eval_name = cfg.run.eval_path.rstrip("/").rsplit("/", 1)[-1] or "held-out"
        front["model-index"] = [{"name": name, "results": [
            {"task": {"type": task}, "dataset": {"name": eval_name, "type": "local"}, "metrics": metrics}
            for task, metrics in by_task.items()]}]
    lines = ["---"]
    for key, value in front.items():
        lines += _yaml(key, value)
    lines.append("---")

    m, d, loss, opt = cfg.model, cfg.data, cfg.loss, cfg.optim
    width = m.dense_out_features or m.hidden_size
    query, passage = prompts
    lines += [
        "", f"# {name}", "",
        f"A sentence-embedding model ({m.num_hidden_layers} layers, hidden size {m.hidden_size}, "
        f"{width}-dimensional embeddings, mean pooling, L2-normalised) trained with piccolo-jax, "
        f"stage `{cfg.stage}`, to step {step}.", "",
        "## Usage", "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        'model = SentenceTransformer("PATH_OR_ID")',
        'queries = model.encode(["北京的气候怎么样"], prompt_name="query")',
        'passages = model.encode(["北京属于温带季风气候。"], prompt_name="document")',
        "print(model.similarity(queries, passages))",
        "```", "",
        f"Prompts: queries `{query}`, documents `{passage}` (in config_sentence_transformers.json).", "",
        "## Training recipe (as run)", "",
        "| setting | value |", "|---|---|",
        f"| stage | {cfg.stage} |",
        f"| steps | {step} of {cfg.run.steps} |",
        f"| initialised from | {cfg.init or 'random'} |",
        f"| global batch | {d.global_batch_size} in {loss.num_chunks} chunk(s) (gradient caching) |",
        f"| loss | {loss.kind}, temperature {loss.temperature} |",
        f"| optimizer | AdamW, lr {opt.lr}, {opt.warmup_steps} warm-up steps, {opt.schedule} schedule, "
        f"weight decay {opt.weight_decay} |",
        f"| lengths | query {d.query_max_length}, passage {d.passage_max_length} tokens"
        + (f" (max_seq_length {max_seq_length})" if max_seq_length else "") + " |",
        f"| negatives per example | {d.num_negatives} |",
        f"| compute | {m.compute_dtype}, mesh strategy {cfg.parallel.strategy} |",
    ]
    if devices:
        lines.append(f"| devices | {devices} |")
    if seconds is not None:
        lines.append(f"| wall time of the last invocation | {seconds / 60:.1f} min |")
    if datasets:
        lines += ["", "### Datasets", "", "| dataset | task | records |", "|---|---|---|"]
        lines += [f"| {n} | {r.get('task', '')} | {r.get('records', '')} |" for n, r in sorted(datasets.items())]
    if evaluation:
        lines += ["", "## Evaluation", "", f"On `{cfg.run.eval_path}` at step {step}:", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k.split('/', 1)[1]} | {v:.4f} |" for k, v in sorted(evaluation.items())]
    return "\n".join(lines) + "\n"
