"""BERT WordPiece over arrays of code points: the `tokenizers` ids of plain texts without per-character Python.

BERT's pipeline (BertNormalizer, BertPreTokenizer, WordPiece) is local to characters for most text: a CJK
ideograph or a punctuation mark is a word of its own (one token: its vocabulary id, or [UNK]), whitespace
separates words and yields nothing, and a run of ASCII letters and digits is one word that WordPiece
splits. So the ids of a text are the ids of its units in order:

    unit            ids
    single char c   [single_id[c]]                            (CJK ideograph, punctuation)
    space char      []                                        (separates words)
    word run w      WordPiece(lower(w)) (the model itself)    (maximal run of ASCII letters / digits)

`CharWordPiece.build(backend)` makes the per-code-point table from the backend itself: every candidate
character c is tokenised as "x" + c + "x" by the real pipeline and kept only if the ids show exactly the
behaviour above (and the normaliser leaves c alone or maps it to one space). A text with any character
outside the table (accented letters, Hangul, control characters, emoji, ...) or containing an added
token ("[SEP]", ...) goes through the backend instead, so the ids are always the backend's:
`encode` returns the ids of `[CLS] text [SEP]`, the text cut to `keep` tokens, as a `Ragged`.

Eligible backends: WordPiece model, BertPreTokenizer, BertNormalizer or no normaliser, and added tokens
matched on the raw text only (normalized false), as every BERT tokenizer in transformers' format.

Cost per batch of N texts and C characters: O(C) numpy work, plus one dictionary look-up per word run
(a cache of the model's WordPiece splits) and one backend call for the texts outside the table.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence

import numpy as np

from piccolo_jax.ragged import Ragged

_UNSAFE, _SPACE, _SINGLE, _WORD = 0, 1, 2, 3
_LIMIT = 0x10000  # candidates in the Basic Multilingual Plane; a text with any other goes to the backend
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))  # BERT's "Chinese characters"
_CACHE_LIMIT = 1 << 18  # word splits kept; the cache is emptied when it grows past this


def _candidates() -> tuple[list[int], list[int], list[int]]:
    """(single, space, word) candidate code points; `build` keeps those the backend confirms."""
    single = [cp for lo, hi in _CJK if lo < _LIMIT for cp in range(lo, hi + 1)]
    space, word = [], [cp for cp in range(0x80) if chr(cp).isalnum()]
    for cp in range(_LIMIT):
        if 0xD800 <= cp < 0xE000:
            continue
        ch = chr(cp)
        category = unicodedata.category(ch)
        if category.startswith("P") or (cp < 0x80 and not ch.isalnum() and ch.isprintable() and ch != " "):
            single.append(cp)
        elif ch.isspace() or category == "Zs":
            space.append(cp)
    return single, space, word


class CharWordPiece:
    """The table of one backend (see module doc); `encode(texts, keep, cls_id, sep_id)` -> Ragged."""

    def __init__(self, backend, table: np.ndarray, single_id: np.ndarray, trigger: np.ndarray,
                 added: tuple[str, ...], lowercase: bool):
        self.backend, self.model = backend, backend.model
        self.table, self.single_id, self.trigger = table, single_id, trigger
        self.added, self.lowercase = added, lowercase
        self._words: dict[str, tuple[int, ...]] = {}

    @classmethod
    def build(cls, backend) -> CharWordPiece | None:
        """The table for `backend`, or None when its pipeline is not BERT's (module doc)."""
        spec = json.loads(backend.to_str())
        norm, pre, model = spec.get("normalizer"), spec.get("pre_tokenizer") or {}, spec.get("model") or {}
        if (model.get("type") != "WordPiece" or pre.get("type") != "BertPreTokenizer"
                or (norm is not None and norm.get("type") != "BertNormalizer")):
            return None
        added_tokens = spec.get("added_tokens") or []
        if any(t.get("normalized") for t in added_tokens):
            return None
        added = tuple(t["content"] for t in added_tokens if t.get("content"))
        x_ids = [t.id for t in backend.model.tokenize("x")]
        if len(x_ids) != 1:
            return None
        x = x_ids[0]
        normalize = backend.normalizer.normalize_str if backend.normalizer is not None else (lambda s: s)
        lowercase = normalize("A") == "a"
        single, space, word = _candidates()
        table = np.zeros(0x110000, np.uint8)
        single_id = np.zeros(0x110000, np.int32)
        groups = ((single, _SINGLE), (space, _SPACE), (word, _WORD))
        probes = [f"x{chr(cp)}x" for codes, _ in groups for cp in codes]
        encodings = iter(backend.encode_batch(probes, add_special_tokens=False))
        for codes, kind in groups:
            for cp in codes:
                ids, ch = next(encodings).ids, chr(cp)
                out = normalize(ch)
                if kind == _SINGLE and len(ids) == 3 and ids[0] == ids[2] == x and out.strip(" ") == ch:
                    table[cp], single_id[cp] = _SINGLE, ids[1]
                elif kind == _SPACE and ids == [x, x] and out == " ":
                    table[cp] = _SPACE
                elif kind == _WORD and out == (ch.lower() if lowercase else ch) and ids == [
                        t.id for t in backend.model.tokenize(f"x{out}x")]:
                    table[cp] = _WORD
        trigger = np.zeros(0x110000, bool)
        trigger[[ord(t[0]) for t in added]] = True
        return cls(backend, table, single_id, trigger, added, lowercase)

    def _word_ids(self, words: list[str]) -> list[tuple[int, ...]]:
        cache = self._words
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        out = []
        for w in words:
            ids = cache.get(w)
            if ids is None:
                ids = cache[w] = tuple(t.id for t in self.model.tokenize(w.lower() if self.lowercase else w))
            out.append(ids)
        return out

    def _backend(self, texts: Sequence[str], keep: int) -> Ragged:
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return Ragged.from_lists([e.ids[:keep] for e in encode(list(texts), add_special_tokens=False)])

    def encode(self, texts: Sequence[str], keep: int, cls_id: int, sep_id: int) -> Ragged:
        """Ids of `[CLS] text [SEP]` per text, the text's own ids cut to the first `keep`."""
        n = len(texts)
        lengths = np.fromiter(map(len, texts), np.int64, n)
        joined = "".join(texts)
        codes = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), np.uint32)
        kind = self.table[codes]
        char_start = np.cumsum(lengths) - lengths
        text_of_char = np.repeat(np.arange(n), lengths)
        slow = np.zeros(n, bool)
        slow[text_of_char[kind == _UNSAFE]] = True
        for i in np.unique(text_of_char[self.trigger[codes]]).tolist():
            slow[i] = slow[i] or any(t in texts[i] for t in self.added)
        kind = np.where(slow[text_of_char], _UNSAFE, kind)

        # Units: single chars and word runs (runs end at text boundaries too).
        is_word = kind == _WORD
        first = np.zeros(len(codes), bool)
        first[char_start[lengths > 0]] = True
        last = np.zeros(len(codes), bool)
        last[(char_start + lengths - 1)[lengths > 0]] = True
        prev_word = np.concatenate([[False], is_word[:-1]]) & ~first
        next_word = np.concatenate([is_word[1:], [False]]) & ~last
        starts = np.flatnonzero(is_word & ~prev_word)
        ends = np.flatnonzero(is_word & ~next_word) + 1
        word_ids = self._word_ids([joined[s:e] for s, e in zip(starts.tolist(), ends.tolist())])
        word_counts = np.fromiter(map(len, word_ids), np.int64, len(word_ids))
        singles = np.flatnonzero(kind == _SINGLE)
        per_char = np.zeros(len(codes), np.int64)  # tokens that start at each character
        per_char[singles] = 1
        per_char[starts] = word_counts
        cumulative = np.concatenate([[0], np.cumsum(per_char)])
        token_start = cumulative[:-1]
        tokens = np.empty(int(cumulative[-1]), np.int32)
        tokens[token_start[singles]] = self.single_id[codes[singles]]
        flat_words = np.fromiter((i for ids in word_ids for i in ids), np.int32, int(word_counts.sum()))
        tokens[np.repeat(token_start[starts] - (np.cumsum(word_counts) - word_counts), word_counts)
               + np.arange(len(flat_words))] = flat_words
        inner = Ragged(tokens, cumulative[char_start + lengths] - cumulative[char_start])

        # Truncate to `keep`, add [CLS] / [SEP], and put the backend's rows in for the slow texts.
        kept = np.minimum(inner.lengths, keep)
        slow_index = np.flatnonzero(slow)
        slow_rows = self._backend([texts[i] for i in slow_index], keep) if len(slow_index) else None
        if slow_rows is not None:
            kept[slow_index] = slow_rows.lengths
        out_lengths = kept + 2
        out_start = np.cumsum(out_lengths) - out_lengths
        out = np.empty(int(out_lengths.sum()), np.int32)
        out[out_start] = cls_id
        out[out_start + out_lengths - 1] = sep_id
        row, column = inner.token_rows()
        fast = column < keep
        out[out_start[row[fast]] + 1 + column[fast]] = tokens[fast]
        if slow_rows is not None:
            row, column = slow_rows.token_rows()
            out[out_start[slow_index[row]] + 1 + column] = slow_rows.values
        return Ragged(out, out_lengths)
