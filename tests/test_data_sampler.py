"""Dataset-homogeneous sampling: one dataset per batch, passes without repeats, mixing, determinism."""

import collections
import json
import os

import numpy as np
import pytest

from piccolo_jax.config import DataConfig
from piccolo_jax.data.loader import make_loader
from piccolo_jax.data.sampler import Sampler
from piccolo_jax.text.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKERS = {"alpha": "甲", "beta": "乙", "gamma": "丙", "tiny": "丁"}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(os.path.join(REPO, "assets", "tokenizer"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Four pair datasets whose every text starts with the dataset's marker character."""
    root = tmp_path_factory.mktemp("sampler_data")
    for (name, marker), size in zip(MARKERS.items(), (70, 45, 33, 5)):
        with open(root / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for i in range(size):
                f.write(json.dumps({"text": f"{marker}问{i}", "text_pos": f"{marker}答{i}"}, ensure_ascii=False) + "\n")
    return str(root)


def _plans(sampler, steps, state=None):
    state = state or sampler.initial_state()
    plans = []
    for _ in range(steps):
        plan, state = sampler.plan(state)
        plans.append(plan)
    return plans, state


def test_every_batch_comes_from_one_dataset(data_dir, tokenizer):
    cfg = DataConfig(paths=(data_dir,), global_batch_size=8, num_workers=0, query_prefix="", passage_prefix="")
    loader = make_loader(cfg, tokenizer)
    seen = collections.Counter()
    for batch in (next(loader) for _ in range(40)):
        marker = MARKERS[batch["dataset_name"]]
        for ids, mask in zip(batch["query_input_ids"], batch["query_attention_mask"]):
            first = tokenizer.backend.id_to_token(int(ids[1]))
            assert first == marker and mask[1] == 1
        for ids in batch["passage_input_ids"]:
            assert tokenizer.backend.id_to_token(int(ids[1])) == marker
        seen[batch["dataset_name"]] += 1
    assert set(seen) == {"alpha", "beta", "gamma"}  # "tiny" (5 < 8 records) is excluded


def test_size_mixing_takes_every_batch_of_a_pass_once():
    sizes = {"a": 70, "b": 45, "c": 33}
    sampler = Sampler(list(sizes), list(sizes.values()), 8, seed=3)
    per_epoch = {n: s // 8 for n, s in sizes.items()}  # 8 + 5 + 4 = 17 batches
    plans, _ = _plans(sampler, 2 * 17)
    for epoch in range(2):
        chunk = plans[epoch * 17:(epoch + 1) * 17]
        counts = collections.Counter(sampler.names[p.dataset] for p in chunk)
        assert counts == per_epoch
        for i, name in enumerate(sampler.names):
            rows = np.concatenate([p.record_ids for p in chunk if p.dataset == i])
            assert len(np.unique(rows)) == len(rows) == per_epoch[name] * 8  # no record twice in a pass
            assert rows.min() >= 0 and rows.max() < sizes[name]
            assert all(p.epoch == epoch for p in chunk if p.dataset == i)
    for i in range(3):  # each pass reshuffles its dataset (and so leaves out other records)
        passes = [np.concatenate([p.record_ids for p in plans[e * 17:(e + 1) * 17] if p.dataset == i])
                  for e in range(2)]
        assert not np.array_equal(passes[0], passes[1])
    orders = [[p.dataset for p in plans[e * 17:(e + 1) * 17]] for e in range(2)]
    assert orders[0] != orders[1]  # the mix is reshuffled each epoch


def test_weighted_mixing_follows_weights():
    sampler = Sampler(["a", "b", "c"], [100, 100, 100], 4, seed=0, weights={"a": 3.0, "b": 1.0, "c": 0.0})
    plans, state = _plans(sampler, 2000)
    counts = collections.Counter(sampler.names[p.dataset] for p in plans)
    assert counts["c"] == 0 and abs(counts["a"] / 2000 - 0.75) < 0.04
    assert state["cursors"] == {"a": counts["a"], "b": counts["b"], "c": 0}
    assert sampler.excluded == {"c": "weight 0"}
    a_rows = np.concatenate([p.record_ids for p in plans if p.dataset == 0][:25])  # one pass of "a"
    assert len(np.unique(a_rows)) == 100


def test_deterministic_given_seed():
    make = lambda seed: Sampler(["a", "b"], [50, 30], 5, seed)  # noqa: E731
    first, second, other = (_plans(make(s), 30)[0] for s in (7, 7, 8))
    assert all(p.dataset == q.dataset and (p.record_ids == q.record_ids).all() for p, q in zip(first, second))
    assert any(p.dataset != q.dataset or (p.record_ids != q.record_ids).any() for p, q in zip(first, other))


def test_state_round_trip_through_json():
    sampler = Sampler(["a", "b"], [50, 30], 5, seed=1, weights={"a": 1, "b": 2})
    plans, _ = _plans(sampler, 25)
    _, state = _plans(sampler, 10)
    fresh = Sampler(["a", "b"], [50, 30], 5, seed=1, weights={"a": 1, "b": 2})
    rest, _ = _plans(fresh, 15, json.loads(json.dumps(state)))
    assert all(p.dataset == q.dataset and (p.record_ids == q.record_ids).all() for p, q in zip(plans[10:], rest))


def test_state_from_other_settings_is_refused():
    _, state = _plans(Sampler(["a", "b"], [50, 30], 5, seed=1), 3)
    with pytest.raises(ValueError, match="seed: saved 1, now 2"):
        Sampler(["a", "b"], [50, 30], 5, seed=2).check_state(state)
    with pytest.raises(ValueError, match="datasets: saved"):
        Sampler(["a", "b"], [51, 30], 5, seed=1).check_state(state)
    # other weights (the mixing is "weights" both times): a resume would draw another dataset order
    _, weighted = _plans(Sampler(["a", "b"], [50, 30], 5, seed=1, weights={"a": 1, "b": 2}), 3)
    with pytest.raises(ValueError, match=r"weights: saved \{'a': 1, 'b': 2\}, now \{'a': 3, 'b': 1\}"):
        Sampler(["a", "b"], [50, 30], 5, seed=1, weights={"a": 3, "b": 1}).check_state(weighted)


def test_small_datasets_are_excluded_and_reported(data_dir, tokenizer):
    loader = make_loader(DataConfig(paths=(data_dir,), global_batch_size=8, num_workers=0), tokenizer)
    assert loader.report()["tiny"]["excluded"] == "5 records, fewer than one global batch of 8"
    line = next(line for line in loader.summary_lines() if "dataset tiny:" in line)  # the trainer logs these
    assert "0 batches per pass" in line and "EXCLUDED (5 records, fewer than one global batch of 8)" in line
    assert loader.report()["alpha"]["left_per_epoch"] == 70 - 8 * 8
    with pytest.raises(ValueError, match="no dataset can fill a global batch of 100"):
        make_loader(DataConfig(paths=(data_dir,), global_batch_size=100), tokenizer)


def test_bad_weights():
    with pytest.raises(ValueError, match=r"weights name unknown datasets \['z'\] / omit datasets \['b'\]"):
        Sampler(["a", "b"], [50, 30], 5, 0, weights={"a": 1.0, "z": 1.0})
    with pytest.raises(ValueError, match="must be >= 0"):
        DataConfig(weights={"a": -1.0})
