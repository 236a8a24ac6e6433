"""BERT WordPiece tokenisation with the `tokenizers` library: prefixes, truncation, bucketed padding.

`Tokenizer.from_dir` reads a Hugging Face tokenizer directory: `tokenizer.json` when present, otherwise
`vocab.txt` plus the settings of `tokenizer_config.json` (do_lower_case, tokenize_chinese_chars,
strip_accents, special token names). Ids equal `transformers.AutoTokenizer.from_pretrained(dir)(texts,
truncation=True, max_length=L)["input_ids"]`; `encode` then pads them into numpy int32 arrays.
`token_arrays` returns them as a `ragged.Ragged` (flat ids + lengths), computed for plain texts without
per-character Python (`char_wordpiece`: the backend's own ids, from a table the backend confirms).

`char_token_bounds` gives, without tokenising, an upper bound on the number of WordPiece tokens of a text:
every token covers at least one non-space character of the normalised text, and BERT's normaliser maps
each character c to at most w(c) characters, w(c) = the longest NFD/NFKD expansion of c or of its lower
case (1 for all CJK ideographs and ASCII, 3 for a Hangul syllable, 18 at most). The data pipeline uses the
bound to choose one padded length per global batch on every host without communication; a tokenizer for
which the bound is not proven (`char_bound_holds` False) makes the pipeline pad to max_length instead.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import unicodedata
from collections.abc import Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from piccolo_jax.text.char_wordpiece import CharWordPiece
from piccolo_jax.text.ragged import Ragged

_SPECIAL_KEYS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_SPECIAL_DEFAULTS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                     "cls_token": "[CLS]", "mask_token": "[MASK]"}
_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_BOUND_CHECK_LIMIT = 0x30000  # no code point above U+2FFFF has a decomposition or a case mapping


def _token_name(value, where: str, key: str) -> str:
    """A special token given as "[CLS]" or as {"content": "[CLS]", ...} (AddedToken form)."""
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: field {key!r} must be a token string, got {value!r}")
    return value


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_vocab(path: str) -> dict[str, int]:
    """vocab.txt: one token per line, id = line number - 1 (a repeated token keeps its last id, as HF)."""
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            vocab[line.rstrip("\n")] = index
    if not vocab:
        raise ValueError(f"{path}: empty vocabulary")
    return vocab


def _bert_backend(vocab: dict[str, int], settings: dict, special: dict[str, str]) -> tokenizers.Tokenizer:
    """The tokenizers pipeline that transformers builds for BertTokenizer from a vocab."""
    backend = tokenizers.Tokenizer(
        models.WordPiece(vocab=vocab, unk_token=special["unk_token"], max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(settings.get("tokenize_chinese_chars", True)),
        strip_accents=settings.get("strip_accents"),
        lowercase=bool(settings.get("do_lower_case", True)))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = special["cls_token"], special["sep_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens([special[k] for k in _SPECIAL_KEYS])
    return backend


@functools.cache
def char_weights() -> np.ndarray:
    """w [0x110000] uint8: the most characters one code point can become under NFD/NFKD and lower-casing."""
    weights = np.ones(0x110000, np.uint8)
    norm = unicodedata.normalize
    for cp in range(_BOUND_CHECK_LIMIT):
        ch = chr(cp)
        if norm("NFKD", ch) != ch or ch.lower() != ch:
            weights[cp] = max(len(norm(form, x)) for form in ("NFD", "NFKD")
                              for x in (ch, ch.lower(), ch.casefold()))
    return weights


def char_token_bounds(texts: Sequence[str]) -> np.ndarray:
    """bound [N] int64 with bound[i] = sum of w(c) over the characters c of texts[i] (see module doc)."""
    if not texts:
        return np.zeros(0, np.int64)
    lengths = np.fromiter(map(len, texts), np.int64, len(texts))
    codes = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), np.uint32)
    cumulative = np.concatenate([[0], np.cumsum(char_weights()[codes], dtype=np.int64)])
    ends = np.cumsum(lengths)
    return cumulative[ends] - cumulative[ends - lengths]


_CHAR_WORDPIECE: dict[str, CharWordPiece | None] = {}  # backend JSON digest -> its array tokeniser
_CHAR_WORDPIECE_LOCK = threading.Lock()
_NORMALIZER_CHECKS: dict[str, bool] = {}  # normaliser JSON -> _normalizer_within_weights


def _normalizer_within_weights(normalizer) -> bool:
    """Whether `normalizer` turns every code point c below U+30000 into at most w(c) non-space chars."""
    weights = char_weights()
    chars = [chr(cp) for cp in range(_BOUND_CHECK_LIMIT) if not 0xD800 <= cp < 0xE000 and cp != 0x7C]
    pieces = normalizer.normalize_str("|".join(chars)).split("|")
    if len(pieces) != len(chars):  # the normaliser produced "|" itself: check char by char
        pieces = [normalizer.normalize_str(ch) for ch in chars]
    return all(len("".join(p.split())) <= weights[ord(c)] for c, p in zip(chars, pieces))


class Tokenizer:
    """A BERT WordPiece tokenizer: `[CLS] prefix+text [SEP]`, truncated, padded to a bucket.

    Attributes: vocab_size, pad_id, cls_id, sep_id, num_special (tokens added around a text, 2).
    Thread-safe: `encode` never mutates the underlying `tokenizers.Tokenizer`.
    """

    def __init__(self, backend: tokenizers.Tokenizer, special: dict[str, str],
                 files: dict[str, bytes], source: str):
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.source = source
        self._files = files
        self._special = special
        for key, token in special.items():
            if backend.token_to_id(token) is None:
                raise ValueError(f"{source}: special token {token!r} ({key}) is not in the vocabulary")
        self.cls_id = backend.token_to_id(special["cls_token"])
        self.sep_id = backend.token_to_id(special["sep_token"])
        self.pad_id = backend.token_to_id(special["pad_token"])
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.num_special = 2
        self._array_key: str | None = None  # digest of the backend's JSON, for _char_wordpiece
        probe = "probe 查询"
        plain = backend.encode(probe, add_special_tokens=False).ids
        if backend.encode(probe).ids != [self.cls_id, *plain, self.sep_id]:
            raise ValueError(f"{source}: only BERT-style tokenizers ([CLS] text [SEP]) are supported")

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load `tokenizer.json` if the directory has one, else `vocab.txt` + `tokenizer_config.json`."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: tokenizer directory not found")
        settings: dict = {}  # tokenizer_config.json, with special_tokens_map.json's names on top
        files: dict[str, bytes] = {}
        for name in _CONFIG_FILES:
            file = os.path.join(path, name)
            if os.path.exists(file):
                settings.update(_read_json(file))
                with open(file, "rb") as f:
                    files[name] = f.read()
        special = {k: _token_name(settings.get(k, _SPECIAL_DEFAULTS[k]), path, k) for k in _SPECIAL_KEYS}
        json_file, vocab_file = os.path.join(path, "tokenizer.json"), os.path.join(path, "vocab.txt")
        if os.path.exists(json_file):
            try:
                backend = tokenizers.Tokenizer.from_file(json_file)
            except Exception as e:  # tokenizers raises a bare Exception on a bad file
                raise ValueError(f"{json_file}: cannot load tokenizer ({e})") from e
        elif os.path.exists(vocab_file):
            vocab = _read_vocab(vocab_file)
            for key, token in special.items():
                if token not in vocab:
                    raise ValueError(f"{vocab_file}: special token {token!r} ({key}) is not in the vocabulary")
            backend = _bert_backend(vocab, settings, special)
        else:
            raise FileNotFoundError(f"{path}: neither tokenizer.json nor vocab.txt found")
        if os.path.exists(vocab_file):
            with open(vocab_file, "rb") as f:
                files["vocab.txt"] = f.read()
        return cls(backend, special, files, path)

    def token_arrays(self, texts: Sequence[str], max_length: int, prefix: str | None = None) -> Ragged:
        """Ids of `[CLS] prefix+text [SEP]` per text as a `Ragged` (flat int32 ids + lengths), the text cut so
        that the total is <= max_length. The ids are the backend's; texts of plain characters (CJK,
        punctuation, ASCII) are tokenised by `char_wordpiece` over arrays, the others by the backend."""
        if max_length < self.num_special + 1:
            raise ValueError(f"max_length must be at least {self.num_special + 1}, got {max_length}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        if prefix:
            texts = [prefix + t for t in texts]
        keep = max_length - self.num_special
        fast = self._char_wordpiece()
        if fast is not None:
            return fast.encode(texts, keep, self.cls_id, self.sep_id)
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we do not use.
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        encodings = encode(list(texts), add_special_tokens=False)
        return Ragged.from_lists([[self.cls_id, *e.ids[:keep], self.sep_id] for e in encodings])

    def token_ids(self, texts: Sequence[str], max_length: int, prefix: str | None = None) -> list[list[int]]:
        """Ids of `[CLS] prefix+text [SEP]` per text, the text cut so that the total is <= max_length."""
        return self.token_arrays(texts, max_length, prefix).to_lists()

    def _char_wordpiece(self) -> CharWordPiece | None:
        """The array tokeniser of this backend (one per pipeline and process), None if not BERT's."""
        if self._array_key is None:
            self._array_key = hashlib.sha256(self.backend.to_str().encode()).hexdigest()
        key = self._array_key
        if key not in _CHAR_WORDPIECE:
            with _CHAR_WORDPIECE_LOCK:
                if key not in _CHAR_WORDPIECE:
                    _CHAR_WORDPIECE[key] = CharWordPiece.build(self.backend)
        return _CHAR_WORDPIECE[key]

    def pad(self, ids: Ragged | Sequence[Sequence[int]], length: int) -> dict[str, np.ndarray]:
        """input_ids / attention_mask [N, length] int32; every row must fit in `length`."""
        rows = ids if isinstance(ids, Ragged) else Ragged.from_lists(ids)
        input_ids, attention_mask = rows.padded(length, self.pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def encode(self, texts: Sequence[str], max_length: int, prefix: str | None = None,
               pad_to_multiple_of: int = 8, pad_to: int | None = None) -> dict[str, np.ndarray]:
        """Tokenise `prefix + text` for each text into input_ids / attention_mask [N, T] int32.

        T = pad_to if given, else the longest row rounded up to a multiple of `pad_to_multiple_of`,
        capped at max_length (so T <= max_length always; rows are truncated to max_length tokens).
        """
        ids = self.token_arrays(texts, max_length, prefix)
        if pad_to is None:
            longest = int(ids.lengths.max()) if len(ids) else self.num_special
            pad_to = min(max_length, -(-longest // pad_to_multiple_of) * pad_to_multiple_of)
        return self.pad(ids, pad_to)

    @functools.cached_property
    def char_bound_holds(self) -> bool:
        """True when `char_token_bounds` provably bounds this tokenizer's token counts (WordPiece model,
        whitespace-splitting pre-tokenizer, per-character normaliser within the weights w(c))."""
        spec = json.loads(self.backend.to_str())
        pre = spec.get("pre_tokenizer") or {}
        pre_types = {p.get("type") for p in pre.get("pretokenizers", [pre])}
        if spec["model"]["type"] != "WordPiece" or not pre_types <= {"BertPreTokenizer", "WhitespaceSplit"}:
            return False
        if self.backend.normalizer is None:
            return True
        key = json.dumps(spec.get("normalizer"), sort_keys=True)
        if key not in _NORMALIZER_CHECKS:
            _NORMALIZER_CHECKS[key] = _normalizer_within_weights(self.backend.normalizer)
        return _NORMALIZER_CHECKS[key]

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json, vocab.txt and the config files so that `from_dir` and
        `transformers.AutoTokenizer.from_pretrained` both load the same tokenizer back."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.backend.save(os.path.join(directory, "tokenizer.json"))
        files = dict(self._files)
        if "vocab.txt" not in files:
            vocab = self.backend.get_vocab(with_added_tokens=True)
            files["vocab.txt"] = "".join(f"{t}\n" for t, _ in sorted(vocab.items(), key=lambda x: x[1])).encode()
        if "tokenizer_config.json" not in files:
            config = {"tokenizer_class": "BertTokenizer", "model_max_length": 512, **self._special}
            files["tokenizer_config.json"] = json.dumps(config, ensure_ascii=False, indent=2).encode()
        for name, data in files.items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)

