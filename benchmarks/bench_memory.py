"""Peak memory of the compiled train step, per device, read from XLA before anything runs.

Two modes; both compile the real step (`train_step.make_train_step`, AdamW from the config) on abstract
inputs (nothing is allocated) and read `memory_analysis()`: arguments (train state + batch), outputs
(new state + metrics), the bytes aliased between them by donation, and temporaries.
Peak = arguments + outputs - aliased + temporaries (`piccolo_jax.training.memory.compiled_peak_bytes`).

--model base: piccolo-base-zh (768 / 12 layers, vocab 21,128) at the shapes of configs/pretrain.toml
(32,768 pairs x 128 / 128 tokens) and configs/finetune.toml (1,024 queries x 64 tokens, 1 + 7 passages
x 512 tokens), on 1 and 8 devices (simulated CPU devices here), for several num_chunks; every row at its
max length (the worst case the loader can produce). It prints which device sizes each point fits and
the smallest num_chunks per device count and size.

    python benchmarks/bench_memory.py --model base                       # both recipes, 1 and 8 devices
    python benchmarks/bench_memory.py --model base --recipes finetune --devices 8 --chunks 8,16

--model small (default): a 2-layer encoder, global batch B = 64 ... 4096, with and without gradient
caching. Without caching (num_chunks = 1) the activations of all 2B sequences are alive at once, so the
peak grows linearly in B. With gradient caching at a fixed chunk of `--chunk` pairs (num_chunks = B /
chunk), only one chunk's activations live at a time; what still grows with B is, by construction,
  * the batch itself (4 int32 arrays [B, T]) and the embeddings q, p [B, D] with their cached
    gradients (4 B D float32), and
  * the loss's working set: blocks of `block_size` queries against all B candidates, so
    O(min(block_size, B) x B) float32 logits. It is not live at the same time as a chunk's activations
    (the loss runs between the two passes), so XLA reuses their buffers; it shows in the peak only once
    it outgrows them (at piccolo's B = 32,768 with block 512: 64 MiB per logits array), and
    `--block-sizes` shows how to bound it.

    python benchmarks/bench_memory.py            # B = 64 ... 4096, block_size 512 and 64
    python benchmarks/bench_memory.py --quick    # B = 64 ... 1024

The compiled figures are XLA:CPU's buffer assignment when run on a CPU; GPU and TPU compilers fuse and
schedule differently, so rerun there for their own numbers (the trainer checks the same way before its
first step). There is no PyTorch column: the PyTorch original has no gradient caching (its batch is
bounded by activation memory, which is the num_chunks = 1 column).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def compiled_memory(model_cfg, pairs: int, length: int, num_chunks: int, block_size: int) -> dict[str, int]:
    import jax

    from piccolo_jax.parallel.sharding import MeshConfig, make_mesh
    from piccolo_jax.training import memory
    from piccolo_jax.training.optim import OptimConfig, make_optimizer
    from piccolo_jax.training.step import LossConfig

    mesh = make_mesh(MeshConfig(data=1, strategy="dp"), devices=jax.devices()[:1])
    optimizer = make_optimizer(OptimConfig(), total_steps=1_000)
    batch = memory.abstract_batch(mesh, pairs, length, length)
    loss_cfg = LossConfig(kind="in_batch", num_chunks=num_chunks, block_size=block_size)
    m = memory.memory_breakdown(memory.compile_train_step(model_cfg, loss_cfg, optimizer, mesh, "dp", batch))
    return {"arg": m["arguments"], "out": m["outputs"], "alias": m["aliased"], "temp": m["temporaries"],
            "peak": m["peak"]}


def run_small(args):
    import jax

    from piccolo_jax.config.model import ModelConfig

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


# ------------------------------------------------------------------------------------- --model base
SIZES_GB = (16, 32, 40, 80, 141)  # device memory sizes (nominal; taken as GiB, as the devices report)
DEFAULT_FRACTION = 0.75  # share of device memory XLA's GPU allocator takes by default
DEFAULT_CHUNKS = {("pretrain", 1): (16, 64, 256), ("pretrain", 8): (2, 8, 32),
                  ("finetune", 1): (8, 32, 128), ("finetune", 8): (1, 4, 16)}


def recipe_point(recipe: str, devices: int, num_chunks: int, remat: str | None) -> dict:
    """Compiled peak of the piccolo-base-zh train step at a shipped config's worst-case shapes."""
    import dataclasses

    import jax

    from piccolo_jax.config import load_config
    from piccolo_jax.io.resources import find_config
    from piccolo_jax.parallel.sharding import make_mesh
    from piccolo_jax.training import memory
    from piccolo_jax.training.optim import make_optimizer

    cfg = load_config(find_config(recipe), recipe)
    model_cfg = cfg.model if remat is None else cfg.model.replace(remat=remat)
    mesh = make_mesh(dataclasses.replace(cfg.parallel, data=devices, fsdp=1, tensor=1),
                     devices=jax.devices()[:devices])
    optimizer = make_optimizer(cfg.optim, total_steps=cfg.run.steps)
    d = cfg.data
    batch = memory.abstract_batch(mesh, d.global_batch_size, d.query_max_length, d.passage_max_length,
                                  d.num_negatives)
    loss_cfg = dataclasses.replace(cfg.loss, num_chunks=num_chunks)
    m = memory.memory_breakdown(memory.compile_train_step(model_cfg, loss_cfg, optimizer, mesh,
                                                          cfg.parallel.strategy, batch))
    rows = d.global_batch_size // (devices * num_chunks)
    return dict(m, recipe=recipe, devices=devices, num_chunks=num_chunks, rows=rows,
                docs=rows * (1 + d.num_negatives), remat=model_cfg.remat, dtype=model_cfg.compute_dtype)


def fits(peak: int, size_gb: float, fraction: float) -> bool:
    from piccolo_jax.training.memory import HEADROOM, GiB

    return peak <= HEADROOM * fraction * size_gb * GiB


def run_base(args) -> None:
    import jax

    from piccolo_jax.training.memory import HEADROOM, GiB

    print(common.environment_line())
    recipes = args.recipes.split(",")
    device_counts = [int(x) for x in args.devices.split(",")]
    if max(device_counts) > jax.device_count():
        raise SystemExit(f"--devices {args.devices}: only {jax.device_count()} devices")
    points = []
    for recipe in recipes:
        for n in device_counts:
            chunks = [int(x) for x in args.chunks.split(",")] if args.chunks else DEFAULT_CHUNKS[(recipe, n)]
            for c in chunks:
                t0 = time.perf_counter()
                p = recipe_point(recipe, n, c, args.remat)
                points.append(p)
                print(f"  {recipe} devices={n} num_chunks={c}: peak {p['peak'] / GiB:.2f} GiB "
                      f"(compiled in {time.perf_counter() - t0:.0f} s)", flush=True)
    frac = args.fraction
    rows = [[p["recipe"], p["devices"], p["num_chunks"], p["rows"], p["docs"], p["arguments"] / GiB,
             p["temporaries"] / GiB, p["peak"] / GiB] + ["yes" if fits(p["peak"], s, frac) else "-" for s in SIZES_GB]
            for p in points]
    common.print_table(["recipe", "devices", "chunks", "queries/dev/chunk", "docs/dev/chunk", "args GiB",
                        "temp GiB", "peak GiB"] + [f"{s} GB" for s in SIZES_GB], rows,
                       title=f"Compiled piccolo-base-zh train step per device (remat {points[0]['remat']}, "
                             f"{points[0]['dtype']}); fits = peak <= {HEADROOM:.0%} x {frac:.0%} of the device")
    rec = []
    for recipe in recipes:
        for n in device_counts:
            mine = sorted((p for p in points if p["recipe"] == recipe and p["devices"] == n),
                          key=lambda p: p["num_chunks"])
            rec.append([recipe, n] + [next((p["num_chunks"] for p in mine if fits(p["peak"], s, frac)), "-")
                                      for s in SIZES_GB])
    common.print_table(["recipe", "devices"] + [f"{s} GB" for s in SIZES_GB], rec,
                       title="Smallest measured loss.num_chunks that fits ('-': none of those measured)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", choices=("small", "base"), default="small",
                    help="small: batch sweep of a 2-layer encoder; base: piccolo-base-zh at the shipped configs")
    ap.add_argument("--recipes", default="pretrain,finetune", help="base: comma list of bundled configs")
    ap.add_argument("--devices", default="1,8", help="base: comma list of device counts (simulated on CPU)")
    ap.add_argument("--chunks", default=None, help="base: comma list of num_chunks (default: per recipe/devices)")
    ap.add_argument("--remat", default=None, help="base: override model.remat (none | full | dots_saveable ...)")
    ap.add_argument("--fraction", type=float, default=DEFAULT_FRACTION,
                    help="base: share of device memory JAX may use (XLA_PYTHON_CLIENT_MEM_FRACTION; default .75)")
    ap.add_argument("--quick", action="store_true", help="small: B up to 1024, one block size")
    ap.add_argument("--batches", default=None, help="small: comma list of global batches in pairs (default 64..4096)")
    ap.add_argument("--chunk", type=int, default=64, help="small: pairs per gradient-caching chunk")
    ap.add_argument("--length", type=int, default=32, help="small: tokens per sequence")
    ap.add_argument("--block-sizes", default=None, help="small: loss block sizes (default 512,64; quick 512)")
    ap.add_argument("--dropout", type=float, default=0.1, help="small: dropout rates")
    args = ap.parse_args(argv)
    if args.model == "base":
        run_base(args)
    else:
        run_small(args)


if __name__ == "__main__":
    # 8 simulated devices on a CPU host (no effect on GPU / TPU backends); must precede importing jax.
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    main()
