"""The training loop: check, resume, step, log, checkpoint, export — and end in a state a rerun continues.

Restart semantics: the checkpoint of step s holds the state after s updates and the loader position
after batch s; the dropout key of step s is fold_in(key(seed), s). A restarted run therefore repeats
exactly the computation an uninterrupted run would have done. How each start and each ending behaves
(rerun, extend, stop, fail) is `piccolo_jax.io.run_dir`'s table.

Order of a start: everything the config names is checked (`preflight`) before the work directory is
created or anything compiles; then the directory is locked, its state read, and only then is the model
built. SIGINT / SIGTERM are caught from the first line on: the loop stops after the step in flight (all
processes of a multi-host run after the same step), saves it, and returns; during the export, the
export is finished first.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from piccolo_jax.config import TrainConfig
from piccolo_jax.data import packing
from piccolo_jax.data.batching import task_arrays
from piccolo_jax.io.run_dir import (
    EXIT_USAGE,
    RunError,
    UsageError,
    WorkdirLock,
    clean_temporaries,
    export_step,
    last_checkpoint_note,
    run_state,
)
from piccolo_jax.io.storage import ObjectText, as_path, check_bucket, is_url
from piccolo_jax.losses import hybrid
from piccolo_jax.model.bert import count_params
from piccolo_jax.parallel import sharding
from piccolo_jax.parallel.runtime import configure
from piccolo_jax.training import memory
from piccolo_jax.training import compiling
from piccolo_jax.training.checkpoint import Checkpointer, abstract_like, error_reason
from piccolo_jax.training.export import write_export
from piccolo_jax.training.flops import step_flops
from piccolo_jax.training.metrics_log import MetricsLog
from piccolo_jax.training.optim import LearningRate, make_optimizer
from piccolo_jax.training.preflight import Preflight, preflight
from piccolo_jax.training.program_cache import ProgramCache, step_description, wrap_step
from piccolo_jax.training.progress import (
    CONSOLE_ONLY,
    FILE_ONLY,
    EarlyRecords,
    ProgressBar,
    RunLogHandler,
    console,
    console_handler,
)
from piccolo_jax.training.state import TrainState, create_train_state, missing_subtrees
from piccolo_jax.training.step import STOP_KEY, make_train_step

log = logging.getLogger("piccolo_jax")


class StopRequested:
    """SIGTERM / SIGINT set a flag; the loop stops at the next step boundary. A second Ctrl-C exits now (130).

    Python runs a signal handler only when the main thread returns to the interpreter: not during an XLA
    compile (tens of seconds) or a long device call. So the signals also wake a watcher thread (through
    `signal.set_wakeup_fd`, written by the C-level handler the moment the signal arrives), which
    acknowledges the first at once and ends the process on the second with `os._exit(130)`: no exception
    is raised into whatever the main thread runs (a KeyboardInterrupt inside a gc callback is swallowed;
    interpreter shutdown under XLA's threads can crash). A second Ctrl-C loses what the last checkpoint
    does not hold, as kill -9 does; the rerun resumes from it.
    """

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}
        self._pipe: tuple[int, int] | None = None
        self._previous_fd = -1
        self._received = 0  # SIGINT / SIGTERM seen by the watcher

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._pipe = (read_fd, write_fd)
        threading.Thread(target=self._watch, args=(read_fd,), name="piccolo-stop-watcher", daemon=True).start()
        return self

    def _handle(self, signum, _frame):
        """Main thread, whenever it gets back to Python (installing a Python handler is also what makes the
        C-level handler write the wakeup fd). The flag, should the watcher not have set it yet (or never:
        something replaced the wakeup fd); only the watcher counts signals, so this never makes a first
        Ctrl-C look like a second."""
        if self.signal is None:
            self.signal = signum

    def _watch(self, read_fd: int) -> None:
        while True:
            try:
                received = os.read(read_fd, 64)
            except OSError:
                received = b""
            if not received:  # the write end closed: __exit__
                os.close(read_fd)
                return
            for signum in received:
                if signum not in (signal.SIGINT, signal.SIGTERM):
                    continue
                self._received += 1
                if self._received == 1:
                    if self.signal is None:
                        self.signal = signum
                    log.info("%s received: stopping after the step in flight and saving it (after the compile "
                             "in progress, if any); press Ctrl-C again to quit now without saving",
                             signal.Signals(signum).name)
                elif signum == signal.SIGINT:
                    log.warning("interrupted (second Ctrl-C): quitting now without saving; rerun the same "
                                "command to resume from the latest checkpoint")
                    for handler in log.handlers:
                        handler.flush()
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(130)

    def __exit__(self, *exc):
        signal.set_wakeup_fd(self._previous_fd)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._pipe is not None:
            os.close(self._pipe[1])  # the watcher reads end-of-file, closes its end and returns
            self._pipe = None

    def __bool__(self) -> bool:
        return self.signal is not None


def setup_logging(workdir: Path | None) -> logging.Handler | None:
    """Console (above the progress bar) on every process; WORKDIR/train.log on process 0 (returned)."""
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not log.handlers:
        handler = console_handler()
        handler.setFormatter(fmt)
        log.addHandler(handler)
    if workdir is None or jax.process_index() != 0:
        return None
    file_handler = RunLogHandler(workdir / "train.log")
    file_handler.setFormatter(fmt)
    log.addHandler(file_handler)
    # Orbax reports failures of its background threads through absl's logger with full tracebacks; they
    # go to train.log, and the run reports the failure in one line of its own.
    absl = logging.getLogger("absl")
    absl.addHandler(file_handler)
    absl.propagate = False
    return file_handler


def _agree(code: int, what: str) -> None:
    """Multi-host: raise on every process when any process failed a check (each prints its own reason)."""
    if jax.process_count() == 1:
        return
    codes = np.asarray(multihost_utils.process_allgather(np.int32(code)))
    if code == 0 and codes.any():
        bad = [int(i) for i in np.flatnonzero(codes)]
        raise RunError(f"process(es) {bad} failed {what} (see their output); this process stops too",
                       int(codes.max()))


def train(cfg: TrainConfig, workdir: str | Path) -> dict:
    """Run, resume, extend or finish the run in `workdir`; returns the last logged metrics.

    Raises RunError (UsageError for bad configuration or input) with a one-line message; every way out
    leaves the directory resumable by the same call.
    """
    workdir = as_path(workdir)
    with StopRequested() as stop, contextlib.ExitStack() as cleanup:
        setup_logging(None)
        early = EarlyRecords()  # what the checks log before train.log exists goes there once it does
        log.addHandler(early)
        cleanup.callback(log.removeHandler, early)
        runtime_notes = configure(cfg.run)
        if is_url(workdir):
            try:
                check_bucket(str(workdir), "--workdir")
            except ValueError as e:
                raise UsageError(str(e)) from None
        pre: Preflight | None = None
        try:
            mesh = sharding.make_mesh(cfg.parallel)
        except ValueError as e:
            raise UsageError(f"parallel: {e}") from None
        code, error = 0, None
        try:
            pre = preflight(cfg, workdir, jax.process_index(), jax.process_count(),
                            sharding.data_parallel_size(mesh))
            cleanup.callback(pre.loader.close)
        except RunError as e:
            code, error = e.code, e
        _agree(code, "the checks of the configuration and data")
        if error is not None:
            _append_to_existing_log(workdir, error)
            raise error
        cfg = pre.cfg

        workdir.mkdir(parents=True, exist_ok=True)
        lock_code, lock_error = 0, None
        if jax.process_index() == 0:
            lock = WorkdirLock(workdir)
            try:
                lock.acquire()
                cleanup.callback(lock.release)
            except RunError as e:
                lock_code, lock_error = e.code, e
        _agree(lock_code, "to lock the work directory")
        if lock_error is not None:
            raise lock_error
        file_handler = setup_logging(workdir)
        log.removeHandler(early)
        if file_handler is not None:
            cleanup.callback(_remove_handler, file_handler)
            early.replay(file_handler)
        try:
            pre.details[:0] = runtime_notes  # compilation cache, precision: train.log
            try:
                return _run(cfg, workdir, mesh, pre, stop, cleanup)
            except OSError as e:  # a file of the run that cannot be written: one line, not a traceback
                raise RunError(f"{error_reason(e)} (in {workdir}); {last_checkpoint_note(workdir)}") from None
        except RunError as e:
            if file_handler is not None:
                _to_file(file_handler, e)
            raise


def _append_to_existing_log(workdir: Path, error: RunError) -> None:
    """A start refused before it touched anything: its reason still goes to the run's train.log."""
    if jax.process_index() != 0 or not (workdir / "train.log").is_file():
        return
    try:
        text = ObjectText(workdir / "train.log")
        text.write(f"{time.strftime('%H:%M:%S')} ERROR start refused: {error}\n")
        text.close()
    except OSError:
        pass


def _remove_handler(handler: logging.Handler) -> None:
    for logger in (log, logging.getLogger("absl")):
        logger.removeHandler(handler)
    handler.close()


def _to_file(handler: logging.Handler, e: RunError) -> None:
    """An error for train.log only (the command prints it on the console)."""
    handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (e,), None))


def _run(cfg: TrainConfig, workdir: Path, mesh, pre: Preflight, stop: StopRequested,
         cleanup: contextlib.ExitStack) -> dict:
    is_main = jax.process_index() == 0
    removed = clean_temporaries(workdir) if is_main else []
    for line in pre.warnings:
        log.warning("%s", line)
    for line in pre.notes:
        log.info("%s", line)
    for line in pre.details:
        log.info("%s", line, extra=FILE_ONLY)
    if removed:
        log.info("removed what an interrupted export left behind: %s", ", ".join(removed))

    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.run.keep_checkpoints)
    cleanup.callback(ckpt.close)
    latest, exported = ckpt.latest_step(), export_step(workdir)
    state_name = run_state(latest, exported, cfg.run.steps)
    if state_name == "beyond":
        raise UsageError(f"{workdir} is trained to step {latest}, beyond run.steps={cfg.run.steps}; raise "
                         "run.steps to continue it, or use another --workdir", EXIT_USAGE)
    if state_name == "complete":
        log.info("run complete: step %d of %d, exported in %s; nothing to do (raise run.steps to continue)",
                 latest, cfg.run.steps, workdir / "export")
        return {"step": latest, "state": "complete"}
    if is_main:
        as_path(workdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False) + "\n",
                                             encoding="utf-8")

    model_cfg = cfg.model
    optimizer = make_optimizer(cfg.optim, cfg.run.steps)
    schedule = LearningRate(cfg.optim, cfg.run.steps)
    base_key = jax.random.key(cfg.run.seed)
    init_key = jax.random.fold_in(base_key, 2**31 - 1)  # disjoint from the dropout keys fold_in(base, step)
    strategy = cfg.parallel.strategy
    state = create_train_state(model_cfg, optimizer, mesh, strategy, init_key, params=pre.init_params)
    init_note, start = pre.init_note, 0
    if pre.init_params is not None and missing_subtrees(model_cfg, pre.init_params):
        init_note += (f"; it has no Dense head: Dense {model_cfg.hidden_size} -> {model_cfg.dense_out_features} "
                      "initialised at random")
    restored = ckpt.restore_latest(abstract_like(state))
    if restored is not None:
        start, state, loader_state = restored
        try:
            pre.loader.restore(loader_state)
        except ValueError as e:
            raise UsageError(f"{ckpt.directory}/{start}: {e}") from None
        init_note = f"resumed from {ckpt.directory}/{start}"
    _log_header(cfg, mesh, state, init_note, start, workdir, _task_types(pre))

    last: dict = {"step": start}
    t_begin = time.perf_counter()
    if start < cfg.run.steps:
        programs = ProgramCache.for_run(cfg)
        with compiling.quiet_compile_alarms():  # XLA's "Very slow compile?" block: not on the console
            _check_memory(cfg, mesh, optimizer, schedule, _task_types(pre), programs)
            state, last = _loop(cfg, workdir, mesh, pre, state, ckpt, stop, start, base_key, optimizer, schedule,
                                programs)
    step = last["step"]
    if stop or step < cfg.run.steps:
        where = f"checkpoint {ckpt.directory}/{step}" if step else "nothing to save yet"
        log.info("stopped on request (signal %s) after step %d; %s; rerun the same command to continue",
                 stop.signal, step, where)
        return {**last, "state": "stopped"}

    log.info("exporting step %d to %s", step, workdir / "export")
    t0 = time.perf_counter()
    try:
        write_export(workdir, cfg, state.params, step, card={
            "datasets": pre.loader.report(), "evaluation": last, "seconds": time.perf_counter() - t_begin,
            "devices": f"{mesh.devices.size} x {mesh.devices.flat[0].platform}, {jax.process_count()} process(es)"})
    except OSError as e:
        raise RunError(f"writing the export to {workdir / 'export'} failed: {error_reason(e)}; the checkpoint "
                       f"of step {step} is kept: rerun the same command to write the export") from None
    if stop:
        log.info("received signal %d during the export; it was finished first", stop.signal)
    log.info("finished: step %d of %d, %d skipped step(s), export %s (%.1f s): model/ (ours), hf/ "
             "(transformers / sentence-transformers)", step, cfg.run.steps, int(state.skipped),
             workdir / "export", time.perf_counter() - t0,
             extra=console(f"finished: step {step} of {cfg.run.steps}, exported to {workdir / 'export'}"))
    return {**last, "state": "complete"}


def _check_memory(cfg: TrainConfig, mesh, optimizer, schedule, tasks: tuple[str, ...],
                  programs: ProgramCache | None = None) -> None:
    """Compile the step at the largest shapes the loader can produce and refuse (exit 2) a config whose
    per-device peak does not fit the device, naming the loss.num_chunks that does (piccolo_jax.training.memory)."""
    limit = int(cfg.run.memory_limit_gib * memory.GiB) or memory.device_memory_limit()
    if limit is None:
        log.info("%s", memory.FitReport(cfg.loss.num_chunks, None, None, {}).line(), extra=FILE_ONLY)
        return
    d, b = cfg.data, cfg.data.global_batch_size
    k = max(d.negatives_for(t) for t in tasks)  # the widest batch of the run's task types
    batch = memory.abstract_batch(mesh, b, d.query_max_length, d.passage_max_length, k)
    if jax.process_count() > 1:  # the loop's batches carry the stop flags: compile that very program
        batch[STOP_KEY] = jax.ShapeDtypeStruct((b,), np.int32, sharding=sharding.batch_sharding(mesh, 1))
    peak_for = memory.train_step_peak_for(cfg.model, cfg.loss, optimizer, mesh, cfg.parallel.strategy, batch,
                                          schedule, programs)
    candidates = memory.chunk_candidates(b, sharding.data_parallel_size(mesh), cfg.loss.num_chunks)
    try:
        report = memory.fit_num_chunks(peak_for, cfg.loss.num_chunks, candidates, limit)
    except memory.NotEnoughMemory as e:
        raise UsageError(str(e)) from None
    log.info("%s", report.line())


def _step_arrays(host_batch: dict, b: int, processes: int, stop: bool) -> dict:
    """A host batch as the step takes it (packed or padded, the task's arrays; multi-host: the stop flags)."""
    arrays = {**packing.step_arrays(host_batch), **task_arrays(host_batch)}
    if processes > 1:
        arrays[STOP_KEY] = np.full(b // processes, int(stop), np.int32)
    return arrays


def _compile_ahead(step_fn, loader, state, mesh, key, lr_values, bar: ProgressBar, to_arrays) -> set[str]:
    """Compile the step for every task type of the run before the first step, at once (training.compiling);
    returns the task types compiled."""
    bar.status("compiling the train step")
    batches = {task: sharding.host_local_to_global(to_arrays(host_batch), mesh)
               for task, host_batch in loader.first_batch_of_each_task().items()}
    if not batches:
        return set()
    cached = "then cached" if jax.config.jax_compilation_cache_dir else "not cached: run.compilation_cache is off"
    what = "" if len(batches) == 1 else f" for {len(batches)} task types"
    log.info("compiling the train step for %s batches, %d at a time (first time: up to a few minutes; %s) ...",
             ", ".join(batches), min(len(batches), compiling.compile_workers()), cached,
             extra=console(f"compiling the train step{what} (first time: up to a few minutes; {cached}) ..."))
    seconds = compiling.compile_ahead(step_fn, state, batches, key, lr_values)
    log.info("train step ready in %.0f s", seconds)
    bar.status(f"compiled in {seconds:.0f} s")
    return set(batches)


def _task_types(pre: Preflight) -> tuple[str, ...]:
    """The task types of the run's datasets, in piccolo_jax.losses.hybrid.TASKS order."""
    present = {s.task for s in pre.loader.sources}
    return tuple(t for t in hybrid.TASKS if t in present) or ("retrieval",)


def _log_header(cfg: TrainConfig, mesh, state: TrainState, init_note: str, start: int, workdir: Path,
                tasks: tuple[str, ...] = ("retrieval",)) -> None:
    """The run's set-up: in full to train.log, in four short lines to the console."""
    b, dp = cfg.data.global_batch_size, sharding.data_parallel_size(mesh)
    chunks, model_cfg = cfg.loss.num_chunks, cfg.model
    processes = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
    mesh_shape = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
    losses = f"loss {cfg.loss.kind}" if len(tasks) == 1 else f"{len(tasks)} task types ({', '.join(tasks)})"
    for line, short in (
        (f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
         f"{jax.process_count()} process(es), this is process {jax.process_index()}",
         f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}{processes}; mesh {mesh_shape}, "
         f"{cfg.parallel.strategy}"),
        (sharding.describe(mesh, cfg.parallel.strategy), None),
        (f"stage {cfg.stage}: loss {cfg.loss.kind} (temperature {cfg.loss.temperature}), global batch {b} "
         f"= {dp} data shards x {b // dp} rows; gradient caching {chunks} chunk(s) of {b // chunks} rows "
         f"({b // (dp * chunks)} per device per chunk)",
         f"stage {cfg.stage}: {losses}, global batch {b} in {chunks} chunk(s)"),
        (f"model: {model_cfg.num_hidden_layers} layers x {model_cfg.hidden_size}, "
         f"{count_params(state.params):,} parameters, compute {model_cfg.compute_dtype}, remat {model_cfg.remat}; "
         f"{init_note}",
         f"model: {model_cfg.num_hidden_layers} layers x {model_cfg.hidden_size}, {count_params(state.params):,} "
         f"parameters, {model_cfg.compute_dtype}; {init_note}"),
        (f"steps {start} -> {cfg.run.steps}; workdir {workdir}",
         f"steps {start} -> {cfg.run.steps} in {workdir} (details: train.log)"),
        (hybrid.describe(cfg.loss, tasks) + (f"; embedding width {model_cfg.embedding_dim} (Dense head "
                                             f"{model_cfg.hidden_size} -> {model_cfg.dense_out_features})"
                                             if model_cfg.dense_out_features else ""), None),
    ):
        log.info("%s", line, extra=FILE_ONLY if short is None else console(short))


def _loop(cfg: TrainConfig, workdir: Path, mesh, pre: Preflight, state: TrainState, ckpt: Checkpointer,
          stop: StopRequested, start: int, base_key, optimizer, schedule,
          programs: ProgramCache | None = None) -> tuple[TrainState, dict]:
    """Steps start+1 .. run.steps, or until a stop; saves the last step done. Returns (state, last metrics)."""
    model_cfg, b, chunks = cfg.model, cfg.data.global_batch_size, cfg.loss.num_chunks
    is_main, processes = jax.process_index() == 0, jax.process_count()
    step_fn = wrap_step(make_train_step(model_cfg, cfg.loss, optimizer, mesh, cfg.parallel.strategy, schedule),
                        programs, sharding.replicated(mesh),
                        step_description(model_cfg, cfg.loss, cfg.parallel.strategy))
    lr_values = jnp.asarray(schedule.values)  # data, not constants: one program for any lr / warmup / steps
    loader = pre.loader
    for line, report in zip(loader.summary_lines(), loader.report().values()):
        log.info("%s", line, extra={} if report["excluded"] else FILE_ONLY)  # excluded: on the console too
    if cfg.data.packing:
        from piccolo_jax.model.attention import describe_attention

        log.info("%s", loader.enable_packing(sharding.data_parallel_size(mesh), chunks), extra=FILE_ONLY)
        log.info("%s", describe_attention(model_cfg, training=True, packed=True), extra=FILE_ONLY)
    log.info("%s", loader.summary(), extra=CONSOLE_ONLY)
    metrics_log = MetricsLog(workdir, enabled=is_main, start=start)
    bar = ProgressBar(cfg.run.steps, start, enabled=is_main and cfg.run.progress_bar)
    evaluator = Evaluator(cfg, pre.tokenizer, mesh) if cfg.run.eval_path else None
    step = start
    last: dict = {"step": step}
    watch = _StepWatch(cfg.run.max_consecutive_skipped, int(state.skipped))
    by_task: dict[str, dict] = {}
    window: collections.Counter = collections.Counter()  # dataset -> steps since the last metrics line
    fallbacks_told = None  # the fallback count the log last stated (None: not yet)
    try:
        ahead = _compile_ahead(step_fn, loader, state, mesh, jax.random.fold_in(base_key, start), lr_values, bar,
                               lambda hb: _step_arrays(hb, b, processes, False))
        t_last, examples, tokens, flops, computed = time.perf_counter(), 0, 0, 0.0, 0
        while step < cfg.run.steps:
            if processes == 1 and stop:  # one process: stop at once; many: when all agree (below)
                break
            host_batch = next(loader)
            arrays = _step_arrays(host_batch, b, processes, bool(stop))
            task = host_batch.get("task", "retrieval")
            window[host_batch.get("dataset_name", "")] += 1
            if task not in by_task and task not in ahead:
                log.info("compiling the train step for %s batches (the first such step takes longer) ...", task)
            state, metrics = step_fn(state, sharding.host_local_to_global(arrays, mesh),
                                     jax.random.fold_in(base_key, step), task=task, lr_values=lr_values)
            by_task[task] = metrics  # each task type's latest metrics (device arrays: no wait here)
            step += 1
            agreed_stop = watch.check(step, metrics)  # reads the previous step's flags: no stall
            examples += b
            n_tok, n_computed = packing.token_counts(host_batch)
            tokens, computed = tokens + n_tok * processes, computed + n_computed * processes
            flops += step_flops(model_cfg, host_batch, processes, chunks)
            if step % cfg.run.log_every == 0 or step == cfg.run.steps:
                metrics = _with_other_tasks(metrics, by_task, task)
                dt = time.perf_counter() - t_last
                last = {"step": step, **metrics, "examples_per_s": examples / dt, "tokens_per_s": tokens / dt,
                        "gflops_per_s": flops / dt / 1e9, **loader.metrics(),
                        # the dataset of this step (whose loss the line shows), and of each step of the window
                        "dataset": host_batch.get("dataset_name", ""), "window_datasets": dict(window)}
                if cfg.data.packing:  # real tokens / computed tokens over the steps since the last line
                    last["packing_efficiency"] = tokens / max(computed, 1)
                    # a line of its own on the first window, the last step and when a batch fell back
                    if (fallbacks_told is None or loader.packing_fallbacks != fallbacks_told
                            or step == cfg.run.steps):
                        log.info("step %d packing: %.0f%% of the computed tokens are real; %d batch(es) padded "
                                 "instead (did not fit the packed shapes)", step,
                                 100 * last["packing_efficiency"], loader.packing_fallbacks,
                                 extra=console(f"step {step} packing: {last['packing_efficiency']:.0%} real tokens, "
                                               f"{loader.packing_fallbacks} batch(es) padded instead"))
                        fallbacks_told = loader.packing_fallbacks
                metrics_log.write(step, last)
                bar.update(step, last, first_window=t_last == 0.0 or step <= start + cfg.run.log_every,
                           dataset=last["dataset"])
                t_last, examples, tokens, flops, computed = time.perf_counter(), 0, 0, 0.0, 0
                window.clear()
            last["step"] = step
            if evaluator is not None and (step == cfg.run.steps or (
                    cfg.run.eval_every and step % cfg.run.eval_every == 0)):
                scores = evaluator(state.params)
                metrics_log.write(step, {"step": step, **scores})
                log.info("step %d eval: %s", step, "  ".join(f"{k}={v:.4f}" for k, v in scores.items()))
                last.update(scores)
            if step % cfg.run.save_every == 0:
                ckpt.save(step, state, loader.state())
                metrics_log.persist()  # object storage: the metrics up to a checkpoint survive a kill
            ckpt.check()  # a save that failed in the background stops the run now, not at the next save
            if agreed_stop:
                break
        watch.finish()
        if stop:
            log.info("received signal %d: saving a checkpoint at step %d", stop.signal, step)
        if step > start:
            ckpt.save(step, state, loader.state())
        ckpt.wait()
    except jax.errors.JaxRuntimeError as e:
        if processes > 1:  # a collective failed: a peer is gone, and nothing in this process can recover
            abandon(f"process {jax.process_index()}: lost contact with another process during step {step + 1} "
                    f"({error_reason(e)}); {last_checkpoint_note(workdir)}; rerun the same command on every "
                    "process to resume")
        raise
    except OSError as e:
        raise RunError(f"training stopped at step {step}: {error_reason(e)}") from None
    finally:
        with contextlib.ExitStack() as closing:  # every close runs, whichever fails
            closing.callback(bar.close)
            closing.callback(metrics_log.close)
    if watch.skipped_total:
        log.warning("%d step(s) skipped in this start because the loss, gradient or update was not finite",
                    watch.skipped_total)
    return state, last


def _with_other_tasks(metrics: dict, by_task: dict[str, dict], task: str) -> dict[str, float]:
    """This step's metrics (host floats) plus, from each other task type's latest step, its "<task>/..." and
    "loss/<task>" metrics: one line reports every task type the run has met."""
    out = {}
    for other, latest in by_task.items():
        if other != task:
            out.update({k: v for k, v in latest.items() if k.startswith((f"{other}/", f"loss/{other}"))})
    out.update(metrics)
    return {k: float(v) for k, v in jax.device_get(out).items() if k != STOP_KEY}


def abandon(message: str, code: int = 1) -> None:
    """Log `message` and leave the process now. For failures after which nothing can be closed cleanly
    (a dead peer process: every collective, checkpoint barrier and shutdown would wait for it)."""
    for handler in log.handlers:  # train.log; the console gets the message on stderr below
        if isinstance(handler, RunLogHandler):
            handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (message,), None))
            handler.flush_now()
        handler.flush()
    sys.stdout.flush()
    sys.stderr.write(f"piccolo-jax train: error: {message}\n")  # as the command's other errors
    sys.stderr.flush()
    os._exit(code)


class _StepWatch:
    """Per-step flags read one step late (the step in flight keeps the device busy): the non-finite
    counter and, multi-host, the agreed stop request."""

    def __init__(self, max_consecutive: int, skipped_before: int):
        self.max_consecutive = max_consecutive
        self._pending = None  # (step, metrics) not read yet
        self._skipped_before = skipped_before  # the state's skipped counter before the first step
        self.consecutive, self.skipped_total, self.first_skipped = 0, 0, None

    def check(self, step: int, metrics: dict) -> bool:
        """Read the previous step's flags, queue this one's; True when every process asked to stop."""
        previous, self._pending = self._pending, (step, metrics)
        return False if previous is None else self._read(*previous)

    def finish(self) -> None:
        if self._pending is not None:
            self._read(*self._pending)
            self._pending = None

    def _read(self, step: int, metrics: dict) -> bool:
        flags = jax.device_get({k: metrics[k] for k in ("skipped", STOP_KEY) if k in metrics})
        skipped = int(flags["skipped"])
        if skipped > self._skipped_before:
            self.consecutive += 1
            self.skipped_total += 1
            self.first_skipped = self.first_skipped or step
            log.warning("step %d skipped: its loss, gradient or update is not finite (%d in a row)", step,
                        self.consecutive)
        else:
            self.consecutive, self.first_skipped = 0, None
        self._skipped_before = skipped
        if self.consecutive >= self.max_consecutive:
            raise RunError(f"stopping: {self.consecutive} consecutive steps ({self.first_skipped}-{step}) had a "
                           "non-finite loss, gradient or update and were skipped (run.max_consecutive_skipped); "
                           "nothing is saved or exported; lower optim.lr, raise loss.temperature or check the data")
        return bool(int(flags.get(STOP_KEY, 0)))


class Evaluator:
    """Metrics of the current parameters on `run.eval_path`; one Encoder (and its compiled functions) for
    every evaluation of the run."""

    def __init__(self, cfg: TrainConfig, tokenizer, mesh):
        self.cfg, self.tokenizer, self.mesh = cfg, tokenizer, mesh
        self.encoder = None

    def __call__(self, params: Any) -> dict[str, float]:
        from piccolo_jax.evaluation.runners import evaluate_path
        from piccolo_jax.inference.encoder import Encoder

        if self.encoder is None:
            strategy = "fsdp" if self.cfg.parallel.strategy == "fsdp" else "dp"
            self.encoder = Encoder(self.cfg.model, params, self.tokenizer, mesh=self.mesh, strategy=strategy,
                                   max_length=max(self.cfg.data.query_max_length, self.cfg.data.passage_max_length))
        else:
            self.encoder.params = jax.device_put(params, self.encoder.param_shardings)
        kind, scores = evaluate_path(self.encoder, self.cfg.run.eval_path, mesh=self.mesh)
        return {f"eval/{kind}/{k}": float(v) for k, v in scores.items() if isinstance(v, (int, float))}

