"""Collectives in the compiled train step on 8 simulated CPU devices, next to what each strategy needs.

For each strategy (dp, zero1, fsdp) and num_chunks (1: plain step; 4: gradient caching) the train step is
compiled for an 8-device mesh (nothing runs) and the optimised HLO (`compiled.as_text()`) is parsed for
all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute. Each collective is counted as
often as it executes: an op inside a `while` body (lax.scan / lax.map over chunks or loss blocks) counts
trip-count times. Bytes are logical (unsharded) sizes: an all-reduce moves its result, an all-gather its
gathered result, a reduce-scatter its input (= result x group size). Per-device traffic of a ring
implementation is about (N - 1) / N of that (2 (N - 1) / N for an all-reduce).

Minimum per step, P = parameters, B = pairs, D = width, K = hard negatives (0 here), C = chunks, 4 bytes:
    dp     all-reduce of the gradients 4 P (once, not once per chunk)
    zero1  reduce-scatter of the gradients 4 P + all-gather of the updated parameters 4 P
    fsdp   all-gather of the parameters for every use: C (pass one, C > 1) + C (forward) [+ C backward if
           not kept], reduce-scatter of the gradients 4 P per chunk
    all    loss: the candidates' embeddings are all-gathered, B D (1 + 1 + K) floats, and their
           gradients reduced back (the same again)

    python benchmarks/bench_collectives.py              # all strategies, num_chunks 1 and 4
    python benchmarks/bench_collectives.py --quick      # dp and fsdp, num_chunks 4 only
    python benchmarks/bench_collectives.py --verbose    # also list every collective with its op_name

There is no PyTorch column: the PyTorch original's collectives are DeepSpeed's (ZeRO-1: reduce-scatter of
gradient buckets + all-gather of parameters), i.e. the zero1 minimum above.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import math  # noqa: E402

from benchmarks import common  # noqa: E402
from piccolo_jax.parallel.collectives import KINDS, parse_collectives  # noqa: E402


def minimum_bytes(strategy: str, num_chunks: int, n_params: int, pairs: int, dim: int, k: int = 0) -> dict:
    p4, emb = 4 * n_params, 4 * pairs * dim * (2 + k)
    if strategy == "dp":
        return {"all-reduce": p4 + emb, "all-gather": emb}
    if strategy == "zero1":
        return {"reduce-scatter": p4, "all-gather": p4 + emb, "all-reduce": emb}
    gathers = (2 * num_chunks if num_chunks > 1 else 1) * p4
    return {"all-gather": gathers + emb, "reduce-scatter": num_chunks * p4, "all-reduce": emb}


def compile_step(cfg, strategy: str, num_chunks: int, pairs: int, length: int):
    import jax
    import jax.numpy as jnp

    from piccolo_jax.parallel.sharding import MeshConfig, batch_sharding, make_mesh
    from piccolo_jax.training.optim import OptimConfig, make_optimizer
    from piccolo_jax.training.state import create_train_state, state_shardings
    from piccolo_jax.training.step import LossConfig, make_train_step

    mesh_cfg = MeshConfig(data=1, fsdp=8, strategy=strategy) if strategy == "fsdp" else \
        MeshConfig(data=8, strategy=strategy)
    mesh = make_mesh(mesh_cfg)
    optimizer = make_optimizer(OptimConfig(), total_steps=1_000)
    shardings = state_shardings(cfg, optimizer, mesh, strategy)
    state = jax.eval_shape(lambda: create_train_state(cfg, optimizer, mesh, strategy, jax.random.key(0)))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    bs = batch_sharding(mesh)
    batch = {f"{side}_{kind}": jax.ShapeDtypeStruct((pairs, length), jnp.int32, sharding=bs)
             for side in ("query", "passage") for kind in ("input_ids", "attention_mask")}
    step = make_train_step(cfg, LossConfig(kind="in_batch", num_chunks=num_chunks), optimizer, mesh, strategy)
    return step.lower(state, batch, jax.random.key(0)).compile()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="dp and fsdp with num_chunks 4 only")
    ap.add_argument("--strategies", default=None, help="comma list of dp, zero1, fsdp")
    ap.add_argument("--chunks", default=None, help="comma list of num_chunks (default 1,4)")
    ap.add_argument("--pairs", type=int, default=64, help="global batch in pairs")
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--verbose", action="store_true", help="list every collective")
    ap.add_argument("--dump", default=None, help="directory to write each compiled HLO text to")
    args = ap.parse_args(argv)

    import jax

    from piccolo_jax.config.model import ModelConfig
    from piccolo_jax.model.bert import abstract_model

    if jax.device_count() != 8:
        raise SystemExit(f"expected 8 simulated devices, got {jax.device_count()} (was jax imported earlier?)")
    cfg = ModelConfig(vocab_size=21128, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=512, max_position_embeddings=64)
    n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract_model(cfg)[1]))
    strategies = (args.strategies or ("dp,fsdp" if args.quick else "dp,zero1,fsdp")).split(",")
    chunks = [int(c) for c in (args.chunks or ("4" if args.quick else "1,4")).split(",")]
    print(common.environment_line())
    print(f"model: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}: "
          f"P = {n_params:,} parameters (4P = {common.human_bytes(4 * n_params)}); B = {args.pairs} pairs, "
          f"T = {args.length}; 8 devices; emb = B D (1 + 1 + K) floats = "
          f"{common.human_bytes(4 * args.pairs * cfg.hidden_size * 2)}")
    mib = 1024.0 ** 2
    rows, minima = [], []
    for strategy in strategies:
        for c in chunks:
            compiled = compile_step(cfg, strategy, c, args.pairs, args.length)
            hlo = compiled.as_text()
            if args.dump:
                os.makedirs(args.dump, exist_ok=True)
                with open(os.path.join(args.dump, f"step_{strategy}_c{c}.hlo.txt"), "w") as f:
                    f.write(hlo)
            ops = parse_collectives(hlo, 8)
            need = minimum_bytes(strategy, c, n_params, args.pairs, cfg.hidden_size)
            row = [strategy, c]
            for kind in KINDS:
                mine = [o for o in ops if o["kind"] == kind]
                total = sum(o["count"] * o["bytes"] for o in mine)
                row.append(f"{total / mib:.2f} ({sum(o['count'] for o in mine):g})" if mine else "-")
            total = sum(o["count"] * o["bytes"] for o in ops)
            small = sum(o["count"] for o in ops if o["bytes"] < 4096)
            row += [total / mib, sum(need.values()) / mib, total / sum(need.values()), f"{small:g}"]
            rows.append(row)
            minima.append([strategy, c] + [f"{need[k] / mib:.2f}" if k in need else "-" for k in KINDS[:3]])
            if args.verbose:
                print(f"\n{strategy}, num_chunks={c}:")
                for o in sorted(ops, key=lambda o: -o["count"] * o["bytes"]):
                    if o["bytes"] >= 4096:
                        print(f"  {o['kind']:<18} x{o['count']:<4g} {common.human_bytes(o['bytes']):>10}  "
                              f"group {o['group']}  {o['shape'][:60]}  {o['op_name'][-90:]}")
            print(f"  done {strategy} num_chunks={c}", flush=True)
    common.print_table(["strategy", "chunks"] + [f"{k} MiB (n)" for k in KINDS] +
                       ["total MiB", "min MiB", "x min", "ops < 4 KiB"], rows,
                       title="Collectives per train step: logical MiB (executions per step), vs the minimum")
    common.print_table(["strategy", "chunks"] + [f"min {k}" for k in KINDS[:3]], minima,
                       title="Minimum per kind, MiB (see the module docstring for the formulas)")
    print(NOTES)


NOTES = """
Notes (what the HLO shows; run with --verbose to see each op and its op_name):
 1. Without gradient caching the gradient is reduced once per encoder *call*: the query and passage
    towers are two calls, so every parameter's gradient appears twice in the all-reduce tuple (2 x 4P
    for dp). With gradient caching and replicated parameters (dp / zero1, no tensor axis), pass two runs
    under jax.shard_map on each shard's own rows and psums the accumulated gradient once per step
    (1 x 4P); with fsdp the reduction still sits inside the chunk loop (2 C x 4P).
 2. No reduce-scatter on CPU: XLA's CPU pipeline keeps the partitioner's all-reduce + dynamic-slice
    (the GPU/TPU pipelines rewrite it as a reduce-scatter), so zero1 and fsdp show their gradient
    reduce-scatter as all-reduce bytes. For zero1 the word embedding's gradient is never reduced: the
    partitioner all-gathers the per-token cotangents [B, T, D] instead (cheaper than 4 x 21128 x D) and
    each device scatter-adds into its own shard.
 3. fsdp gathers on use: the train step constrains the parameters to the replicated-over-fsdp layout
    inside the encode function, so each weight is all-gathered once per encoder call (1 x 4P per call,
    no activation collectives); without that constraint the partitioner contracted over the sharded
    "embed" dimension and all-reduced activations of the whole global batch instead. The gradient is
    still all-reduced (note 2) rather than reduce-scattered on CPU.
 4. The loss moves only embeddings: all-gathers of [B, D] candidates (forward and rematerialised
    backward) and one all-reduce of their [B, D] cotangent, 32 KiB each here, as expected.
 5. The many collectives under 4 KiB are dropout-key bookkeeping (u32[16] row keys) and scalar metrics;
    they cost latency (one launch each), not bandwidth.
"""


if __name__ == "__main__":
    main()
