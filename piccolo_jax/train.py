"""The training loop: build everything from a TrainConfig, resume, step, log, checkpoint, export.

Restart semantics: the checkpoint of step s holds the state after s updates and the loader position
after batch s; the dropout key of step s is fold_in(key(seed), s). A restarted run therefore repeats
exactly the computation an uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from piccolo_jax import sharding
from piccolo_jax.checkpoint import Checkpointer, abstract_like
from piccolo_jax.config import TrainConfig, save_config
from piccolo_jax.data.loader import make_loader
from piccolo_jax.metrics_log import MetricsLog, ProgressBar, step_flops
from piccolo_jax.model import count_params
from piccolo_jax.model_config import ModelConfig
from piccolo_jax.optim import learning_rate_schedule, make_optimizer
from piccolo_jax.params_io import is_model_dir, load_model_dir, save_model_dir
from piccolo_jax.tokenization import Tokenizer
from piccolo_jax.train_step import TrainState, create_train_state, make_train_step

log = logging.getLogger("piccolo_jax")

# Architecture fields taken from an --init checkpoint; the run's config keeps dropout / dtype / remat.
_ARCH_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id", "add_pooler",
                "pooling", "normalize")


class StopRequested:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits 0."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        if self.signal is not None and signum == signal.SIGINT:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __bool__(self) -> bool:
        return self.signal is not None


def setup_logging(workdir: Path) -> None:
    log.setLevel(logging.INFO)
    if log.handlers:
        return
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if jax.process_index() == 0:  # one train.log per run, written by process 0
        handlers.append(logging.FileHandler(workdir / "train.log"))
    for handler in handlers:
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.propagate = False


def load_init(init: str, model_cfg: ModelConfig) -> tuple[ModelConfig, Any, str]:
    """Parameters to start from: an HF directory, our model directory, or a finished run's export."""
    path = Path(init)
    if (path / "export" / "model").is_dir():  # a run directory (e.g. finetune after pretrain)
        path = path / "export" / "model"
    keep = {k: v for k, v in model_cfg.__dict__.items() if k not in _ARCH_FIELDS}
    if is_model_dir(path):
        cfg, params = load_model_dir(path, **keep)
        return cfg, params, f"piccolo-jax model {path}"
    if (path / "config.json").is_file():
        from piccolo_jax.hf import load_hf_model

        cfg, params, report = load_hf_model(path, **keep)
        return cfg, params, (f"Hugging Face model {path} (not converted: {report['ignored_head_tensors']} "
                             f"pre-training head tensors, {report['ignored_buffers']} buffers)")
    raise FileNotFoundError(f"--init {init}: not an HF directory, a piccolo-jax model directory or a run "
                            "directory with export/model")


def train(cfg: TrainConfig, workdir: str | Path) -> dict:
    """Run (or resume) training in `workdir`; returns the last logged metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    setup_logging(workdir)
    is_main = jax.process_index() == 0

    model_cfg, init_params, init_note = cfg.model, None, "random init"
    if cfg.init:
        model_cfg, init_params, init_note = load_init(cfg.init, cfg.model)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    if is_main:
        save_config(cfg, workdir / "config.json")

    mesh = sharding.make_mesh(cfg.parallel)
    strategy = cfg.parallel.strategy
    tokenizer = Tokenizer.from_dir(cfg.tokenizer)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer {cfg.tokenizer} has {tokenizer.vocab_size} tokens but the model's "
                         f"vocab_size is {model_cfg.vocab_size}")
    optimizer = make_optimizer(cfg.optim, cfg.run.steps)
    schedule = learning_rate_schedule(cfg.optim, cfg.run.steps)
    step_fn = make_train_step(model_cfg, cfg.loss, optimizer, mesh, strategy, schedule)

    base_key = jax.random.key(cfg.run.seed)
    init_key = jax.random.fold_in(base_key, 2**31 - 1)  # disjoint from the dropout keys fold_in(base, step)
    state = create_train_state(model_cfg, optimizer, mesh, strategy, init_key, params=init_params)
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.run.keep_checkpoints)
    restored = ckpt.restore_latest(abstract_like(state))
    loader_state, start = None, 0
    if restored is not None:
        start, state, loader_state = restored
        init_note = f"resumed from {ckpt.directory}/{start}"

    b, dp = cfg.data.global_batch_size, sharding.data_parallel_size(mesh)
    chunks = cfg.loss.num_chunks
    rows_per_chunk_device = b // max(dp * chunks, 1)
    for line in (
        f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{jax.process_count()} process(es), this is process {jax.process_index()}",
        sharding.describe(mesh, strategy),
        f"stage {cfg.stage}: loss {cfg.loss.kind} (temperature {cfg.loss.temperature}), global batch {b} "
        f"= {dp} data shards x {b // dp} rows; gradient caching {chunks} chunk(s) of {b // chunks} rows "
        f"({rows_per_chunk_device} per device per chunk)",
        f"model: {model_cfg.num_hidden_layers} layers x {model_cfg.hidden_size}, "
        f"{count_params(state.params):,} parameters, compute {model_cfg.compute_dtype}, remat {model_cfg.remat}; "
        f"{init_note}",
        f"steps {start} -> {cfg.run.steps}; workdir {workdir}",
    ):
        log.info(line)
    if b % (dp * chunks):
        raise ValueError(f"data.global_batch_size={b} must be divisible by {dp} data shards x {chunks} chunks")

    loader = make_loader(cfg.data, tokenizer, jax.process_index(), jax.process_count(), state=loader_state)
    metrics_log = MetricsLog(workdir, enabled=is_main)
    bar = ProgressBar(cfg.run.steps, start, enabled=is_main and cfg.run.progress_bar)
    last: dict = {}
    t_last, examples, tokens, flops = time.perf_counter(), 0, 0, 0.0
    with StopRequested() as stop:
        step = start
        try:
            while step < cfg.run.steps and not stop:
                host_batch = next(loader)
                batch = sharding.host_local_to_global(
                    {k: v for k, v in host_batch.items() if k.endswith(("_ids", "_mask"))}, mesh)
                state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, step))
                step += 1
                examples += b
                n_tok = sum(int(v.sum()) for k, v in host_batch.items() if k.endswith("attention_mask"))
                tokens += n_tok * jax.process_count()
                flops += step_flops(model_cfg, host_batch, jax.process_count(), chunks)
                if step % cfg.run.log_every == 0 or step == cfg.run.steps:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    dt = time.perf_counter() - t_last
                    last = {"step": step, **metrics, "examples_per_s": examples / dt, "tokens_per_s": tokens / dt,
                            "gflops_per_s": flops / dt / 1e9, **loader.metrics()}
                    metrics_log.write(step, last)
                    bar.update(step, last)
                    t_last, examples, tokens, flops = time.perf_counter(), 0, 0, 0.0
                if cfg.run.eval_path and (step == cfg.run.steps or (
                        cfg.run.eval_every and step % cfg.run.eval_every == 0)):
                    scores = evaluate(cfg, state.params, tokenizer, mesh)
                    metrics_log.write(step, {"step": step, **scores})
                    log.info("step %d eval: %s", step, "  ".join(f"{k}={v:.4f}" for k, v in scores.items()))
                    last.update(scores)
                if step % cfg.run.save_every == 0 and step < cfg.run.steps:
                    ckpt.save(step, state, loader.state())
            if stop:
                log.info("received signal %d: saving a checkpoint at step %d and exiting", stop.signal, step)
            ckpt.save(step, state, loader.state(), force=True)
            ckpt.wait()
        finally:
            loader.close()
            bar.close()
            metrics_log.close()
            ckpt.close()

    if not stop and step >= cfg.run.steps:
        finish(cfg, workdir, state)
    return last


def evaluate(cfg: TrainConfig, params: Any, tokenizer: Tokenizer, mesh) -> dict[str, float]:
    """Metrics of the current parameters on `run.eval_path` (retrieval, STS or reranking layout)."""
    from piccolo_jax.evaluation import evaluate_path
    from piccolo_jax.inference import Encoder

    strategy = "fsdp" if cfg.parallel.strategy == "fsdp" else "dp"
    encoder = Encoder(cfg.model, params, tokenizer, mesh=mesh, strategy=strategy,
                      max_length=max(cfg.data.query_max_length, cfg.data.passage_max_length))
    kind, scores = evaluate_path(encoder, cfg.run.eval_path, mesh=mesh)
    return {f"eval/{kind}/{k}": float(v) for k, v in scores.items() if isinstance(v, (int, float))}


def finish(cfg: TrainConfig, workdir: Path, state: TrainState) -> None:
    """Export our model directory and (optionally) an HF + sentence-transformers directory."""
    from jax.experimental import multihost_utils

    params = jax.tree.map(np.asarray, multihost_utils.process_allgather(state.params, tiled=True))
    if jax.process_index() != 0:
        return
    export = workdir / "export"
    save_model_dir(export / "model", cfg.model, params, side_files_from=cfg.tokenizer, overwrite=True)
    log.info("exported %s", export / "model")
    if cfg.run.export_hf:
        from piccolo_jax.hf import write_hf_dir

        max_len = max(cfg.data.query_max_length, cfg.data.passage_max_length)
        write_hf_dir(export / "hf", cfg.model, params, side_files_from=cfg.tokenizer, overwrite=True,
                     max_seq_length=max_len)
        log.info("exported %s (transformers.BertModel / sentence_transformers.SentenceTransformer)",
                 export / "hf")
