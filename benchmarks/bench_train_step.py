"""Train-step throughput: the JAX step (`make_train_step`) vs the equivalent PyTorch step, same run.

Both sides take one optimiser step on the same batch of (query, positive) pairs from the same weights:
encode queries and positives with the BERT encoder (dropout on, as in training, unless `--dropout 0`),
mean-pool over non-padding tokens, L2-normalise, in-batch softmax loss with the same temperature
(cross-entropy of q @ p.T / tau against the diagonal), clip the global gradient norm to 1.0, AdamW
(lr 2e-5, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on matrices only: no decay on biases and
LayerNorm). JAX: `piccolo_jax.training.step.make_train_step` on a one-device mesh (strategy "dp"), which
also carries its non-finite guard. PyTorch: `transformers.BertModel` (default SDPA attention),
`torch.optim.AdamW` with its default implementation, `clip_grad_norm_`.

Reported: examples/s (one example = one pair = two sequences), the JAX/PyTorch ratio (> 1: JAX is
faster), and the achieved matmul GFLOP/s against a 4096^3 float32 matmul timed in the same run with
`jnp.dot` and `torch.mm`. On a GPU (jax.default_backend() == "gpu") the JAX step runs the configured
pretrain workload in bfloat16 — 2,048 pairs x 128 tokens per step through 8 gradient-caching chunks,
remat "full" — and the table gives its MFU against the device's dense bf16 peak (piccolo_jax.training.flops);
PyTorch, when it sees CUDA, runs its plain step at one chunk's size (256 pairs: it has no gradient caching),
compared per pair. JAX does not preallocate GPU memory here (XLA_PYTHON_CLIENT_PREALLOCATE=false), so that
PyTorch can share the device.

    python benchmarks/bench_train_step.py           # small shape and BERT-base, T = 64, 16 pairs
    python benchmarks/bench_train_step.py --quick   # small shape only, fewer rounds
    python benchmarks/bench_train_step.py --pairs 64 --chunks 4 --remat full --shapes small   # the GPU path's shape on CPU
"""

from __future__ import annotations

import argparse
import os
import sys

if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Before JAX starts: share the GPU with PyTorch instead of taking 75 % of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

SHAPES = {
    # piccolo-base-zh: 768 / 12 layers / 12 heads / FFN 3072, vocab 21128 (~102 M parameters)
    "bert-base": dict(vocab_size=21128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072),
    # a small encoder of the same vocabulary: 256 / 4 layers / 4 heads / FFN 1024 (~8 M parameters)
    "small": dict(vocab_size=21128, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=1024),
}
TEMPERATURE = 0.05
LR, WEIGHT_DECAY, CLIP = 2e-5, 0.01, 1.0


def make_pairs(vocab: int, pairs: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids; each row has a random length in [T/2, T] (padding id 0)."""
    rng = np.random.default_rng(seed)
    out = {}
    for side in ("query", "passage"):
        lengths = rng.integers(length // 2, length + 1, size=pairs)
        lengths[0] = length
        mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
        out[f"{side}_input_ids"] = np.where(mask == 1, rng.integers(1000, vocab, (pairs, length)), 0).astype(np.int32)
        out[f"{side}_attention_mask"] = mask
    return out


def train_step_flops(shape: dict, length: int, pairs: int) -> float:
    """Forward + backward matmul FLOPs of one step: 3 x forward (backward = activation + weight
    gradients, each as costly as the forward), forward over 2 * pairs sequences of `length` tokens:
    3 * 2 * (2 pairs) T L (4 D^2 + 2 D F + 2 T D). The B x B loss matmul is negligible and not counted."""
    fwd = common.encoder_matmul_flops(shape["hidden_size"], shape["num_hidden_layers"],
                                      shape["intermediate_size"], length, 2 * pairs)
    return 3.0 * fwd


# ------------------------------------------------------------------------------------------------- JAX
def jax_setup(cfg, params_np, batch_np, gpu: bool, num_chunks: int = 1):
    import jax

    from piccolo_jax.parallel.sharding import (
        MeshConfig,
        host_local_to_global,
        make_mesh,
    )
    from piccolo_jax.training.optim import OptimConfig, make_optimizer
    from piccolo_jax.training.state import create_train_state
    from piccolo_jax.training.step import LossConfig, make_train_step

    mesh = make_mesh(MeshConfig(data=1, strategy="dp"), devices=jax.devices()[:1])
    optimizer = make_optimizer(OptimConfig(lr=LR, warmup_steps=0, schedule="constant", weight_decay=WEIGHT_DECAY,
                                           clip_norm=CLIP), total_steps=1_000)
    loss_cfg = LossConfig(kind="in_batch", temperature=TEMPERATURE, num_chunks=num_chunks)
    state = create_train_state(cfg, optimizer, mesh, "dp", jax.random.key(0), params=params_np)
    step = make_train_step(cfg, loss_cfg, optimizer, mesh, "dp")
    batch = host_local_to_global(batch_np, mesh)
    base_key = jax.random.key(1)
    holder = {"state": state, "i": 0}

    def run():
        holder["i"] += 1
        holder["state"], metrics = step(holder["state"], batch, jax.random.fold_in(base_key, holder["i"]))
        return jax.block_until_ready((holder["state"], metrics))[1]
    return run


# --------------------------------------------------------------------------------------------- PyTorch
def torch_setup(hf_model, batch_np, dropout: float, device: str, bf16: bool):
    import torch

    model = hf_model.to(device).train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.999), eps=1e-8)
    t = {k: torch.from_numpy(v.astype(np.int64)).to(device) for k, v in batch_np.items()}
    labels = torch.arange(t["query_input_ids"].shape[0], device=device)

    def embed(ids, mask):
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask[..., None].to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(e.float(), dim=-1)

    def run():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            q = embed(t["query_input_ids"], t["query_attention_mask"])
            p = embed(t["passage_input_ids"], t["passage_attention_mask"])
        loss = torch.nn.functional.cross_entropy(q @ p.T / TEMPERATURE, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return {"loss": loss.detach()}
    return run


def bench_shape(name, length, pairs, dropout, reps, gpu, torch_device, num_chunks=1, remat="none"):
    import jax

    from piccolo_jax.config.model import ModelConfig

    shape = SHAPES[name]
    hf_model = None
    try:
        import torch
        import transformers

        from piccolo_jax.hf import hf_to_params

        torch.manual_seed(0)
        hf_cfg = transformers.BertConfig(**shape, hidden_act="gelu", hidden_dropout_prob=dropout,
                                         attention_probs_dropout_prob=dropout)
        hf_model = transformers.BertModel(hf_cfg)
        cfg = ModelConfig.from_hf_dict(hf_cfg.to_dict(), compute_dtype="bfloat16" if gpu else "float32",
                                       remat=remat)
        params, _ = hf_to_params({k: v.detach().numpy() for k, v in hf_model.state_dict().items()}, cfg)
    except ImportError:  # JAX only (e.g. a GPU machine without PyTorch): random weights
        from piccolo_jax.model.bert import init_params

        cfg = ModelConfig(**shape, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                          compute_dtype="bfloat16" if gpu else "float32", remat=remat)
        params = jax.device_get(init_params(cfg, jax.random.key(0)))
        torch_device = None
    batch = make_pairs(cfg.vocab_size, pairs, length)

    fns = {"jax": jax_setup(cfg, params, batch, gpu, num_chunks)}
    torch_pairs = pairs // num_chunks  # PyTorch has no gradient caching: its step is one chunk's pairs
    if torch_device:
        fns["torch"] = torch_setup(hf_model, {k: v[:torch_pairs] for k, v in batch.items()}, dropout, torch_device,
                                   bf16=gpu)
    first = {k: float(fn()["loss"]) for k, fn in fns.items()}  # compile / warm up; same loss without dropout
    if "torch" in first and dropout == 0 and not gpu and num_chunks == 1 and abs(first["jax"] - first["torch"]) > 1e-3 * max(
            1.0, abs(first["torch"])):
        raise AssertionError(f"{name}: first-step losses differ: {first}")
    times = common.interleaved({k: (lambda f=fn: common.timeit(f)) for k, fn in fns.items()}, reps=reps, warmup=1)
    flops = train_step_flops(shape, length, pairs)
    tj = common.median(times["jax"])
    n_params = sum(x.size for x in jax.tree.leaves(params))
    row = {"name": name, "params": n_params, "T": length, "pairs": pairs,
           "jax_ex_s": pairs / tj, "jax_gf": flops / tj / 1e9, "loss": first, "spread_j": common.spread(times["jax"])}
    if num_chunks > 1:  # gradient caching runs the forward of every chunk twice: 4 forwards, not 3
        row["jax_gf"] *= 4 / 3
    if "torch" in times:
        tt = common.median(times["torch"]) * pairs / torch_pairs  # per pair, at one chunk's batch
        row.update(torch_ex_s=pairs / tt, torch_gf=flops / tt / 1e9, ratio=tt / tj,
                   best=min(times["torch"]) * pairs / torch_pairs / min(times["jax"]),
                   paired=common.paired_ratio(times["jax"], [t * pairs / torch_pairs for t in times["torch"]]),
                   spread_t=common.spread(times["torch"]))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shape only, 3 rounds")
    ap.add_argument("--shapes", default=None, help="comma list of: small, bert-base (default both)")
    ap.add_argument("--pairs", type=int, default=None, help="pairs per step (default 16 on CPU, 2048 on GPU)")
    ap.add_argument("--length", dest="length", type=int, default=None, help="tokens per text (64 CPU, 128 GPU)")
    ap.add_argument("--chunks", type=int, default=None, help="gradient-caching chunks (default 1 CPU, 8 GPU)")
    ap.add_argument("--remat", default=None, help='remat policy (default "none" on CPU, "full" on GPU)')
    ap.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout (0.1 as BERT)")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 5; quick 3)")
    ap.add_argument("--no-torch", action="store_true", help="JAX only")
    args = ap.parse_args(argv)

    import jax

    try:
        import torch
    except ImportError:
        torch = None
    gpu = jax.default_backend() == "gpu"
    pairs = args.pairs or (2048 if gpu else 16)
    args.length = args.length or (128 if gpu else 64)
    chunks = args.chunks or (8 if gpu else 1)
    remat = args.remat or ("full" if gpu else "none")
    reps = args.reps or (3 if args.quick else 5)
    shapes = (args.shapes or ("small" if args.quick else "small,bert-base")).split(",")
    torch_device = None
    if not args.no_torch and torch is not None:
        torch_device = "cuda" if gpu and torch.cuda.is_available() else (None if gpu else "cpu")

    print(common.environment_line())
    print(f"T={args.length}, {pairs} pairs ({2 * pairs} sequences) per step in {chunks} chunk(s), remat {remat}, "
          f"dropout {args.dropout}, {'bfloat16' if gpu else 'float32'} compute, {reps} interleaved rounds (medians)")
    if common.load_warning():
        print(common.load_warning())
    rows = []
    for name in shapes:
        rows.append(bench_shape(name, args.length, pairs, args.dropout, reps, gpu, torch_device, chunks, remat))
        print(f"  done {name}: first-step loss {rows[-1]['loss']}", flush=True)

    if gpu:
        kind = jax.devices()[0].device_kind
        peak = common.peak_tflops(kind, "bfloat16")
        table = [[r["name"], r["params"], r["T"], r["pairs"], r["jax_ex_s"], r["jax_gf"] / 1e3,
                  f"{100 * r['jax_gf'] / 1e3 / peak:.1f}%" if peak else "?", r.get("torch_ex_s", "-"),
                  r.get("ratio", "-")] for r in rows]
        common.print_table(["shape", "params", "T", "pairs", "jax ex/s", "jax TF/s", "MFU", "torch ex/s",
                            "jax/torch"], table, title=f"Train step on {kind} (peak bf16 {peak} TF/s dense)")
        return

    peak = common.matmul_peak_gflops(4096, reps=3)
    table = [[r["name"], r["params"], r["T"], r["pairs"], r["jax_ex_s"], r.get("torch_ex_s", "-"),
              r.get("ratio", "-"), r.get("paired", "-"), r.get("best", "-"), r["jax_gf"], r.get("torch_gf", "-"),
              f"{100 * r['jax_gf'] / peak['jax']:.0f}%",
              f"{100 * r['torch_gf'] / peak['torch']:.0f}%" if "torch_gf" in r and "torch" in peak else "-",
              f"{r['spread_j']}/{r.get('spread_t', '-')}"]
             for r in rows]
    common.print_table(["shape", "params", "T", "pairs", "jax ex/s", "torch ex/s", "jax/torch", "paired", "best",
                        "jax GF/s", "torch GF/s", "jax/mm", "torch/mm", "spread j/t"], table,
                       title="Train step, CPU: jax/torch = median torch time / median jax time (> 1: JAX faster); "
                             "paired = median of per-round ratios; best = ratio of the fastest rounds")
    print(f"4096^3 float32 matmul in the same run: jnp.dot {peak['jax']:.0f} GF/s, "
          f"torch.mm {peak.get('torch', float('nan')):.0f} GF/s")
    print("GF/s counts matmul FLOPs: 3 x 2 (2 pairs) T L (4 D^2 + 2 D F + 2 T D) per step; jax/mm and torch/mm "
          "divide by each side's own 4096^3 matmul rate.")
    if common.load_warning():
        print(common.load_warning())
    if any("ratio" in r for r in rows):
        print(f"lowest JAX/PyTorch ratio: {min(r['ratio'] for r in rows if 'ratio' in r):.2f} (target >= 1.1)")


if __name__ == "__main__":
    main()
