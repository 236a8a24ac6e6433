"""Loader output at token level against transformers, host slicing, resume in a new process, jax.Arrays."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from transformers import AutoTokenizer

from piccolo_jax.config import DataConfig, MeshConfig
from piccolo_jax.data import batching, packing
from piccolo_jax.data.loader import make_loader
from piccolo_jax.data.sampler import name_key
from piccolo_jax.parallel.sharding import host_local_to_global, make_mesh
from piccolo_jax.text.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(REPO, "assets", "tokenizer")
PROMPT = "为这个句子生成表示："


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader_data")
    triplets = []
    for i in range(40):  # 0..9 negatives: none (filled), fewer than K (repeated), K or more (sampled)
        row = {"text": f"第{i}个问题：城市{i % 7}的美食 food {i}", "text_pos": f"城市{i % 7}的答案{i}，很好吃。"}
        if i % 10:
            row["text_neg"] = [f"负例{i}-{j}：别的城市" for j in range(i % 10)]
        triplets.append(row)
    _write(root / "triplets.jsonl", triplets)
    bge = [{"query": f"query {i} 查找概念", "pos": [f"正例{i}a"] + ([f"正例{i}b 第二个"] if i % 2 else []),
            "neg": [f"负例{i}/{j}" for j in range(3 + i % 3)], **({"prompt": PROMPT} if i % 3 == 0 else {})}
           for i in range(36)]
    _write(root / "bge.jsonl", bge)
    _write(root / "sym.jsonl", [{"text": f"今天{i}号天气很好", "text_pos": f"{i}号这天天气不错"} for i in range(30)])
    return str(root)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def reference():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def _cfg(data_dir, **kw):
    base = dict(paths=(data_dir,), global_batch_size=8, num_negatives=4, query_max_length=32,
                passage_max_length=48, pad_multiple=8, symmetric_datasets=("sym",), num_workers=0, seed=5)
    return DataConfig(**{**base, **kw})


def _rows(data_dir, name):
    with open(os.path.join(data_dir, f"{name}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _unpadded(ids, mask):
    assert (mask[:mask.sum()] == 1).all() and (mask[mask.sum():] == 0).all()
    return ids[:mask.sum()].tolist()


def test_tokens_prefixes_and_negatives_match_reference(data_dir, tokenizer, reference):
    cfg = _cfg(data_dir)
    ref = lambda text, n: reference(text, truncation=True, max_length=n)["input_ids"]  # noqa: E731
    loader = make_loader(cfg, tokenizer)
    kinds = set()
    for _ in range(24):
        batch = next(loader)
        name, k = batch["dataset_name"], cfg.num_negatives
        rows = _rows(data_dir, name)
        q_prefix, p_prefix = ("", "") if name == "sym" else ("查询: ", "结果: ")
        tq, tp = batch["query_input_ids"].shape[1], batch["passage_input_ids"].shape[1]
        assert batch["negative_input_ids"].shape == (8, k, tp)
        longest_q, longest_p = 0, 0
        for r, rid in enumerate(batch["record_index"]):
            row = rows[rid]
            query = row.get("text", row.get("query"))
            positives = [row["text_pos"]] if "text_pos" in row else row["pos"]
            negatives = row.get("text_neg", row.get("neg", []))
            prefix = row.get("prompt", q_prefix)
            got_q = _unpadded(batch["query_input_ids"][r], batch["query_attention_mask"][r])
            assert got_q == ref(prefix + query, cfg.query_max_length)
            got_p = _unpadded(batch["passage_input_ids"][r], batch["passage_attention_mask"][r])
            assert got_p in [ref(p_prefix + p, cfg.passage_max_length) for p in positives]
            got_n = [_unpadded(batch["negative_input_ids"][r, j], batch["negative_attention_mask"][r, j])
                     for j in range(k)]
            if negatives:
                options = [ref(p_prefix + n, cfg.passage_max_length) for n in negatives]
                picks = [options.index(g) for g in got_n]  # ValueError if not one of its own negatives
                expected_distinct = min(k, len(negatives))
                assert len(set(picks)) == expected_distinct  # without replacement; all of them when < K
                kinds.add("own" if len(negatives) >= k else "repeated")
            else:  # random negatives: positives of records of the same dataset outside the batch
                in_batch = set(batch["record_index"].tolist())
                others = {tuple(ref(p_prefix + o["text_pos"], cfg.passage_max_length))
                          for i, o in enumerate(rows) if i not in in_batch}
                assert all(tuple(g) in others for g in got_n)
                kinds.add("filled")
            if "prompt" in row:
                kinds.add("prompt")
            longest_q = max(longest_q, len(got_q))
            longest_p = max([longest_p, len(got_p)] + [len(g) for g in got_n])
        for t, longest, limit in ((tq, longest_q, cfg.query_max_length), (tp, longest_p, cfg.passage_max_length)):
            assert longest <= t and (t % cfg.pad_multiple == 0 or t == limit)
            assert t - longest < 3 * cfg.pad_multiple  # buckets follow the data, not the max length
        assert (batch["query_input_ids"][batch["query_attention_mask"] == 0] == tokenizer.pad_id).all()
    assert kinds == {"own", "repeated", "filled", "prompt"}
    report = loader.report()
    assert report["triplets"]["records_without_negatives"] == 4
    assert report["triplets"]["records_with_repeated_negatives"] == 12  # i % 10 in 1..3


def test_dataset_prefix_overrides_and_pretrain_pairs(data_dir, tokenizer, reference):
    cfg = _cfg(data_dir, num_negatives=0, dataset_prefixes=(("triplets", "Q: ", "P: "),), symmetric_datasets=())
    loader = make_loader(cfg, tokenizer)
    for _ in range(10):
        batch = next(loader)
        assert "negative_input_ids" not in batch and "negative_attention_mask" not in batch
        if batch["dataset_name"] == "triplets":
            row = _rows(data_dir, "triplets")[batch["record_index"][0]]
            got = _unpadded(batch["passage_input_ids"][0], batch["passage_attention_mask"][0])
            assert got == reference("P: " + row["text_pos"], truncation=True, max_length=48)["input_ids"]
            return
    pytest.fail("no triplets batch in 10 steps")


def test_truncation_pads_to_max_length(tmp_path, tokenizer, reference):
    rows = [{"text": "很长的问题" * 30, "text_pos": "很长的答案。" * 200} for _ in range(8)]
    _write(tmp_path / "long.jsonl", rows)
    cfg = _cfg(str(tmp_path), num_negatives=0, query_max_length=30, passage_max_length=100, pad_multiple=64,
               symmetric_datasets=())
    batch = next(make_loader(cfg, tokenizer))
    assert batch["query_input_ids"].shape == (8, 30) and batch["passage_input_ids"].shape == (8, 100)
    assert batch["passage_attention_mask"].all()
    expected = reference("结果: " + rows[0]["text_pos"], truncation=True, max_length=100)["input_ids"]
    assert batch["passage_input_ids"][0].tolist() == expected


def test_unbounded_tokenizer_pads_to_max_length(data_dir):
    tokenizer = Tokenizer.from_dir(TOKENIZER_DIR)
    tokenizer.char_bound_holds = False  # as for a tokenizer whose normaliser may expand characters
    batch = next(make_loader(_cfg(data_dir), tokenizer))
    assert batch["query_input_ids"].shape[1] == 32 and batch["passage_input_ids"].shape[1] == 48


@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_get_disjoint_slices_of_the_global_batch(data_dir, tokenizer, hosts):
    cfg = _cfg(data_dir)
    whole = make_loader(cfg, tokenizer)
    parts = [make_loader(cfg, tokenizer, process_index=i, process_count=hosts) for i in range(hosts)]
    for _ in range(12):
        expected = next(whole)
        got = [next(p) for p in parts]
        for key, value in expected.items():
            if isinstance(value, np.ndarray):
                assert all(g[key].shape[0] == 8 // hosts for g in got)
                np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), value)
            else:
                assert all(g[key] == value for g in got)
        ids = [set(g["record_index"].tolist()) for g in got]
        assert sum(map(len, ids)) == len(set().union(*ids)) == 8


def test_workers_and_prefetch_do_not_change_batches_or_state(data_dir, tokenizer):
    sync = make_loader(_cfg(data_dir), tokenizer)
    with make_loader(_cfg(data_dir, num_workers=2, prefetch=5), tokenizer) as threaded:
        for step in range(10):
            a, b = next(sync), next(threaded)
            assert all(np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a)
            assert threaded.state() == sync.state() and threaded.state()["step"] == step + 1


RESUME_SCRIPT = """
import json, sys
import numpy as np
from piccolo_jax.config import DataConfig
from piccolo_jax.data.loader import make_loader
from piccolo_jax.text.tokenizer import Tokenizer
job = json.loads(sys.argv[1])
loader = make_loader(DataConfig(**job["cfg"]), Tokenizer.from_dir(job["tokenizer"]), state=job["state"])
arrays = {}
for step in range(job["steps"]):
    batch = next(loader)
    arrays.update({f"{step}/{k}": v for k, v in batch.items() if isinstance(v, np.ndarray)})
    arrays[f"{step}/step"] = np.array(batch["step"])
np.savez(job["out"], **arrays)
"""


@pytest.mark.parametrize("weights", [None, {"triplets": 1.0, "bge": 2.0, "sym": 0.5}], ids=["size", "weights"])
def test_resume_in_a_new_process(data_dir, tokenizer, tmp_path, weights):
    cfg = _cfg(data_dir, num_workers=2, prefetch=3, weights=weights or {})
    loader = make_loader(cfg, tokenizer)
    for _ in range(7):  # stops mid-epoch (an epoch here is 5 + 4 + 3 = 12 batches)
        next(loader)
    state = json.loads(json.dumps(loader.state()))
    expected = [next(loader) for _ in range(9)]  # crosses into the next epoch
    loader.close()
    job = {"cfg": {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}, "tokenizer": TOKENIZER_DIR,
           "state": state, "steps": 9, "out": str(tmp_path / "resumed.npz")}
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, json.dumps(job, ensure_ascii=False)], check=True, env=env)
    with np.load(job["out"]) as resumed:
        for step, batch in enumerate(expected):
            assert int(resumed[f"{step}/step"]) == batch["step"] == 7 + step
            for key, value in batch.items():
                if isinstance(value, np.ndarray):
                    np.testing.assert_array_equal(resumed[f"{step}/{key}"], value)


def test_host_local_to_global(data_dir, tokenizer):
    assert jax.device_count() == 8
    mesh = make_mesh(MeshConfig(data=8, fsdp=1, tensor=1))
    cfg = _cfg(data_dir, global_batch_size=16)
    batch = next(make_loader(cfg, tokenizer))
    host = {k: v for k, v in batch.items() if isinstance(v, np.ndarray)}
    arrays = host_local_to_global(host, mesh)
    assert set(arrays) == set(host)
    for key, array in arrays.items():
        assert array.shape == batch[key].shape and array.dtype == (np.float32 if key == "teacher_scores" else np.int32)
        assert len(array.addressable_shards) == 8 and array.addressable_shards[0].data.shape[0] == 2
        np.testing.assert_array_equal(np.asarray(array), batch[key])


def test_bad_loader_settings(data_dir, tokenizer):
    with pytest.raises(ValueError, match="global_batch_size 8 is not divisible by 3 processes"):
        make_loader(_cfg(data_dir), tokenizer, process_index=0, process_count=3)
    # Settings naming datasets that are not there warn (one config serves any data); a dataset left out of
    # data.weights is an error.
    names = [s.name for s in make_loader(_cfg(data_dir), tokenizer).sources]
    loader = make_loader(_cfg(data_dir, symmetric_datasets=("nope",), weights={**dict.fromkeys(names, 1.0), "x": 1.0}),
                         tokenizer)
    assert any("symmetric_datasets names ['nope']" in w for w in loader.warnings)
    assert any("weights names ['x']" in w for w in loader.warnings)
    with pytest.raises(ValueError, match=r"data.weights gives no weight to the datasets"):
        make_loader(_cfg(data_dir, weights={names[0]: 1.0}), tokenizer)
    state = make_loader(_cfg(data_dir), tokenizer).state()
    with pytest.raises(ValueError, match="global_batch_size: saved 8, now 16"):
        make_loader(_cfg(data_dir, global_batch_size=16), tokenizer, state=state)


def test_random_negatives_come_from_outside_the_batch():
    rng = np.random.default_rng(0)
    for n, b in ((10, 9), (50, 8), (1000, 64)):
        batch = rng.choice(n, b, replace=False)
        lenders = batching.fill_record_ids(1, "d", 2, batch[:5], batch, n, 7)
        outside = np.setdiff1d(np.arange(n), batch)  # reference: the complement, listed
        draw = batching.mix(1, batching._TAG_FILL, name_key("d"), 2, batch[:5, None], np.arange(7)[None, :])
        np.testing.assert_array_equal(lenders, outside[(draw % np.uint64(len(outside))).astype(np.int64)])
        assert not np.isin(lenders, batch).any()
    with pytest.raises(ValueError, match="all 8 records are in the batch"):
        batching.fill_record_ids(1, "d", 0, np.arange(2), np.arange(8), 8, 3)


def _splitmix(*keys: int) -> int:
    """splitmix64 folded over the keys, in Python integers (the reference for batching.mix)."""
    mask, h = (1 << 64) - 1, 0x9E3779B97F4A7C15
    for key in keys:
        z = ((h ^ (key & mask)) + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        h = z ^ (z >> 31)
    return h


def test_positive_and_negative_slots_of_many_records_at_once():
    """The vectorised draws equal, record by record, a shuffle by Python-integer splitmix64 keys."""
    rng = np.random.default_rng(0)
    records, counts = rng.integers(0, 10**6, 300), rng.integers(1, 12, 300)
    key = name_key("set")
    slots = batching.negative_slots(4, "set", 3, records, counts, 7)
    positive = batching.positive_slot(4, "set", 3, records, counts)
    for r, n, got, pos in zip(records.tolist(), counts.tolist(), slots.tolist(), positive.tolist()):
        order = sorted(range(n), key=lambda i: (_splitmix(4, batching._TAG_NEGATIVE, key, 3, r, i), i))
        assert got == [order[i % n] for i in range(7)]
        assert batching.negative_slots(4, "set", 3, r, n, 7).tolist() == got  # one record
        assert pos == _splitmix(4, batching._TAG_POSITIVE, key, 3, r) % n == batching.positive_slot(4, "set", 3, r, n)


# ------------------------------------------------------------------------------------------------ packing
def _unpack_blocks(batch, side, blocks, length):
    """Per block, the token lists of its slots read back from the packed arrays."""
    arrays = [batch[f"packed_{side}_{f}"].reshape(blocks, -1, length) for f in ("input_ids", "positions", "segments")]
    out = []
    for ids, pos, seg in zip(*arrays):
        texts: dict = {}
        for r, u in zip(*np.nonzero(seg)):
            texts.setdefault(int(seg[r, u]) - 1, []).append((int(pos[r, u]), int(ids[r, u])))
        out.append([[t for _, t in sorted(texts[s])] for s in range(len(texts))])
    return out


def test_packed_batches_hold_the_padded_batches_texts(data_dir, tokenizer):
    """shards x chunks = 4 blocks of m = 2 rows: every block's slots are its rows' query, positives and
    negatives, token for token as the padded loader gives them; shapes constant; the real-token count."""
    cfg, k = _cfg(data_dir, global_batch_size=16), 4
    padded_loader, packed_loader = make_loader(cfg, tokenizer), make_loader(cfg, tokenizer)
    line = packed_loader.enable_packing(shards=2, num_chunks=2)
    spec = packed_loader.packing
    assert "packing: per device and chunk, 4 queries in" in line and spec.query_length == 32
    shapes = set()
    for _ in range(12):
        padded, packed = next(padded_loader), next(packed_loader)
        assert not packed["packing"]["fallback"] and "query_input_ids" not in packed
        shapes.add(tuple(packed[f"packed_{s}_input_ids"].shape for s in ("query", "document")))
        q = [_unpadded(i, m) for i, m in zip(padded["query_input_ids"], padded["query_attention_mask"])]
        p = [_unpadded(i, m) for i, m in zip(padded["passage_input_ids"], padded["passage_attention_mask"])]
        n = [[_unpadded(i, m) for i, m in zip(ii, mm)]
             for ii, mm in zip(padded["negative_input_ids"], padded["negative_attention_mask"])]
        got_q = _unpack_blocks(packed, "query", 4, spec.query_length)
        got_d = _unpack_blocks(packed, "document", 4, spec.document_length)
        for j in range(4):
            rows = range(4 * j, 4 * j + 4)
            assert got_q[j] == [q[r] for r in rows]
            assert got_d[j] == [p[r] for r in rows] + [x for r in rows for x in n[r]]
        np.testing.assert_array_equal(packed["packed_document_lengths"],
                                      np.concatenate([padded["passage_attention_mask"].sum(1)[:, None],
                                                      padded["negative_attention_mask"].sum(2)], axis=1))
        real = sum(int(padded[f"{s}_attention_mask"].sum()) for s in ("query", "passage", "negative"))
        assert packed["packing"]["real_tokens"] == real < packed["packing"]["computed_tokens"]
    assert shapes == {((4 * spec.query_rows, 32), (4 * spec.document_rows, 48))}  # one shape: one program
    assert packed_loader.metrics()["data/packing_fallbacks"] == 0


@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_pack_their_own_rows_into_the_same_shapes(data_dir, tokenizer, hosts):
    cfg = _cfg(data_dir, global_batch_size=16)
    whole = make_loader(cfg, tokenizer)
    parts = [make_loader(cfg, tokenizer, process_index=i, process_count=hosts) for i in range(hosts)]
    for loader in (whole, *parts):
        loader.enable_packing(shards=4, num_chunks=2)
    assert all(p.packing == whole.packing for p in parts)  # no host talks to another
    for _ in range(8):
        expected, got = next(whole), [next(p) for p in parts]
        for key, value in expected.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), value)


def test_a_batch_that_does_not_fit_the_packed_shapes_is_padded_and_counted(data_dir, tokenizer):
    import dataclasses

    cfg = _cfg(data_dir, global_batch_size=16)
    loader = make_loader(cfg, tokenizer)
    loader.enable_packing(shards=2, num_chunks=1)
    loader.packing = dataclasses.replace(loader.packing, document_rows=1)  # 8 x (1 + 4) documents: never fit
    batch = next(loader)
    assert batch["packing"]["fallback"] and batch["passage_input_ids"].shape[0] == 16
    assert batch["packing"]["real_tokens"] == sum(int(batch[k].sum()) for k in batch if k.endswith("mask"))
    assert packing.step_arrays(batch).keys() == {k for k in batch if k.endswith(("_ids", "attention_mask"))}
    assert loader.metrics()["data/packing_fallbacks"] == 1
    with pytest.raises(RuntimeError, match="before the first batch"):
        loader.enable_packing(shards=2, num_chunks=1)
