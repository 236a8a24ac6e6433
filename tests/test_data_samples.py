"""The bundled sample data: reproducible from its generator, valid, and loadable for both stages."""

import collections
import filecmp
import importlib.util
import json
import os

import numpy as np
from helpers import bad_record_counts

from piccolo_jax.config import DataConfig
from piccolo_jax.data.loader import make_loader
from piccolo_jax.text.tokenizer import Tokenizer, char_token_bounds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "assets", "data")


def _generator():
    spec = importlib.util.spec_from_file_location("make_samples", os.path.join(DATA, "make_samples.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_files_are_the_generator_output(tmp_path):
    counts = _generator().write_all(str(tmp_path))
    for rel in counts:
        assert filecmp.cmp(tmp_path / rel, os.path.join(DATA, rel), shallow=False), rel


def test_shape_of_the_sample_data():
    stages = collections.defaultdict(dict)
    for stage in ("pretrain", "finetune"):
        for name in sorted(os.listdir(os.path.join(DATA, stage))):
            with open(os.path.join(DATA, stage, name), encoding="utf-8") as f:
                stages[stage][name] = [json.loads(line) for line in f]
    assert all(len(datasets) >= 2 for datasets in stages.values())
    for rows in stages["pretrain"].values():
        assert 200 <= len(rows) <= 5000 and all(set(r) == {"text", "text_pos"} for r in rows)
    for rows in stages["finetune"].values():
        negatives = [len(r.get("text_neg", r.get("neg", []))) for r in rows]
        assert 200 <= len(rows) <= 5000 and min(negatives) == 2 and max(negatives) == 7
    for rows in stages["finetune"].values():  # no hard negative is another row's positive
        positives = {p for r in rows for p in ([r["text_pos"]] if "text_pos" in r else r["pos"])}
        assert not positives & {n for r in rows for n in r.get("text_neg", r.get("neg", []))}
    for stage in stages.values():  # no query or positive text twice in a dataset (no false negatives)
        for rows in stage.values():
            for key in ("text", "query", "text_pos"):
                texts = [r[key] for r in rows if key in r]
                assert len(set(texts)) == len(texts)


def test_both_stages_load_with_the_bundled_tokenizer():
    tokenizer = Tokenizer.from_dir(os.path.join(REPO, "assets", "tokenizer"))
    assert tokenizer.vocab_size == 21128 and tokenizer.char_bound_holds
    for stage, k, passage_length in (("pretrain", 0, 128), ("finetune", 7, 512)):
        cfg = DataConfig(paths=(os.path.join(DATA, stage),), global_batch_size=64, num_negatives=k,
                         passage_max_length=passage_length, symmetric_datasets=("paraphrase",) if k == 0 else ())
        with make_loader(cfg, tokenizer) as loader:
            assert sum(bad_record_counts(loader).values()) == 0
            names = {next(loader)["dataset_name"] for _ in range(12)}
            assert len(names) >= 2
            for source in loader.sources:  # the character bound covers every sample text
                records = source.records(range(len(source)))
                texts = [t for r in records for t in (r.query, *r.positives, *r.negatives)]
                lengths = np.array([len(ids) for ids in tokenizer.token_ids(texts, 10**6)])
                assert (lengths <= char_token_bounds(texts) + 2).all()
