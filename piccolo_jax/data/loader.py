"""The training data loader: sources + sampler + background tokenisation, and the hand-off to JAX.

    loader = make_loader(cfg, tokenizer, jax.process_index(), jax.process_count(), state=saved)
    for batch in loader:                      # endless; host-local numpy arrays
        arrays = host_local_to_global(step_arrays(batch), mesh)  # parallel.sharding, data.packing
        ...
        checkpoint_extra = loader.state()     # small JSON-serialisable dict

Batches are planned in order in the caller's thread (cheap: integers only) and built by `num_workers`
threads, `prefetch` ahead. Tokenising, padding and packing are numpy over whole batch sides
(`Tokenizer.token_arrays`, `ragged.Ragged`; texts outside its character table go to the Rust tokenizer,
which runs without the GIL); what stays per record in Python is reading and JSON parsing. `state()`
describes the batches handed out, not the ones prefetched, so a resume repeats nothing and skips nothing.

(Grain was considered: a batch here is a pure function of (seed, step), so exact resume needs no
checkpointable iterator. Threads overlap building with the train step but scale little (numpy and
JSON hold the GIL part of the time); one core builds ~5,000 finetune examples (64 / 512 tokens, K = 7)
a second on benchmarks/bench_data.py's corpus, far ahead of any step, so there are no process workers.)
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
from collections.abc import Mapping

from piccolo_jax.config.data import DataConfig
from piccolo_jax.data import packing
from piccolo_jax.data.batching import batch_texts, build_host_batch, packing_bounds
from piccolo_jax.data.sampler import Sampler
from piccolo_jax.data.sources import Source, open_sources
from piccolo_jax.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def dataset_name_warnings(cfg: DataConfig, names: list[str]) -> list[str]:
    """Warnings for settings that name datasets which are not there (so that one config serves any data).

    `symmetric_datasets`, `dataset_prefixes`, `dataset_tasks` and `weights` entries naming no dataset are
    ignored with a warning; when `weights` is used, a dataset it leaves out is an error (its share would be
    a guess).
    """
    out = []
    for field, listed in (("symmetric_datasets", cfg.symmetric_datasets),
                          ("dataset_prefixes", [p[0] for p in cfg.dataset_prefixes]),
                          ("dataset_tasks", [t[0] for t in cfg.dataset_tasks]),
                          ("weights", [w[0] for w in cfg.weights])):
        unknown = sorted(set(listed) - set(names))
        if unknown:
            out.append(f"data.{field} names {unknown}, which are not among the datasets {names}: ignored")
    if cfg.weights:
        weighted = {n for n, _ in cfg.weights}
        missing = [n for n in names if n not in weighted]
        if missing:
            raise ValueError(f"data.weights gives no weight to the datasets {missing}; list every dataset "
                             f"(weight 0 leaves one out), or drop data.weights to mix by size")
    return out


class Loader:
    """Endless iterator of host-local batches (see `build_host_batch` for the keys and shapes).

    `warnings` lists what the settings name that the data does not have; `summary_lines()` describes
    each dataset. The caller logs both.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, sources: list[Source],
                 process_index: int = 0, process_count: int = 1, state: Mapping | None = None):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if cfg.global_batch_size % process_count:
            raise ValueError(f"global_batch_size {cfg.global_batch_size} is not divisible by "
                             f"{process_count} processes")
        self.cfg, self.tokenizer, self.sources = cfg, tokenizer, sources
        self.process_index, self.process_count = process_index, process_count
        names = [s.name for s in sources]
        self.warnings = dataset_name_warnings(cfg, names)
        for source in sources:  # each dataset's task type (its loss): its records', or data.dataset_tasks'
            task = source.resolve_task(cfg.declared_task(source.name))
            if task == "classification" and not cfg.negatives_for(task):
                raise ValueError(f"dataset {source.name!r} is a classification dataset, which trains against each "
                                 "record's own negatives: set data.classification_negatives (or "
                                 "data.num_negatives) >= 1")
        weights = {n: w for n, w in cfg.weights if n in names}
        self.sampler = Sampler(names, [len(s) for s in sources], cfg.global_batch_size, cfg.seed,
                               weights or None)
        if state is None:
            state = self.sampler.initial_state()
        else:
            self.sampler.check_state(state)
            state = dict(state)
        self._state = state  # after the last batch handed out
        self._planned = state  # after the last batch submitted
        self._pending: collections.deque = collections.deque()
        self._closed = False
        self._pool = (concurrent.futures.ThreadPoolExecutor(cfg.num_workers, "piccolo-data")
                      if cfg.num_workers else None)
        self.packing: packing.PackingSpec | None = None  # set by enable_packing
        self.packing_fallbacks = 0  # batches handed out padded because they did not fit the packed shapes
        self._handed_out = 0
        if not tokenizer.char_bound_holds:
            self.warnings.append(f"{tokenizer.source}: token counts cannot be bounded from characters; "
                                 "padding every batch to the max lengths")

    def enable_packing(self, shards: int, num_chunks: int) -> str:
        """Pack every batch for `shards` batch shards and `num_chunks` gradient-caching chunks (see
        piccolo_jax.data.packing); only before the first batch. Returns the log line of the packed shapes.

        The rows per block are the most that the token bounds of any block of the first batches of the run
        need (at most 64 batches, 500,000 texts read), plus 5 %: the same on every host and at every resume.
        """
        if self._pending or self._state != self._planned or self._handed_out:
            raise RuntimeError("Loader.enable_packing must come before the first batch")
        cfg, b = self.cfg, self.cfg.global_batch_size
        k = max(cfg.negatives_for(s.task) for s in self.sources)  # the most documents per row of any task
        blocks = shards * num_chunks
        if shards % self.process_count or b % blocks:
            raise ValueError(f"packing: global_batch_size {b} over {shards} shards x {num_chunks} chunks on "
                             f"{self.process_count} process(es) does not split into equal blocks")
        state, rq, rd = self.sampler.initial_state(), 1, 1
        for _ in range(max(1, min(packing.SAMPLE_STEPS, packing.SAMPLE_TEXTS // (b * (2 + k))))):
            plan, state = self.sampler.plan(state)
            texts = batch_texts(plan, self.sources[plan.dataset], cfg, plan.record_ids)
            q, d = packing_bounds(texts, cfg, self.tokenizer)
            need_q, need_d = packing.rows_needed(q, d, blocks, cfg.query_max_length, cfg.passage_max_length)
            rq, rd = max(rq, need_q), max(rd, need_d)
        m = b // blocks
        self.packing = packing.PackingSpec(shards, num_chunks, packing.with_headroom(rq, m), cfg.query_max_length,
                                           packing.with_headroom(rd, m * (1 + k)), cfg.passage_max_length)
        return self.packing.describe(b, k)

    def restore(self, state: Mapping) -> None:
        """Continue after the batch described by `state` (from `state()`); only before the first batch."""
        if self._pending or self._state != self._planned:
            raise RuntimeError("Loader.restore must come before the first batch")
        self.sampler.check_state(state)
        self._state = self._planned = dict(state)

    def first_batch_of_each_task(self, limit: int = 10_000) -> dict[str, dict]:
        """The next batch of each task type the run trains on (of the active datasets), built ahead without
        moving the loader (`state()` and the batches handed out stay as they are), so that the train step of
        each can be compiled before the first step. Looks at most `limit` batches ahead (planning is
        integers only; one batch per task type is built); a task type not met by then is left out."""
        tasks = {self.sources[i].task for i in self.sampler.active}
        state, plans = dict(self._state), {}
        for _ in range(limit):
            plan, state = self.sampler.plan(state)
            plans.setdefault(self.sources[plan.dataset].task, plan)
            if len(plans) == len(tasks):
                break
        return {task: self._build(plan) for task, plan in plans.items()}

    def summary(self) -> str:
        """One line for the console: how many datasets and records, by task type (the rest: summary_lines)."""
        report = [r for r in self.report().values() if not r["excluded"]]
        tasks: dict[str, int] = {}
        for r in report:
            tasks[r["task"]] = tasks.get(r["task"], 0) + 1
        kinds = ", ".join(f"{t} {n}" for t, n in tasks.items()) if len(tasks) > 1 else next(iter(tasks), "")
        return (f"data: {len(report)} dataset(s), {sum(r['records'] for r in report):,} records ({kinds})"
                + (", packed" if self.packing is not None else ""))

    # -- reporting -------------------------------------------------------------------------------
    def report(self) -> dict:
        """Per dataset: task type, records, batches per pass, exclusion reason, negatives shortfall (K of
        its task), bad records."""
        out = {}
        for i, s in enumerate(self.sources):
            k = self.cfg.negatives_for(s.task)
            without, fewer = s.negatives_shortfall(k) if k else (0, 0)
            out[s.name] = {
                "path": s.path, "task": s.task, "negatives": k, "records": len(s),
                "batches_per_epoch": self.sampler.batches_per_epoch[i],
                # records each pass leaves out (a different random set every pass)
                "left_per_epoch": len(s) % self.cfg.global_batch_size if s.name not in self.sampler.excluded
                else len(s),
                "excluded": self.sampler.excluded.get(s.name),
                "records_without_negatives": without, "records_with_repeated_negatives": fewer,
                "bad_records": sum(s.bad_records.values()), "bad_examples": list(s.bad_messages),
            }
        return out

    def summary_lines(self) -> list[str]:
        """The report as log lines."""
        lines = []
        for name, r in self.report().items():
            k = r["negatives"]
            line = (f"dataset {name}: {r['task']}, {r['records']} records, {r['batches_per_epoch']} batches per "
                    f"pass, {r['left_per_epoch']} records left out of each pass")
            if r["excluded"]:
                line += f", EXCLUDED ({r['excluded']})"
            if r["records_without_negatives"]:
                line += f", {r['records_without_negatives']} records without negatives get K={k} random ones"
            if r["records_with_repeated_negatives"]:
                line += f", {r['records_with_repeated_negatives']} records with fewer than K={k} repeat theirs"
            if r["bad_records"]:
                line += f", {r['bad_records']} bad records skipped"
            lines.append(line)
        return lines

    def metrics(self) -> dict[str, float]:
        """Flat numbers for the metrics log: bad records per dataset and in total."""
        bad = {f"data/bad_records/{s.name}": float(sum(s.bad_records.values())) for s in self.sources}
        out = {**bad, "data/bad_records_total": float(sum(bad.values())), "data/step": float(self._state["step"])}
        if self.packing is not None:
            out["data/packing_fallbacks"] = float(self.packing_fallbacks)
        return out

    # -- iteration -------------------------------------------------------------------------------
    def state(self) -> dict:
        """JSON-serialisable position after the last batch returned; pass to make_loader(state=...)."""
        return dict(self._state)

    def _build(self, plan):
        return build_host_batch(plan, self.sources[plan.dataset], self.cfg, self.tokenizer,
                                self.process_index, self.process_count, self.packing)

    def _submit(self) -> None:
        plan, self._planned = self.sampler.plan(self._planned)
        after = self._planned
        if self._pool is None:
            self._pending.append((plan, after))
        else:
            self._pending.append((self._pool.submit(self._build, plan), after))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._closed:
            raise StopIteration
        while len(self._pending) < max(1, self.cfg.prefetch if self._pool else 1):
            self._submit()
        job, after = self._pending.popleft()
        batch = job.result() if self._pool is not None else self._build(job)
        self._state, self._handed_out = after, self._handed_out + 1
        if batch.get("packing", {}).get("fallback"):
            self.packing_fallbacks += 1
        return batch

    def close(self) -> None:
        """Stop the workers and drop prefetched batches (the state is unaffected)."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_loader(cfg: DataConfig, tokenizer: Tokenizer, process_index: int = 0, process_count: int = 1,
                state: Mapping | None = None) -> Loader:
    """Open the datasets of `cfg` and return a Loader for this host.

    process_index / process_count: this host's position (jax.process_index(), jax.process_count());
    each host gets global rows [process_index*b, (process_index+1)*b), b = global_batch_size / count.
    state: a dict from `Loader.state()`; the loader continues with the batch after it.

    Each batch (a dict, all arrays int32, every row from one dataset):
        query_input_ids, query_attention_mask        [b, Tq]
        passage_input_ids, passage_attention_mask    [b, Tp]
        negative_input_ids, negative_attention_mask  [b, K, Tp]   only when K > 0 (K: cfg.negatives_for(task))
        labels                                       [b] float32  sts datasets (scored pairs)
        teacher_scores, has_teacher                  [b, 1 + K] float32, [b] int32   retrieval with K > 0
        record_index                                 [b]          rows of the dataset (for debugging)
        step, dataset_index, dataset_name, task      Python int / int / str / str (the dataset's task type)
    Tq and Tp are the same on every host for a given step (decided from the whole global batch),
    multiples of cfg.pad_multiple or the max lengths. After `loader.enable_packing(shards, chunks)` batches
    come packed (`packing.pack_host_batch`), or padded as above when they do not fit the packed shapes.
    """
    sources = open_sources(cfg.paths, cfg.record_format, cfg.skip_bad_records, cfg.max_record_bytes,
                           columns={n: dict(m) for n, m in cfg.columns})
    return Loader(cfg, tokenizer, sources, process_index, process_count, state)


