"""Peak memory of the packed gradient-caching train step at global batch 64 ... 4,096: flat in the batch.

    python benchmarks/bench_packed_memory.py            # B = 64, 512, 4096 pairs
    python benchmarks/bench_packed_memory.py --batches 64,256,1024,4096 --chunk 64

The step (`train_step.make_train_step`, AdamW) is compiled on abstract packed batches
(`memory.abstract_packed_batch`; nothing is allocated) and XLA's `memory_analysis()` read: peak = arguments +
outputs - aliased + temporaries (`piccolo_jax.training.memory`). A chunk is `--chunk` pairs (num_chunks = B /
chunk); its packed shapes are those `Loader.enable_packing` picks for the skewed-length Chinese corpus
of benchmarks/skewed_corpus.py at max length 128 (rows of 128 tokens), so every chunk computes the same
tokens whatever B. What still grows with B: the per-text token counts, the embeddings and their cached
gradients (4 B D float32) and the loss's blocks. The padded step at the same B (every row 128 tokens,
piccolo's pretrain recipe) is printed beside it. Model: hidden 128, 2 layers, FFN 512, vocab 21,128,
dropout 0.1; one device; in-batch loss, block_size 512.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common, skewed_corpus  # noqa: E402


def packed_rows(chunk: int, length: int) -> tuple[int, int]:
    """(R_q, R_d) that the loader picks for one chunk of `chunk` pairs of the skewed corpus."""
    from piccolo_jax.config import DataConfig
    from piccolo_jax.data.loader import make_loader
    from piccolo_jax.io.resources import bundled_tokenizer
    from piccolo_jax.text.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(bundled_tokenizer())
    with tempfile.TemporaryDirectory() as tmp:
        path = skewed_corpus.write_jsonl(skewed_corpus.records(tok, 64 * chunk), Path(tmp) / "pairs.jsonl")
        cfg = DataConfig(paths=(str(path),), global_batch_size=chunk, query_max_length=length,
                         passage_max_length=length, query_prefix="", passage_prefix="", num_workers=0)
        loader = make_loader(cfg, tok)
        loader.enable_packing(1, 1)
        return loader.packing.query_rows, loader.packing.document_rows


def peak(model_cfg, batch, num_chunks: int) -> dict[str, int]:
    import jax

    from piccolo_jax.parallel.sharding import MeshConfig, make_mesh
    from piccolo_jax.training import memory
    from piccolo_jax.training.optim import OptimConfig, make_optimizer
    from piccolo_jax.training.step import LossConfig

    mesh = make_mesh(MeshConfig(data=1, strategy="dp"), devices=jax.devices()[:1])
    optimizer = make_optimizer(OptimConfig(), total_steps=1_000)
    loss_cfg = LossConfig(kind="in_batch", num_chunks=num_chunks, block_size=512)
    batch = batch(mesh)
    return memory.memory_breakdown(memory.compile_train_step(model_cfg, loss_cfg, optimizer, mesh, "dp", batch))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batches", default="64,512,4096", help="global batches in pairs")
    ap.add_argument("--chunk", type=int, default=64, help="pairs per gradient-caching chunk")
    ap.add_argument("--length", type=int, default=128, help="max length of both sides (packed row length)")
    args = ap.parse_args(argv)

    from piccolo_jax.config.model import ModelConfig
    from piccolo_jax.data import packing
    from piccolo_jax.training import memory

    cfg = ModelConfig(vocab_size=21128, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=512, max_position_embeddings=512)
    rq, rd = packed_rows(args.chunk, args.length)
    print(common.environment_line())
    print(f"chunk {args.chunk} pairs: packed {rq} query rows + {rd} document rows of {args.length} tokens "
          f"({(rq + rd) * args.length} tokens) vs padded {2 * args.chunk} rows ({2 * args.chunk * args.length} tokens)")
    mib = 1024.0 ** 2
    rows, first = [], None
    for b in [int(x) for x in args.batches.split(",")]:
        chunks = max(1, b // args.chunk)
        spec = packing.PackingSpec(1, chunks, rq, args.length, rd, args.length)
        p = peak(cfg, lambda mesh, spec=spec, b=b: memory.abstract_packed_batch(mesh, spec, b), chunks)
        q = peak(cfg, lambda mesh, b=b: memory.abstract_batch(mesh, b, args.length, args.length), chunks)
        first = first or p["peak"]
        rows.append([b, chunks, p["temporaries"] / mib, p["peak"] / mib, f"{p['peak'] / first:.2f}x",
                     q["peak"] / mib, f"{q['peak'] / p['peak']:.2f}x"])
        print(f"  done B={b}", flush=True)
    common.print_table(["B pairs", "chunks", "packed temp", "packed peak", "x smallest", "padded peak",
                        "padded / packed"], rows,
                       title="Compiled train-step memory per device, MiB (peak = args + out - alias + temp)")
    worst = max(float(r[4][:-1]) for r in rows)
    print(f"packed peak at the largest B = {worst:.2f}x the smallest ({'flat' if worst <= 1.2 else 'NOT flat'}: "
          "target within 1.2x)")


if __name__ == "__main__":
    main()
