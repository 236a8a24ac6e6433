"""BERT WordPiece over arrays of code points: the `tokenizers` ids of texts without per-character Python.

BERT's pipeline (BertNormalizer, BertPreTokenizer, WordPiece) works character by character for almost
all text: each character is normalised on its own (cleaned, accents stripped, lower-cased), a CJK
ideograph or a punctuation mark becomes a word of its own, whitespace separates words, and the other
characters join into words that WordPiece splits. So the ids of a text are the ids of its units in order:

    class   characters (examples)                  contributes
    single  CJK ideographs, punctuation            [single_id[c]] (its vocabulary id, or [UNK])
    space   whitespace                             nothing; ends a word
    word    letters, digits, symbols, kana         its normalised character n(c) to the current word
    drop    control and format chars, accents      nothing, and does not end a word ("e\u0301" -> "e")

and a word (maximal run of word / drop characters) gives WordPiece(n(c) for its word characters), from
the backend's own model. The per-code-point table comes from the backend itself (`classify`, when a
character is first seen): c is run through the real pipeline as "x" + c + "x" and gets a class only if
the normalised string, its pre-tokenised pieces and the ids all show exactly that class's behaviour (and
c normalises to at most one character). A text with any other character (one that expands, such as a
Hangul syllable under NFD, or a combining mark that is kept) or containing an added token ("[SEP]", ...)
is tokenised by the backend instead, so the ids are always the backend's. `encode` returns the ids of
`[CLS] text [SEP]`, the text cut to `keep` tokens, as a `Ragged`.

Eligible backends: WordPiece model, BertPreTokenizer, BertNormalizer or no normaliser, and added tokens
matched on the raw text only (normalized false), as every BERT tokenizer in transformers' format.
Greek capital sigma is left to the backend (its lower case can depend on the next letter).

Cost per batch of N texts and C characters: O(N + C) numpy work, one dictionary look-up per word (a
cache of the model's WordPiece splits) and one backend call for the texts outside the table.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence

import numpy as np

from piccolo_jax.text.ragged import Ragged

_UNSAFE, _SPACE, _SINGLE, _WORD, _DROP = 0, 1, 2, 3, 4
_CONTEXT_CASED = (0x3A3,)  # Greek capital sigma: final-sigma lower-casing looks at the next letter
_CACHE_LIMIT = 1 << 18  # word splits kept; the cache is emptied when it grows past this


class CharWordPiece:
    """The table of one backend (see module doc); `encode(texts, keep, cls_id, sep_id)` -> Ragged.

    Code points are classified when first seen (`classify`: one backend call for all new ones of a batch),
    so the table costs nothing up front. Thread-safe: a code point's class is written before its `probed`
    flag, and one not yet classified reads as unsafe, which only sends its text to the backend.
    """

    def __init__(self, backend, x_id: int, added: tuple[str, ...], lowercase: bool):
        self.backend, self.model, self.x_id = backend, backend.model, x_id
        self.table = np.zeros(0x110000, np.uint8)  # class per code point
        self.single_id = np.zeros(0x110000, np.int32)  # singles: the token id
        self.word_code = np.zeros(0x110000, np.uint32)  # word chars: the normalised code point
        self.probed = np.zeros(0x110000, bool)
        self.probed[0xD800:0xE000] = True  # lone surrogates: unsafe (the backend rejects them, as before)
        self.probed[list(_CONTEXT_CASED)] = True
        self.trigger = np.zeros(0x110000, bool)
        self.trigger[[ord(t[0]) for t in added]] = True
        self.added, self.lowercase = added, lowercase
        self._words: dict[str, tuple[int, ...]] = {}

    @classmethod
    def build(cls, backend) -> CharWordPiece | None:
        """The (empty) table for `backend`, or None when its pipeline is not BERT's (module doc)."""
        spec = json.loads(backend.to_str())
        norm, pre, model = spec.get("normalizer"), spec.get("pre_tokenizer") or {}, spec.get("model") or {}
        if (model.get("type") != "WordPiece" or pre.get("type") != "BertPreTokenizer"
                or (norm is not None and norm.get("type") != "BertNormalizer")):
            return None
        added_tokens = spec.get("added_tokens") or []
        if any(t.get("normalized") for t in added_tokens):
            return None
        x_ids = [t.id for t in backend.model.tokenize("x")]
        if len(x_ids) != 1:
            return None
        added = tuple(t["content"] for t in added_tokens if t.get("content"))
        lowercase = backend.normalizer is not None and backend.normalizer.normalize_str("A") == "a"
        return cls(backend, x_ids[0], added, lowercase)

    def classify(self, codes) -> None:
        """Classify the code points `codes` (not yet probed) by running "x" + c + "x" through the backend:
        c gets a class only if the normalised string, its pre-tokenised pieces and the ids all show that
        class's behaviour (module doc) and c normalises to at most one character that is not a combining
        mark (NFD would reorder a kept mark across characters); otherwise it stays unsafe."""
        backend, x = self.backend, self.x_id
        normalize = backend.normalizer.normalize_str if backend.normalizer is not None else (lambda s: s)
        pieces = backend.pre_tokenizer.pre_tokenize_str
        model_ids = lambda word: [t.id for t in self.model.tokenize(word)]  # noqa: E731
        codes = [int(cp) for cp in codes if not self.probed[cp]]
        encodings = backend.encode_batch([f"x{chr(cp)}x" for cp in codes], add_special_tokens=False)
        for cp, encoding in zip(codes, encodings):
            ch, ids = chr(cp), encoding.ids
            out = normalize(ch)
            core = out.strip(" ")
            if len(core) > 1 or (core == "" and out not in ("", " ")) or (core and unicodedata.combining(core)):
                self.probed[cp] = True
                continue
            split = [p for p, _ in pieces(normalize(f"x{ch}x"))]
            if out == " " and split == ["x", "x"] and ids == [x, x]:
                self.table[cp] = _SPACE
            elif out == "" and split == ["xx"] and ids == model_ids("xx"):
                self.table[cp] = _DROP
            elif core and split == ["x", core, "x"] and len(ids) == 3 and ids[0] == ids[2] == x:
                self.single_id[cp] = ids[1]
                self.table[cp] = _SINGLE
            elif out == core and split == [f"x{core}x"] and ids == model_ids(f"x{core}x"):
                self.word_code[cp] = ord(core)
                self.table[cp] = _WORD
            self.probed[cp] = True

    def _word_ids(self, words: list[str]) -> list[tuple[int, ...]]:
        cache = self._words
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        out = []
        for w in words:
            ids = cache.get(w)
            if ids is None:
                ids = cache[w] = tuple(t.id for t in self.model.tokenize(w)) if w else ()
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
        unseen = ~self.probed[codes]
        if unseen.any():
            self.classify(np.unique(codes[unseen]))
        kind = self.table[codes]
        char_start = np.cumsum(lengths) - lengths
        text_of_char = np.repeat(np.arange(n), lengths)
        slow = np.zeros(n, bool)
        slow[text_of_char[kind == _UNSAFE]] = True
        for i in np.unique(text_of_char[self.trigger[codes]]).tolist():
            slow[i] = slow[i] or any(t in texts[i] for t in self.added)
        kind = np.where(slow[text_of_char], _UNSAFE, kind)

        # Units: single chars and words, a word = a run of word / drop chars (runs end at text boundaries).
        in_word = (kind == _WORD) | (kind == _DROP)
        first = np.zeros(len(codes), bool)
        first[char_start[lengths > 0]] = True
        last = np.zeros(len(codes), bool)
        last[(char_start + lengths - 1)[lengths > 0]] = True
        prev_word = np.concatenate([[False], in_word[:-1]]) & ~first
        next_word = np.concatenate([in_word[1:], [False]]) & ~last
        starts = np.flatnonzero(in_word & ~prev_word)
        ends = np.flatnonzero(in_word & ~next_word) + 1
        is_word = kind == _WORD  # the normalised characters of all words, back to back, as one string
        letters = self.word_code[codes[is_word]].astype("<u4").tobytes().decode("utf-32-le")
        before = np.concatenate([[0], np.cumsum(is_word)])  # word characters before each position
        word_ids = self._word_ids([letters[a:b] for a, b in zip(before[starts].tolist(), before[ends].tolist())])
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
