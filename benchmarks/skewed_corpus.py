"""A generated Chinese pair corpus with piccolo-like skewed lengths, for the packing benchmarks.

Lengths in characters are log-normal (a long right tail, as real queries and passages have): queries
median 12 (sigma 0.5: most 5-30), passages median 60 (sigma 0.7: most 15-250), hard negatives drawn like
passages; each text is random Chinese characters of the tokenizer's vocabulary (one WordPiece token each)
with a full-width comma or stop every 6-16 characters. Seeded: the same corpus on every run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def hanzi(tokenizer) -> list[str]:
    """Single-character CJK tokens of the tokenizer's vocabulary."""
    vocab = tokenizer.backend.get_vocab()
    return sorted(w for w in vocab if len(w) == 1 and "\u4e00" <= w <= "\u9fff")


def lognormal_lengths(rng, n: int, median: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(int)


def text(rng, chars: list[str], n: int) -> str:
    out, i = [], 0
    while i < n:
        run = int(rng.integers(6, 17))
        out.append("".join(rng.choice(chars, size=min(run, n - i))))
        i += run
        if i < n:
            out.append("，" if rng.random() < 0.7 else "。")
            i += 1
    return "".join(out)


def records(tokenizer, n: int, seed: int = 0, query_median: float = 12, passage_median: float = 60,
            negatives: int = 0, max_chars: int = 600) -> list[dict]:
    """n records {"text", "text_pos"[, "text_neg": [K]]} (the uniem / piccolo format)."""
    rng = np.random.default_rng(seed)
    chars = hanzi(tokenizer)
    q = lognormal_lengths(rng, n, query_median, 0.5, 2, max_chars)
    p = lognormal_lengths(rng, n * (1 + negatives), passage_median, 0.7, 4, max_chars).reshape(n, 1 + negatives)
    out = []
    for i in range(n):
        row = {"text": text(rng, chars, q[i]), "text_pos": text(rng, chars, p[i, 0])}
        if negatives:
            row["text_neg"] = [text(rng, chars, x) for x in p[i, 1:]]
        out.append(row)
    return out


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path
