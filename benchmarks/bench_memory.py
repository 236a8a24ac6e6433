"""Peak memory of the compiled train step vs the global batch, with and without gradient caching.

For each global batch B (pairs) the train step is compiled (not run) on one device and XLA's
`memory_analysis()` is read: arguments (train state + batch), outputs (new state + metrics), the bytes
aliased between them by donation, and temporaries. Peak = arguments + outputs - aliased + temporaries.

Without caching (num_chunks = 1) the activations of all 2B sequences are alive at once, so the peak grows
linearly in B. With gradient caching at a fixed chunk of `--chunk` pairs (num_chunks = B / chunk), only
one chunk's activations live at a time; what still grows with B is, by construction,
  * the batch itself (4 int32 arrays [B, T]) and the embeddings q, p [B, D] with their cached
    gradients (4 B D float32), and
  * the loss's working set: blocks of `block_size` queries against all B candidates, so
    O(min(block_size, B) x B) float32 logits. It is not live at the same time as a chunk's activations
    (the loss runs between the two passes), so XLA reuses their buffers; it shows in the peak only once
    it outgrows them (at piccolo's B = 32,768 with block 512: 64 MiB per logits array), and
    `--block-sizes` shows how to bound it.
The table prints those terms next to the peaks.

    python benchmarks/bench_memory.py            # B = 64 ... 4096, block_size 512 and 64
    python benchmarks/bench_memory.py --quick    # B = 64 ... 1024

There is no PyTorch column: the PyTorch original has no gradient caching (its batch is bounded by
activation memory, which is the num_chunks = 1 column).
"""

from __future__ import annotations

import argparse
import os
import sys

if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def compiled_memory(model_cfg, pairs: int, length: int, num_chunks: int, block_size: int) -> dict[str, int]:
    import jax
    import jax.numpy as jnp

    from piccolo_jax.optim import OptimConfig, make_optimizer
    from piccolo_jax.sharding import MeshConfig, batch_sharding, make_mesh
    from piccolo_jax.train_step import LossConfig, create_train_state, make_train_step

    mesh = make_mesh(MeshConfig(data=1, strategy="dp"), devices=jax.devices()[:1])
    optimizer = make_optimizer(OptimConfig(), total_steps=1_000)
    state = jax.eval_shape(lambda: create_train_state(model_cfg, optimizer, mesh, "dp", jax.random.key(0)))
    sharding = batch_sharding(mesh)
    batch = {f"{side}_{kind}": jax.ShapeDtypeStruct((pairs, length), jnp.int32, sharding=sharding)
             for side in ("query", "passage") for kind in ("input_ids", "attention_mask")}
    loss_cfg = LossConfig(kind="in_batch", num_chunks=num_chunks, block_size=block_size)
    step = make_train_step(model_cfg, loss_cfg, optimizer, mesh, "dp")
    m = step.lower(state, batch, jax.random.key(0)).compile().memory_analysis()
    out = {"arg": m.argument_size_in_bytes, "out": m.output_size_in_bytes, "alias": m.alias_size_in_bytes,
           "temp": m.temp_size_in_bytes}
    out["peak"] = out["arg"] + out["out"] - out["alias"] + out["temp"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="B up to 1024, one block size")
    ap.add_argument("--batches", default=None, help="comma list of global batches in pairs (default 64..4096)")
    ap.add_argument("--chunk", type=int, default=64, help="pairs per gradient-caching chunk")
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--block-sizes", default=None, help="loss block sizes (default 512,64; quick 512)")
    ap.add_argument("--dropout", type=float, default=0.1)
    args = ap.parse_args(argv)

    import jax

    from piccolo_jax.model_config import ModelConfig

    cfg = ModelConfig(vocab_size=21128, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=512, max_position_embeddings=max(64, args.length),
                      hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout)
    batches = [int(x) for x in (args.batches or ("64,128,256,512,1024" if args.quick else
                                                 "64,128,256,512,1024,2048,4096")).split(",")]
    block_sizes = [int(x) for x in (args.block_sizes or ("512" if args.quick else "512,64")).split(",")]
    print(common.environment_line())
    print(f"model: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, FFN {cfg.intermediate_size}, "
          f"vocab {cfg.vocab_size}; T={args.length}; dropout {args.dropout}; in-batch loss; AdamW; "
          f"chunk = {args.chunk} pairs ({2 * args.chunk} sequences)")
    mib = 1024.0 ** 2
    d = cfg.hidden_size
    for bs in block_sizes:
        rows, base = [], {}
        for b in batches:
            plain = compiled_memory(cfg, b, args.length, 1, bs)
            cached = compiled_memory(cfg, b, args.length, max(1, b // args.chunk), bs)
            base.setdefault("plain", plain["peak"])
            base.setdefault("cached", cached["peak"])
            emb = 4 * b * d * 4  # q, p and their cached gradients, float32
            batch_bytes = 4 * b * args.length * 4
            logits = min(bs, b) * b * 4  # one block of loss logits
            flat_budget = 1.2 * base["cached"] + emb
            rows.append([b, max(1, b // args.chunk), plain["temp"] / mib, plain["peak"] / mib,
                         cached["temp"] / mib, cached["peak"] / mib, cached["peak"] / base["cached"],
                         batch_bytes / mib, emb / mib, logits / mib,
                         "yes" if cached["peak"] <= flat_budget else "NO"])
            print(f"  done B={b} block_size={bs}", flush=True)
        common.print_table(
            ["B pairs", "chunks", "plain temp", "plain peak", "cached temp", "cached peak", "cached x",
             "batch", "emb+grads", "logits blk", "flat?"], rows,
            title=f"Compiled train-step memory, MiB (loss block_size {bs}); peak = args + out - alias + temp")
        print("cached x = cached peak / cached peak at the smallest B; flat? = peak <= 1.2 x smallest + emb+grads")
        first = next((r for r in rows if r[1] > 1), rows[0])  # the smallest B that really uses chunks
        growth = rows[-1][5] - first[5]
        print(f"cached peak grows {growth:.1f} MiB from B={first[0]} (the first with >= 2 chunks) to "
              f"B={batches[-1]}; the embeddings and their cached gradients grow by {rows[-1][8] - first[8]:.1f} MiB "
              f"and the batch by {rows[-1][7] - first[7]:.1f} MiB. The loss block ({rows[-1][9]:.1f} MiB of logits "
              "at the largest B) is live only after pass one, so XLA places it in the chunk's activation buffers.")
    state_mib = compiled_memory(cfg, batches[0], args.length, 1, block_sizes[0])["alias"] / mib
    print(f"train state (params + AdamW moments, donated): {state_mib:.1f} MiB; "
          f"{jax.devices()[0].platform} backend")


if __name__ == "__main__":
    main()
