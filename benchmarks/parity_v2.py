"""Parity of piccolo v2's losses and Dense head with their public references: one table of measured differences.

Each row is one equality that a test asserts (tests/test_task_losses.py, test_matryoshka.py,
test_hybrid_step.py, test_dense_head.py), measured on the tests' own inputs and references (imported from
the test modules, which import cleanly: their references are sentence-transformers 6 losses with torch
float64 autograd, float64 numpy / torch formulas of piccolo v2 and FlagEmbedding, SentenceTransformer.encode,
a single device):

1. CoSENT vs sentence-transformers ``CoSENTLoss(scale=1/tau)`` (and piccolo v2's pairwise formula in numpy);
2. classification contrast (own negatives) vs piccolo v2's ``ClsContrastLoss`` formula (numpy value,
   torch float64 gradients);
3. distillation KL vs sentence-transformers ``DistillKLDivLoss`` (ours x tau^2, its rescaling) and vs
   FlagEmbedding's kl_div formula up to the teacher entropy (ours + H(teacher));
4. the Matryoshka wrapper vs sentence-transformers ``MatryoshkaLoss`` over MNRL (in-batch, hard negatives,
   GTE's four directions), CoSENT and DistillKLDivLoss, dims (24, 12, 6), weights (1, 0.5, 0.25);
5. the hybrid train step (mesh data=8, zero1, gradient caching in 2 chunks, dropout on, Dense head 32 -> 48)
   vs jax.value_and_grad of the task loss on the encoder output on one device, one batch per task type;
6. the Dense head: convert hf2jax -> jax2hf bit-exact (every tensor, 2_Dense included) and re-import
   bit-exact; SentenceTransformer(dir).encode vs Encoder.encode (import, export) and at a Matryoshka dim
   (truncate_dim) vs Encoder.encode(dim=).

Gradients are with respect to the raw (unnormalised) embeddings, as the tests take them. "8 dev" rows run
the same jitted function with every input's batch axis split over 8 simulated devices (the project's
mesh, ``sharding.batch_sharding``) and compare it with the same outside reference; the tests prove these
by transitivity (8 devices = 1 device to rtol 1e-5 / atol 1e-6, 1 device = reference), so the reference's
tolerance is printed for them, and the "8 dev vs 1 dev" rows give the direct difference.

Columns: max |diff| over all entries; rel = max |diff| / max |reference|; the test's tolerance
(numpy assert_allclose: |ours - ref| <= atol + rtol |ref| entrywise; "atol a x max|ref|" scales by the
largest reference entry of each tensor); used = the largest entrywise |diff| / allowed (< 1 passes).

    python benchmarks/parity_v2.py        # about 1 to 3 minutes on 2 CPU cores; float32, matmuls "highest"
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

ROWS: list[tuple[str, ...]] = []
WORST = [0.0]


def record(name: str, reference: str, got, want, rtol: float, atol: float = 0.0, atol_of_max: float = 0.0,
           tol: str | None = None) -> None:
    """One row: got / want are arrays or lists of arrays (compared tensor by tensor)."""
    pairs = list(zip(got, want)) if isinstance(got, (list, tuple)) else [(got, want)]
    diff = rel_den = used = 0.0
    for g, w in pairs:
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, (name, g.shape, w.shape)
        d = np.abs(g - w)
        allowed = atol + atol_of_max * np.max(np.abs(w)) + rtol * np.abs(w)
        diff, rel_den = max(diff, float(d.max())), max(rel_den, float(np.abs(w).max()))
        ratio = np.where(d == 0, 0.0, np.divide(d, allowed, out=np.full_like(d, np.inf), where=allowed > 0))
        used = max(used, float(ratio.max()))
    if tol is None:
        parts = [f"rtol {_e(rtol)}"] if rtol else []
        if atol_of_max:
            parts.append(f"atol {_e(atol_of_max)} x max|ref|" + (f" + {_e(atol)}" if atol else ""))
        elif atol:
            parts.append(f"atol {_e(atol)}")
        tol = ", ".join(parts) or "exact"
    WORST[0] = max(WORST[0], used)
    ROWS.append((name, reference, f"{diff:.2e}", f"{diff / rel_den:.1e}" if rel_den else "-", tol,
                 f"{used:.3f}" if np.isfinite(used) else "inf"))


def _e(x: float) -> str:
    """1e-05 -> 1e-5: a tolerance as the tests write it."""
    return f"{x:.0e}".replace("e-0", "e-")


def record_grads(name, reference, got, want):
    """Gradients as tests/test_task_losses.assert_grads_close: rtol 1e-4, atol 1e-4 x max|ref| + 1e-9."""
    record(name, reference, list(got), list(want), rtol=1e-4, atol=1e-9, atol_of_max=1e-4)


def on_devices(fn, args, argnums, n: int, has_aux: bool = False):
    """jit(value_and_grad(fn)) with every argument on device 0 (n=1) or its batch axis over the 8-device mesh."""
    from piccolo_jax.parallel.sharding import MeshConfig, batch_sharding, make_mesh

    vg = jax.jit(jax.value_and_grad(fn, argnums, has_aux=has_aux))
    if n == 1:
        placed = jax.device_put(args, jax.devices()[0])
    else:
        mesh = make_mesh(MeshConfig(data=n))
        placed = tuple(jax.device_put(a, batch_sharding(mesh, np.ndim(a))) for a in args)
    value, grads = vg(*placed)
    assert all(len(g.sharding.device_set) == n for g in grads), "gradients not on the expected devices"
    loss = value[0] if has_aux else value
    return float(loss), [np.asarray(g) for g in grads]


def both(name, reference, fn, args, argnums, want, want_grads, value_tol: dict, scale: float = 1.0,
         has_aux=False, pick=lambda g: g):
    """Rows for 1 and 8 devices against the reference, and 8 devices against 1 device (the sharded test)."""
    runs = {}
    for n in (1, 8):
        loss, grads = on_devices(fn, args, argnums, n, has_aux)
        runs[n] = (loss, grads)
        record(f"{name}: value, {n} dev", reference, scale * loss, want, **value_tol)
        record_grads(f"{name}: grad, {n} dev", reference, [scale * g for g in pick(grads)], want_grads)
    record(f"{name}: value, 8 dev vs 1 dev", "ours on 1 device", runs[8][0], runs[1][0], rtol=1e-5, atol=1e-6)
    record(f"{name}: grad, 8 dev vs 1 dev", "ours on 1 device", runs[8][1], runs[1][1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- 1-3: task losses
def task_losses_rows():
    import test_task_losses as tl

    from piccolo_jax.losses.task_losses import (
        cosent_loss,
        distill_kl_loss,
        own_negatives_loss,
    )

    norm = tl.normalise
    # 1. CoSENT: test_cosent_matches_sentence_transformers_values_and_grads's inputs (B = 24, D = 32, ties)
    tau = 0.05
    a, b, _ = tl.raw_embeddings(24, 0, dim=32, seed=3)
    labels = tl.sts_labels(24, seed=4, ties=True)
    want, want_grads = tl.st_cosent(a, b, labels, tau)
    fn = lambda a, b, l: cosent_loss(norm(a), norm(b), l, tau)[0]  # noqa: E731
    both("cosent tau .05", "ST CoSENTLoss(scale=20)", fn, (a, b, labels), (0, 1), want, want_grads,
         dict(rtol=tl.RTOL, atol=4e-7 / tau))
    record("cosent tau .05: value, 1 dev", "numpy piccolo v2 pairs", on_devices(fn, (a, b, labels), (0, 1), 1)[0],
           tl.ref_cosent(a, b, labels, tau), rtol=tl.RTOL, atol=4e-7 / tau)

    # 2. own negatives: B = 16 (8 devices x 2 rows), K = 7, as test_own_negatives_matches_numpy_and_torch
    q, p, negs = tl.raw_embeddings(16, 7, seed=11)
    want, _ = tl.ref_own_negatives(q, p, negs, tau)
    _, want_grads = tl.torch_own_negatives(q, p, negs, tau)
    fn = lambda q, p, n: own_negatives_loss(norm(q), norm(p), norm(n), tau)[0]  # noqa: E731
    both("own negatives tau .05", "numpy / torch ClsContrast", fn, (q, p, negs), (0, 1, 2), want, want_grads,
         dict(rtol=tl.RTOL, atol=4e-7 / tau))

    # 3. distillation: B = 16, K = 3, D = 32; ST rescales by tau^2
    for tau, teacher_tau in ((0.05, 1.0), (0.02, 0.5)):
        q, p, negs = tl.raw_embeddings(16, 3, dim=32, seed=15)
        scores = tl.teacher_scores(16, 3, seed=16)
        want, want_grads = tl.st_distill(q, p, negs, scores, tau, teacher_tau)
        fn = lambda q, p, n, s: distill_kl_loss(norm(q), norm(p), norm(n), s, tau,  # noqa: E731
                                                teacher_temperature=teacher_tau)[0]
        both(f"distill KL tau {tau:g}/{teacher_tau:g} x tau^2", "ST DistillKLDivLoss", fn, (q, p, negs, scores),
             (0, 1, 2), want, want_grads, dict(rtol=tl.RTOL, atol=1e-7), scale=tau ** 2)
    tau = 0.02  # BGE's temperature, teacher temperature 1
    q, p, negs = tl.raw_embeddings(16, 4, seed=17)
    scores = tl.teacher_scores(16, 4, seed=18)
    want, entropy, want_grads = tl.flag_embedding_kl_div(q, p, negs, scores, tau)
    fn = lambda q, p, n, s: distill_kl_loss(norm(q), norm(p), norm(n), s, tau)[0]  # noqa: E731
    for n in (1, 8):
        loss, grads = on_devices(fn, (q, p, negs, scores), (0, 1, 2), n)
        record(f"distill KL tau .02 + H(teacher): value, {n} dev", "FlagEmbedding kl_div formula", loss + entropy,
               want, rtol=tl.RTOL, atol=2e-7 / tau)
        record_grads(f"distill KL tau .02: grad, {n} dev", "FlagEmbedding kl_div formula", grads, want_grads)


# ------------------------------------------------------------------------------------------- 4: Matryoshka
def matryoshka_rows():
    import test_matryoshka as tm

    from piccolo_jax.losses.contrastive import (
        gte_loss,
        hard_negative_loss,
        in_batch_softmax_loss,
    )
    from piccolo_jax.losses.matryoshka import matryoshka, matryoshka_loss
    from piccolo_jax.losses.task_losses import cosent_loss, distill_kl_loss

    st_losses, torch = tm.st_losses, tm.torch
    weights = [1.0, 0.5, 0.25]
    tau = 0.05
    gte_dirs = dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
                    partition_mode="joint")
    cases = [("in-batch", 0, {}, lambda q, p, n: in_batch_softmax_loss(q, p, tau, block_size=4)),
             ("hard negatives", 2, {}, lambda q, p, n: hard_negative_loss(q, p, n, tau, block_size=4)),
             ("GTE 4 directions", 2, gte_dirs, lambda q, p, n: gte_loss(q, p, n, tau, block_size=4))]
    for label, num_negs, kwargs, loss_fn in cases:  # B = 16 (8 devices x 2 rows), D = 24, dims 24 / 12 / 6
        q, p, negs = tm.raw(16, num_negs, seed=1)
        make = lambda m, kw=kwargs: st_losses.MultipleNegativesRankingLoss(m, scale=1.0 / tau, **kw)  # noqa: E731
        want, want_grads = tm.st_matryoshka(make, [q, p] + [negs[:, k] for k in range(num_negs)], None, weights)
        wrapped = matryoshka(loss_fn, tm.DIMS, weights)
        if num_negs:
            args, fn = (q, p, negs), (lambda q, p, n, w=wrapped: w(q, p, n)[0])
            pick = lambda g, k=num_negs: [g[0], g[1]] + [g[2][:, j] for j in range(k)]  # noqa: E731
        else:
            args, fn, pick = (q, p), (lambda q, p, w=wrapped: w(q, p, None)[0]), (lambda g: g)
        name = f"matryoshka MNRL {label}"
        if label.startswith("GTE"):  # the sharded case of test_matryoshka
            both(name, "ST MatryoshkaLoss(MNRL)", fn, args, tuple(range(len(args))), want, want_grads,
                 dict(rtol=tm.RTOL, atol=tm.ATOL), pick=pick)
            continue
        loss, grads = on_devices(fn, args, tuple(range(len(args))), 1)
        record(f"{name}: value, 1 dev", "ST MatryoshkaLoss(MNRL)", loss, want, rtol=tm.RTOL, atol=tm.ATOL)
        record_grads(f"{name}: grad, 1 dev", "ST MatryoshkaLoss(MNRL)", pick(grads), want_grads)

    a, b, _ = tm.raw(16, 0, seed=2)
    labels = np.random.default_rng(3).integers(0, 6, size=16).astype(np.float32)
    want, want_grads = tm.st_matryoshka(lambda m: st_losses.CoSENTLoss(m), [a, b], torch.tensor(np.float64(labels)),
                                        weights)
    fn = lambda a, b, l: matryoshka_loss(lambda x, y: cosent_loss(x, y, l, 0.05), (a, b), tm.DIMS,  # noqa: E731
                                         weights)[0]
    both("matryoshka CoSENT", "ST MatryoshkaLoss(CoSENT)", fn, (a, b, labels), (0, 1), want, want_grads,
         dict(rtol=tm.RTOL, atol=1e-5))

    q, p, negs = tm.raw(16, 3, seed=4)
    scores = np.random.default_rng(5).normal(size=(16, 4)).astype(np.float32) * 3
    make = lambda m: st_losses.DistillKLDivLoss(m, temperature=tau)  # noqa: E731
    want, want_grads = tm.st_matryoshka(make, [q, p] + [negs[:, k] for k in range(3)],
                                        torch.tensor(np.float64(scores)), weights)
    fn = lambda q, p, n, s: matryoshka_loss(  # noqa: E731
        lambda q, p, n: distill_kl_loss(q, p, n, s, tau, teacher_temperature=tau), (q, p, n), tm.DIMS, weights)[0]
    loss, grads = on_devices(fn, (q, p, negs, scores), (0, 1, 2), 1)
    record("matryoshka distill x tau^2: value, 1 dev", "ST MatryoshkaLoss(DistillKL)", tau ** 2 * loss, want,
           rtol=tm.RTOL, atol=1e-8)
    record_grads("matryoshka distill x tau^2: grad, 1 dev", "ST MatryoshkaLoss(DistillKL)",
                 [tau ** 2 * g for g in [grads[0], grads[1]] + [grads[2][:, k] for k in range(3)]], want_grads)


# ------------------------------------------------------------------------------------------- 5: hybrid step
def hybrid_rows():
    import test_hybrid_step as th

    from piccolo_jax.parallel.sharding import (
        MeshConfig,
        host_local_to_global,
        make_mesh,
    )
    from piccolo_jax.training.optim import make_optimizer
    from piccolo_jax.training.state import create_train_state
    from piccolo_jax.training.step import LossConfig, make_train_step

    reference = "value_and_grad of the task loss, 1 dev"
    mesh = make_mesh(MeshConfig(data=8, strategy="zero1"))
    loss_cfg = LossConfig(**{**th.LOSS.__dict__, "num_chunks": 2})
    optimizer = make_optimizer(th.OPT, total_steps=10)
    step = make_train_step(th.CFG, loss_cfg, optimizer, mesh, "zero1")
    for task in ("sts", "classification", "retrieval"):
        arrays = host_local_to_global(th.make_batch(task), mesh)
        state = create_train_state(th.CFG, optimizer, mesh, "zero1", jax.random.key(0), params=th.host_params())
        new_state, metrics = step.lower(state, arrays, th.STEP_KEY, task=task).compile(th.FAST)(
            state, arrays, th.STEP_KEY)
        ref_loss, ref_grads = th.reference(task, False)
        name = f"hybrid step {task} (8 dev, 2 chunks)"
        record(f"{name}: loss", reference, float(metrics["loss"]), ref_loss, rtol=th.RTOL)
        norm = float(np.sqrt(sum(np.sum(g ** 2) for g in jax.tree.leaves(ref_grads))))
        record(f"{name}: grad norm", reference, float(metrics["grad_norm"]), norm, rtol=th.RTOL)
        mu = dict(jax.tree_util.tree_flatten_with_path(jax.tree.map(np.asarray, th.adam_mu(new_state.opt_state)))[0])
        flat = jax.tree_util.tree_flatten_with_path(ref_grads)[0]
        g_max = max(np.abs(g).max() for _, g in flat)
        # per tensor: atol 3e-6 x max|tensor| + 1e-9 x max|all grads| (test_hybrid_step's bound)
        got = [mu[path] / (1 - th.OPT.b1) for path, _ in flat]
        want = [g for _, g in flat]
        diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
        used = max(float(np.max(np.abs(g - w) / (th.RTOL * np.abs(w) + th.GRAD_ATOL_TENSOR * np.abs(w).max()
                                                 + th.GRAD_ATOL_GLOBAL * g_max))) for g, w in zip(got, want))
        WORST[0] = max(WORST[0], used)
        ROWS.append((f"{name}: grads ({len(flat)} tensors)", reference, f"{diff:.2e}", f"{diff / g_max:.1e}",
                     "rtol 1e-5, atol 3e-6 x max|tensor| + 1e-9 x max|grads|", f"{used:.3f}"))


# ------------------------------------------------------------------------------------------- 6: Dense head
def dense_rows():
    import contextlib
    import io

    import test_dense_head as td
    from safetensors.numpy import load_file
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the "Loading weights" / "Writing model shards" bars

    from piccolo_jax.commands.convert import main as convert_main
    from piccolo_jax.hf import load_hf_model, read_hf_tensors
    from piccolo_jax.inference.encoder import Encoder
    from piccolo_jax.model.directory import load_model_dir

    st, torch, texts = td.st, td.torch, td.TEXTS
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = td._st_dir(tmp, "v2")  # tiny BERT 32 -> mean Pooling -> Dense(32 -> 48, visible bias), .bin, no Normalize
        with contextlib.redirect_stdout(io.StringIO()):
            assert convert_main(["hf2jax", str(src), str(tmp / "jax")]) == 0
            assert convert_main(["jax2hf", str(tmp / "jax"), str(tmp / "hf")]) == 0
        a, b = read_hf_tensors(src), read_hf_tensors(tmp / "hf")
        a.pop("embeddings.position_ids", None)
        assert set(a) == set(b), sorted(set(a) ^ set(b))
        a.update({f"2_Dense/{k}": v.numpy() for k, v in torch.load(src / "2_Dense" / "pytorch_model.bin").items()})
        b.update({f"2_Dense/{k}": v for k, v in load_file(str(tmp / "hf" / "2_Dense" / "model.safetensors")).items()})
        assert all(a[k].dtype == b[k].dtype for k in a)
        record(f"convert hf2jax -> jax2hf ({len(a)} tensors, 2_Dense incl.)", "the source HF/ST dir",
               [b[k] for k in sorted(a)], [a[k] for k in sorted(a)], rtol=0.0, tol="bit-exact")
        _, ours = load_model_dir(tmp / "jax")
        _, again, _ = load_hf_model(tmp / "hf")
        leaves = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]  # noqa: E731
        assert jax.tree.structure(ours) == jax.tree.structure(again)
        record(f"re-import of the export ({len(leaves(ours))} params)", "our model dir (hf2jax)",
               leaves(again), leaves(ours), rtol=0.0, tol="bit-exact")

        ref_src = td._st_encode(src, texts)
        enc = Encoder.load(src)
        for packing in (True, False):
            enc.packing = packing
            record(f"Encoder.load(ST dir).encode, {'packed' if packing else 'padded'}", "ST(source).encode",
                   enc.encode(texts, normalize=False), ref_src, rtol=0.0, atol=1e-5)
        ref_hf = td._st_encode(tmp / "hf", texts)
        record("ST(export).encode", "ST(source).encode", ref_hf, ref_src, rtol=0.0, atol=1e-6)
        exported = Encoder.load(tmp / "jax")
        record("Encoder.load(model dir).encode", "ST(export).encode", exported.encode(texts, normalize=False),
               ref_hf, rtol=0.0, atol=1e-5)
        record("Encoder.encode normalised", "ST(export).encode(normalize_embeddings)", exported.encode(texts),
               st.SentenceTransformer(str(tmp / "hf"), device="cpu").encode(texts, normalize_embeddings=True),
               rtol=0.0, atol=1e-5)
        for dim in (8, 24):
            ref = st.SentenceTransformer(str(tmp / "hf"), device="cpu", truncate_dim=dim).encode(
                texts, normalize_embeddings=True)
            record(f"Encoder.encode(dim={dim})", f"ST(export, truncate_dim={dim})", exported.encode(texts, dim=dim),
                   ref, rtol=0.0, atol=1e-5)


def main() -> int:
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    print(common.environment_line())
    timings = []
    for section in (task_losses_rows, matryoshka_rows, hybrid_rows, dense_rows):
        t0 = time.perf_counter()
        section()
        timings.append(f"{section.__name__[:-5]} {time.perf_counter() - t0:.0f} s")
    print("\npiccolo v2 parity: float32 ours vs references (float64 where torch / numpy)\n")
    table = [("name", "reference", "max |diff|", "rel", "tolerance in the test", "used")] + ROWS
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for k, row in enumerate(table):
        print(" | ".join(c.rjust(w) if 2 <= i <= 3 or i == 5 else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if k == 0:
            print("-+-".join("-" * w for w in widths))
    print(f"\n{len(ROWS)} equalities; largest fraction of a test tolerance used: {WORST[0]:.3f}; "
          f"time: {', '.join(timings)}")
    return 0 if WORST[0] <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
