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
