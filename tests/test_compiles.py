"""A run compiles a small, fixed set of programs: one train step per shape, and evaluations that reuse
their encoder and search programs (counted from JAX's own compile log, through the CLI)."""

from __future__ import annotations

import collections
import re
import subprocess

from trainer_cli import ROOT, cmd, env

EVAL = ROOT / "assets" / "eval" / "retrieval"


def test_twenty_steps_with_two_evaluations_compile_few_programs(tmp_path):
    run_env = dict(env(), JAX_LOG_COMPILES="1", JAX_COMPILATION_CACHE_DIR="")
    r = subprocess.run(cmd(tmp_path / "w", "run.steps=20", f'run.eval_path="{EVAL}"', "run.eval_every=10",
                           "run.log_every=5", 'run.compilation_cache=""'),  # no cache: every compile is seen
                       cwd=ROOT, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=600)  # one stream, unbuffered: JAX's compile log interleaved with ours
    out = r.stdout
    assert r.returncode == 0, out[-3000:]
    names = re.findall(r"Compiling jit\(([^)]*)\)", out)
    counts = collections.Counter(names)
    assert counts["step"] == 1, counts  # tiny.toml pads each side to one shape: one train-step program
    assert counts["search"] == 1, counts  # the second evaluation reuses the first one's search
    # The second evaluation (steps 11-20 end) compiles nothing: no compile between the two eval lines.
    between = out[out.index("step 10 eval:"):out.index("step 20 eval:")]
    assert "Compiling jit(" not in between, between[-3000:]
    assert len(names) <= 16, counts


def test_runs_of_other_lengths_and_learning_rates_load_the_step_from_the_cache(tmp_path):
    """The schedule's numbers are data of the step: a run of another length, peak lr and warmup compiles
    nothing (every program it needs is in the cache the first run filled), reads the step's traced
    program instead of tracing it (program_cache), and still follows its own schedule (its logged lr
    values are optax's for its settings, not the first run's)."""
    import json

    import optax

    cache = tmp_path / "xla"
    run_env = dict(env(), JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

    def train(workdir, *sets):
        r = subprocess.run(cmd(workdir, *sets, "data.packing=false"), cwd=ROOT, env=run_env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout + r.stderr + (workdir / "train.log").read_text(encoding="utf-8")  # + the details

    def stored():
        return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())

    first = train(tmp_path / "a", "run.steps=3", "optim.lr=1e-3", "optim.warmup_steps=1")
    entries = stored()
    assert "train step for retrieval batches: traced; kept in" in first
    assert any(e.startswith("programs/") for e in entries) and len(entries) > 1, entries
    second = train(tmp_path / "b", "run.steps=7", "optim.lr=3e-3", "optim.warmup_steps=2")
    assert stored() == entries  # nothing new compiled or traced
    assert f"train step for retrieval batches: traced program read from {cache / 'programs'}" in second
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    logged = {m["step"]: m["lr"] for m in rows if "lr" in m}
    schedule = optax.join_schedules([optax.linear_schedule(0.0, 3e-3, 2), optax.linear_schedule(3e-3, 0.0, 5)], [2])
    assert sorted(logged) == list(range(1, 8))
    for step, lr in logged.items():  # the metric is the rate the update of that step used: schedule(step - 1)
        assert abs(lr - float(schedule(step - 1))) <= 3e-3 * 2.0 ** -20, (step, lr, float(schedule(step - 1)))


def test_configure_sets_the_cache_and_keeps_custom_partitioning_out_of_its_key(tmp_path, monkeypatch):
    """Fused attention partitions through custom_partitioning, whose Python function pointer JAX puts into
    the cache key unless told not to: a restarted multi-device GPU run would never hit the cache. (No GPU
    here to lower cuDNN attention on several devices, so the setting itself is what is checked.)"""
    import jax

    from piccolo_jax.config.train import RunConfig
    from piccolo_jax.parallel import runtime

    names = ("jax_compilation_cache_dir", "jax_remove_custom_partitioning_ptr_from_cache_key")
    saved = {n: getattr(jax.config, n) for n in names}
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path))
    try:
        notes = runtime.configure(RunConfig())
        assert jax.config.jax_remove_custom_partitioning_ptr_from_cache_key is True
        assert jax.config.jax_compilation_cache_dir == str(tmp_path)
        assert any(str(tmp_path) in n for n in notes)
    finally:
        for n, v in saved.items():
            jax.config.update(n, v)
