"""One prepared accelerator check (benchmarks/device_check.sh runs it): parity, fused attention, throughput.

    python benchmarks/device_check.py              # on one GPU (H100 / H200: under 8 minutes)
    python benchmarks/device_check.py --dry-run    # the same sections at toy sizes, on any backend (CPU)

Sections, each printing one block:
  1. bf16 vs float32: BERT-base (piccolo-base-zh shape, random init) embeddings of 256 texts in bfloat16
     compute against float32 at matmul precision "highest": min cosine, max |difference|.
  2. fused vs XLA attention, padded and packed: the encoder with model.attention "auto" (cuDNN flash
     attention on an NVIDIA GPU: padding as sequence lengths, packed texts as a segment mask) against
     "explicit" (XLA), bfloat16, embeddings and gradients.
  3. train step, BERT-base at length 128, bfloat16, remat "full", a 4,096-pair global batch through 4
     gradient-caching chunks, in-batch loss, dropout 0.1: packed (data.packing) and padded (every row 128
     tokens, the pretrain recipe) batches of the skewed-length Chinese corpus (benchmarks/skewed_corpus.py,
     bundled bert-base-chinese tokenizer): pairs/s, computed and useful (real-token) TFLOP/s and MFU.
  4. encode: Encoder.encode of 20,000 corpus passages (BERT-base, bfloat16), packed and padded: texts/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import common, skewed_corpus  # noqa: E402

BASE = dict(vocab_size=21128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
TOY = dict(vocab_size=21128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def tokenizer():
    from piccolo_jax.io.resources import bundled_tokenizer
    from piccolo_jax.text.tokenizer import Tokenizer

    return Tokenizer.from_dir(bundled_tokenizer())


def padded_arrays(tok, texts, length):
    batch = tok.encode(texts, length, pad_to=length)
    return batch["input_ids"], batch["attention_mask"]


def packed_arrays(tok, texts, length, blocks):
    from piccolo_jax.data import packing

    ids = tok.token_ids(texts, length)
    m = len(ids) // blocks
    used, rows, offsets = packing.first_fit(np.array([len(t) for t in ids]).reshape(blocks, m), length)
    r = int(used.max())
    parts = [packing.pack_side(ids[j * m:(j + 1) * m], rows[j], offsets[j], r, length, tok.pad_id)[0]
             for j in range(blocks)]
    return tuple(np.stack([p[f] for p in parts]) for f in ("input_ids", "positions", "segments")), m


def parity(args, tok, texts) -> None:
    import jax

    from piccolo_jax.config.model import ModelConfig
    from piccolo_jax.inference.encoder import embed
    from piccolo_jax.model.bert import init_params

    section("1. bfloat16 vs float32 embeddings")
    cfg = ModelConfig(**args.shape)
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
    ids, mask = padded_arrays(tok, texts, 128)
    with jax.default_matmul_precision("highest"):
        e32 = np.asarray(jax.jit(lambda p, i, m: embed(cfg, p, i, m))(params, ids, mask))
    cfg16 = cfg.replace(compute_dtype="bfloat16")
    e16 = np.asarray(jax.jit(lambda p, i, m: embed(cfg16, p, i, m))(params, ids, mask))
    cos = np.sum(e32 * e16, axis=1)
    print(f"{len(texts)} texts x 128 tokens: min cosine {cos.min():.5f}, "
          f"max |bf16 - f32| {np.abs(e16 - e32).max():.2e}")


def fused_attention(args, tok, texts) -> None:
    import jax
    import jax.numpy as jnp

    from piccolo_jax.config.model import ModelConfig
    from piccolo_jax.model import attention
    from piccolo_jax.model.bert import encode, encode_packed, init_params

    section("2. fused vs XLA attention (bfloat16), padded and packed")
    cfg = ModelConfig(**args.shape, compute_dtype="bfloat16", attention_probs_dropout_prob=0.0)
    fused, xla = cfg.replace(attention="auto"), cfg.replace(attention="explicit")
    print(attention.describe_attention(fused, training=True), "|",
          attention.describe_attention(fused, training=True, packed=True))
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(1))
    ids, mask = padded_arrays(tok, texts[:64], 128)
    (p_ids, p_pos, p_seg), m = packed_arrays(tok, texts[:64], 128, 4)
    key = jax.random.key(2)

    def padded(c):
        def loss(p):
            e = encode(c, p, ids, mask, dropout_key=key)["embeddings"]
            return jnp.sum(e[:, :16] ** 2), e
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    def packed(c):
        keys = jax.random.split(key, p_ids.size).reshape(p_ids.shape)
        def loss(p):
            e = encode_packed(c, p, p_ids, p_pos, p_seg, m, keys)
            return jnp.sum(e[..., :16] ** 2), e
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    for name, run in (("padded", padded), ("packed", packed)):
        (_, e_f), g_f = run(fused)
        (_, e_x), g_x = run(xla)
        g_err = max(float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-6))
                    for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_x)))
        print(f"{name}: path {attention.attention_path(fused, True, name == 'packed', 128)}; max |embedding "
              f"difference| {float(jnp.abs(e_f - e_x).max()):.2e}; max gradient difference / max gradient {g_err:.2e}")


def train_step(args, tok, tmp: Path) -> None:
    import jax

    from piccolo_jax.config import DataConfig
    from piccolo_jax.config.model import ModelConfig
    from piccolo_jax.data import packing
    from piccolo_jax.data.loader import make_loader
    from piccolo_jax.parallel.sharding import (
        MeshConfig,
        host_local_to_global,
        make_mesh,
    )
    from piccolo_jax.training.flops import step_flops
    from piccolo_jax.training.optim import OptimConfig, make_optimizer
    from piccolo_jax.training.state import create_train_state
    from piccolo_jax.training.step import LossConfig, make_train_step

    b, chunks = args.pairs, args.chunks
    section(f"3. train step: {b} pairs x 128 tokens, {chunks} gradient-caching chunks, bfloat16, remat full")
    rows = skewed_corpus.records(tok, b * (args.steps + 1) * 2, seed=0)
    path = skewed_corpus.write_jsonl(rows, tmp / "pairs.jsonl")
    cfg = ModelConfig(**args.shape, max_position_embeddings=512, compute_dtype="bfloat16", remat="full")
    mesh = make_mesh(MeshConfig(data=-1, strategy="zero1"))
    optimizer = make_optimizer(OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant"), total_steps=1_000)
    step = make_train_step(cfg, LossConfig(kind="in_batch", temperature=0.01, num_chunks=chunks, block_size=1024),
                           optimizer, mesh, "zero1")
    shards = mesh.devices.size
    peak = common.peak_tflops(jax.devices()[0].device_kind, "bfloat16")
    for packed in (True, False):
        data = DataConfig(paths=(str(path),), global_batch_size=b, query_max_length=128, passage_max_length=128,
                          pad_multiple=128, packing=packed, num_workers=2)
        loader = make_loader(data, tok)
        line = loader.enable_packing(shards, chunks) if packed else "padded to 128"
        batches = [next(loader) for _ in range(args.steps + 1)]
        loader.close()
        state = create_train_state(cfg, optimizer, mesh, "zero1", jax.random.key(0))
        times, flops, useful = [], [], []
        for i, host in enumerate(batches):
            arrays = host_local_to_global(packing.step_arrays(host), mesh)
            t0 = time.perf_counter()
            state, metrics = step(state, arrays, jax.random.key(i))
            jax.block_until_ready(metrics)
            if i:  # the first step compiles
                times.append(time.perf_counter() - t0)
            real, computed = packing.token_counts(host)
            f = step_flops(cfg, host, 1, chunks)
            flops.append(f)
            useful.append(f * real / computed)  # ~ the FLOPs of real tokens only (attention aside)
        t = float(np.median(times))
        tf, uf = np.mean(flops[1:]) / t / 1e12, np.mean(useful[1:]) / t / 1e12
        mfu = (f", MFU {100 * tf / (peak * shards):.1f}% computed / {100 * uf / (peak * shards):.1f}% useful"
               if peak else "")
        print(f"{'packed' if packed else 'padded'}: {line}")
        print(f"  {b / t:,.0f} pairs/s ({t:.2f} s/step, median of {len(times)}); {tf:.3g} TFLOP/s computed, "
              f"{uf:.3g} useful{mfu}; loss {float(metrics['loss']):.3f}")


def encode_throughput(args, tok, texts) -> None:
    import jax

    from piccolo_jax.config.model import ModelConfig
    from piccolo_jax.inference.encoder import Encoder
    from piccolo_jax.model.bert import init_params

    section(f"4. encode: {len(texts)} passages, bfloat16")
    cfg = ModelConfig(**args.shape, compute_dtype="bfloat16")
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
    for packed in (True, False):
        enc = Encoder(cfg, params, tok, max_length=512, packing=packed)
        enc.encode(texts)  # compiles every shape
        t0 = time.perf_counter()
        enc.encode(texts)
        t = time.perf_counter() - t0
        print(f"{'packed' if packed else 'padded'}: {len(texts) / t:,.0f} texts/s ({t:.2f} s)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on any backend (checks the script runs)")
    ap.add_argument("--sections", default="1,2,3,4")
    args = ap.parse_args(argv)
    args.shape = TOY if args.dry_run else BASE
    args.pairs, args.chunks, args.steps = (64, 2, 2) if args.dry_run else (4096, 4, 4)
    n_encode = 500 if args.dry_run else 20_000
    print(common.environment_line())
    tok = tokenizer()
    corpus = skewed_corpus.records(tok, max(n_encode, 256), seed=3)
    texts = [r["text_pos"] for r in corpus]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.sections.split(","):
            {"1": lambda: parity(args, tok, texts[:256]), "2": lambda: fused_attention(args, tok, texts),
             "3": lambda: train_step(args, tok, Path(tmp)), "4": lambda: encode_throughput(args, tok, texts[:n_encode])
             }[s.strip()]()
    print(f"\ndevice check done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
