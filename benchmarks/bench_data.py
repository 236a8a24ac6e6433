"""Data pipeline throughput: read -> sample -> tokenise -> pad, in examples per second.

    python benchmarks/bench_data.py                  # both stages, a few worker counts
    python benchmarks/bench_data.py --stage finetune --workers 2 --batches 20
    python benchmarks/bench_data.py --packing none --packing 8x4   # padded, and packed for 8 shards x 4 chunks

An example is one query with its positive (and K hard negatives in finetune). The data is synthetic
Chinese text with some English, written to a temporary directory, with piccolo's lengths: finetune
queries 8..40 characters, passages 150..700 characters (many reach the 512-token cap), 7 negatives;
pretrain 8..60 and 30..200 characters, both capped at 128 tokens. Batches come padded, or packed
(`data.packing`, the training default) for S batch shards x C gradient-caching chunks: the loader then
also bounds every text of the batch and plans the packed rows. `measure_rate` is importable.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from piccolo_jax.config import DataConfig
from piccolo_jax.data.loader import make_loader  # noqa: E402
from piccolo_jax.text.tokenizer import Tokenizer  # noqa: E402

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tokenizer")
STAGES = {  # query chars, passage chars, K, query / passage max length
    "finetune": ((8, 40), (150, 700), 7, 64, 512),
    "pretrain": ((8, 60), (30, 200), 0, 128, 128),
}
ENGLISH = ["GPU", "Python", "model", "embedding", "2024", "Wi-Fi", "API", "BERT", "3.14", "USB-C"]


def _text(rng: random.Random, chars: list[str], length: int) -> str:
    out, n = [], 0
    while n < length:
        if rng.random() < 0.05:
            word = " " + rng.choice(ENGLISH) + " "
        else:
            word = "".join(rng.choices(chars, k=rng.randint(2, 8)))
            if rng.random() < 0.3:
                word += rng.choice("，。、；：！？")
        out.append(word)
        n += len(word)
    return "".join(out)[:length]


def write_synthetic(directory: str, stage: str, rows: int, datasets: int = 2, seed: int = 0) -> None:
    """Write `datasets` JSONL files of `rows` synthetic records each for `stage` into `directory`."""
    (q_lo, q_hi), (p_lo, p_hi), k, _, _ = STAGES[stage]
    with open(os.path.join(TOKENIZER_DIR, "vocab.txt"), encoding="utf-8") as f:
        chars = [t for t in (line.rstrip("\n") for line in f) if len(t) == 1 and "\u4e00" <= t <= "\u9fff"]
    rng = random.Random(seed)
    for d in range(datasets):
        with open(os.path.join(directory, f"synthetic_{stage}_{d}.jsonl"), "w", encoding="utf-8") as f:
            for _ in range(rows):
                row = {"text": _text(rng, chars, rng.randint(q_lo, q_hi)),
                       "text_pos": _text(rng, chars, rng.randint(p_lo, p_hi))}
                if k:
                    row["text_neg"] = [_text(rng, chars, rng.randint(p_lo, p_hi)) for _ in range(k)]
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def measure(stage: str = "finetune", global_batch_size: int = 256, batches: int = 32,
            num_workers: int = 2, prefetch: int = 4, data_dir: str | None = None,
            tokenizer: Tokenizer | None = None, packing: tuple[int, int] | None = None) -> dict[str, float]:
    """{"rate": examples per wall second, "cpu_rate": examples per CPU second of this process} of the
    full pipeline for `stage`, padded or packed for `packing` = (shards, chunks); the first batch
    (warm-up) is not timed. Writes synthetic data to a temporary directory unless `data_dir` holds it."""
    tokenizer = tokenizer or Tokenizer.from_dir(TOKENIZER_DIR)
    _, _, k, query_len, passage_len = STAGES[stage]
    with tempfile.TemporaryDirectory() as tmp:
        if data_dir is None:
            data_dir = tmp
            write_synthetic(tmp, stage, rows=_rows_needed(global_batch_size, batches))
        cfg = DataConfig(paths=(data_dir,), global_batch_size=global_batch_size, num_negatives=k,
                         query_max_length=query_len, passage_max_length=passage_len,
                         num_workers=num_workers, prefetch=prefetch)
        with make_loader(cfg, tokenizer) as loader:
            if packing:
                loader.enable_packing(*packing)
            next(loader)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(batches):
                next(loader)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    examples = batches * global_batch_size
    return {"rate": examples / wall, "cpu_rate": examples / cpu}


def measure_rate(stage: str = "finetune", **kwargs) -> float:
    """Examples per second of the full pipeline (read, sample, tokenise, pad); see `measure`."""
    return measure(stage, **kwargs)["rate"]


def measure_hf_collator(stage: str, data_dir: str, global_batch_size: int = 256, batches: int = 8) -> float:
    """Examples per second of tokenising the same kind of batches with transformers.AutoTokenizer, as
    the collators of uniem / FlagEmbedding (PyTorch) do; reading and sampling are not included."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    _, _, k, query_len, passage_len = STAGES[stage]
    rows = []
    for name in sorted(os.listdir(data_dir)):
        with open(os.path.join(data_dir, name), encoding="utf-8") as f:
            rows += [json.loads(line) for line in f]
    start = time.perf_counter()
    for i in range(batches):
        chunk = [rows[(i * global_batch_size + j) % len(rows)] for j in range(global_batch_size)]
        reference(["查询: " + r["text"] for r in chunk], padding="longest", truncation=True,
                  max_length=query_len, return_tensors="np")
        passages = ["结果: " + p for r in chunk for p in [r["text_pos"], *r.get("text_neg", [])[:k]]]
        reference(passages, padding="longest", truncation=True, max_length=passage_len, return_tensors="np")
    return batches * global_batch_size / (time.perf_counter() - start)


def measure_step_rate(stage: str, batch: int, steps: int = 2) -> float:
    """Examples per second that the JAX train step consumes on this machine: piccolo-base-zh shape
    (768 / 12 layers), float32, one device, the stage's loss, every row at its max length (worst case)."""
    import jax
    import numpy as np

    from piccolo_jax.config.model import PICCOLO_BASE_ZH
    from piccolo_jax.parallel import sharding
    from piccolo_jax.training.optim import OptimConfig, make_optimizer
    from piccolo_jax.training.state import create_train_state
    from piccolo_jax.training.step import LossConfig, make_train_step

    _, _, k, q_len, p_len = STAGES[stage]
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1), jax.devices()[:1])
    optimizer = make_optimizer(OptimConfig(), 100)
    loss = LossConfig(kind="gte" if k else "in_batch", temperature=0.01)
    state = create_train_state(PICCOLO_BASE_ZH, optimizer, mesh, "dp", jax.random.key(0))
    step = make_train_step(PICCOLO_BASE_ZH, loss, optimizer, mesh, "dp")
    rng = np.random.default_rng(0)
    ids = lambda *shape: rng.integers(1000, 20000, size=shape, dtype=np.int32)  # noqa: E731
    host = {"query_input_ids": ids(batch, q_len), "query_attention_mask": np.ones((batch, q_len), np.int32),
            "passage_input_ids": ids(batch, p_len), "passage_attention_mask": np.ones((batch, p_len), np.int32)}
    if k:
        host["negative_input_ids"] = ids(batch, k, p_len)
        host["negative_attention_mask"] = np.ones((batch, k, p_len), np.int32)
    arrays = sharding.host_local_to_global(host, mesh)
    state, m = step(state, arrays, jax.random.key(0))  # compile + warm-up
    jax.block_until_ready(m)
    start = time.perf_counter()
    for i in range(steps):
        state, m = step(state, arrays, jax.random.key(i))
    jax.block_until_ready(m)
    return steps * batch / (time.perf_counter() - start)


def _rows_needed(global_batch_size: int, batches: int) -> int:
    """Records per dataset (2 datasets): up to 8 batches without a repeat, then later passes reread them."""
    return global_batch_size * (min(batches, 8) + 1) // 2 + global_batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=sorted(STAGES), action="append", help="default: both")
    parser.add_argument("--workers", type=int, action="append", help="default: 0, 1, 2")
    parser.add_argument("--batch", type=int, default=256, help="global batch size")
    parser.add_argument("--batches", type=int, default=32, help="timed batches (>> prefetch: prefetched "
                        "batches built during the warm-up are not work of the timed window)")
    parser.add_argument("--packing", action="append", metavar="SxC|none",
                        help="padded ('none') or packed for S shards x C chunks; default: none, 8x4")
    parser.add_argument("--no-step", action="store_true", help="skip the train-step rate (BERT-base on CPU)")
    args = parser.parse_args()
    tokenizer = Tokenizer.from_dir(TOKENIZER_DIR)
    print(f"cpu cores: {os.cpu_count()}; 'per CPU-s' divides by the CPU time of this process (all threads)")
    for stage in args.stage or ["pretrain", "finetune"]:
        _, _, k, q, p = STAGES[stage]
        with tempfile.TemporaryDirectory() as tmp:
            write_synthetic(tmp, stage, rows=_rows_needed(args.batch, args.batches))
            for layout in args.packing or ["none", "8x4"]:
                pack = None if layout == "none" else tuple(int(x) for x in layout.split("x"))
                for workers in args.workers or [0, 1, 2]:
                    m = measure(stage, args.batch, args.batches, workers, data_dir=tmp, tokenizer=tokenizer,
                                packing=pack)
                    name = "padded" if pack is None else f"packed {pack[0]}x{pack[1]}"
                    print(f"{stage:8s} query {q} / passage {p}, K={k}, batch {args.batch}, {name}, workers "
                          f"{workers}: {m['rate']:7.1f} examples/s ({m['rate'] * (2 + k):7.1f} texts/s), "
                          f"{m['cpu_rate']:7.1f} examples per CPU-s")
            hf = measure_hf_collator(stage, tmp, args.batch, args.batches)
            print(f"{stage:8s} transformers.AutoTokenizer alone (PyTorch collators): {hf:7.1f} examples/s")
            if not args.no_step:
                step_batch = 1 if k else 8  # BERT-base at 64 + 8 x 512 tokens is tens of seconds per query on 2 cores
                consumed = measure_step_rate(stage, step_batch)
                print(f"{stage:8s} train step (piccolo-base-zh, float32, this CPU, batch {step_batch}): "
                      f"{consumed:7.2f} examples/s -> pipeline / step = {m['rate'] / consumed:,.0f}x "
                      f"(target >= 3x)")


if __name__ == "__main__":
    main()
