"""Exact top-k similarity search over a device mesh, and hard-negative mining for finetuning.

`top_k_search` is memory-bounded: the corpus embeddings are split over the batch devices (device i holds
rows [i * R, (i + 1) * R), R = corpus rows per device), each device scans its rows in blocks of
`corpus_block` keeping a running top-k per query, and one all-gather of the n x k per-device winners
gives the global top-k. Queries go through in blocks of `query_block` rows, replicated on every device.
Per device and step the score block is query_block x corpus_block float32
(1,024 x 16,384 x 4 B = 64 MiB by default), whatever the corpus size.

`mine_negatives` encodes queries and a corpus, searches the top `window[1]` passages of every query and
samples hard negatives from ranks [window[0], window[1]) (0-based: window (10, 100) skips the ten nearest
passages and draws from the next ninety), never taking a positive of the query or the query itself.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from piccolo_jax.inference.encoder import QUERY_PREFIX
from piccolo_jax.parallel import gather, sharding


# ---------------------------------------------------------------------------------------- top-k search
@functools.lru_cache(maxsize=32)
def _search_fn(mesh, n_corpus: int, blocks: int, block: int, k: int):
    """Jitted (q_qd replicated, c_rd batch-sharded) -> (scores_qk, indices_qk), both replicated.

    Cached per (mesh, sizes): a trainer's periodic evaluations search the same corpus with one program."""
    axes = sharding.BATCH_AXES
    k_block = min(k, block)

    def local(q_qd, c_rd):  # runs on one device: all queries x its own corpus rows
        base = lax.axis_index(axes) * (blocks * block)  # first global corpus row of this device
        c_bcd = c_rd.reshape(blocks, block, c_rd.shape[-1])

        def step(carry, xs):
            best_v_qk, best_i_qk = carry
            c_cd, b = xs
            s_qc = jnp.einsum("qd,cd->qc", q_qd, c_cd, precision=lax.Precision.HIGHEST,
                              preferred_element_type=jnp.float32)
            rows_c = base + b * block + jnp.arange(block, dtype=jnp.int32)
            s_qc = jnp.where(rows_c[None, :] < n_corpus, s_qc, -jnp.inf)  # padding rows never win
            v_qk, j_qk = lax.top_k(s_qc, k_block)
            # merge: running winners first, so equal scores keep the lower corpus index
            all_v = jnp.concatenate([best_v_qk, v_qk], axis=1)
            all_i = jnp.concatenate([best_i_qk, rows_c[j_qk]], axis=1)
            top_v, pos = lax.top_k(all_v, k)
            return (top_v, jnp.take_along_axis(all_i, pos, axis=1)), None

        nq = q_qd.shape[0]
        init = (jnp.full((nq, k), -jnp.inf, jnp.float32), jnp.full((nq, k), -1, jnp.int32))
        init = lax.pcast(init, axes, to="varying")  # the carry differs per device
        (v_qk, i_qk), _ = lax.scan(step, init, (c_bcd, jnp.arange(blocks, dtype=jnp.int32)))
        return v_qk, i_qk

    rows, rep = sharding.batch_sharding(mesh, 2), sharding.replicated(mesh)
    cols = jax.sharding.PartitionSpec(None, rows.spec[0])  # per-device winners side by side: [Q, n x k]
    per_device = jax.shard_map(local, mesh=mesh, in_specs=(rep.spec, rows.spec), out_specs=(cols, cols))

    def search(q_qd, c_rd):
        v_qm, i_qm = per_device(q_qd, c_rd)  # n devices x k winners, in corpus order
        top_v, pos = lax.top_k(v_qm, k)
        return top_v, jnp.take_along_axis(i_qm, pos, axis=1)

    return jax.jit(search, in_shardings=(rep, rows), out_shardings=(rep, rep))


def top_k_search(queries_qd: np.ndarray, corpus_cd: np.ndarray, k: int, *, mesh=None, query_block: int = 1024,
                 corpus_block: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products: (scores [Q, k] float32, corpus indices [Q, k] int64), best first.

    For L2-normalised embeddings the inner product is the cosine similarity. `corpus_cd` may be a
    numpy memmap: each device's rows are read straight into its shard. Equal scores rank the lower
    corpus index first.

    Over a mesh that spans processes every process passes the same queries and corpus, supplies the
    corpus rows of its own devices, and receives the same (replicated) result; each device scans the
    rows it scans in one process over the same devices, so the lists are identical.
    """
    from piccolo_jax.inference.encoder import default_mesh

    queries_qd, n_c = np.asarray(queries_qd), len(corpus_cd)
    if queries_qd.ndim != 2 or np.ndim(corpus_cd) != 2 or queries_qd.shape[1] != corpus_cd.shape[1]:
        raise ValueError(f"queries {queries_qd.shape} and corpus {np.shape(corpus_cd)} must be [N, D] with "
                         "the same D")
    if not 1 <= k <= n_c:
        raise ValueError(f"k={k} must be between 1 and the corpus size {n_c}")
    mesh = default_mesh("dp") if mesh is None else sharding.adopt_mesh(mesh)  # our axis names, or one line
    n_dev, dim = sharding.data_parallel_size(mesh), corpus_cd.shape[1]
    per_device = -(-n_c // n_dev)
    block = min(corpus_block, -(-per_device // 8) * 8)
    blocks = -(-per_device // block)
    rows_per_device = blocks * block  # corpus padded to n_dev x blocks x block rows

    def shard(index) -> np.ndarray:  # rows of one device, zero-padded past the corpus end
        start, stop = index[0].start or 0, index[0].stop or n_dev * rows_per_device
        out = np.zeros((stop - start, dim), dtype=np.float32)
        real = max(0, min(stop, n_c) - start)
        out[:real] = np.asarray(corpus_cd[start:start + real], dtype=np.float32)
        return out

    rows = sharding.batch_sharding(mesh, 2)
    c_rd = jax.make_array_from_callback((n_dev * rows_per_device, dim), rows, shard)
    fn = _search_fn(mesh, n_c, blocks, block, k)
    me = jax.process_index()
    spans = any(d.process_index != me for d in mesh.devices.flat)  # every process passes the same queries
    n_q = len(queries_qd)
    q_block = min(query_block, max(8, -(-n_q // 8) * 8))
    scores, indices = np.zeros((n_q, k), np.float32), np.zeros((n_q, k), np.int64)
    pending = []
    for start in range(0, n_q, q_block):
        q = np.zeros((q_block, dim), np.float32)
        q[:min(q_block, n_q - start)] = queries_qd[start:start + q_block]
        q = gather.to_global(q, sharding.replicated(mesh)) if spans else q
        pending.append((start, fn(q, c_rd)))  # dispatched asynchronously
        if len(pending) > 2:
            _collect(pending.pop(0), scores, indices)
    for item in pending:
        _collect(item, scores, indices)
    return scores, indices


def _collect(item, scores: np.ndarray, indices: np.ndarray) -> None:
    start, (v, i) = item
    n = min(len(v), len(scores) - start)
    scores[start:start + n] = np.asarray(v)[:n]
    indices[start:start + n] = np.asarray(i)[:n]


# ------------------------------------------------------------------------------------- negative sampling
def sample_negatives(ranked_qk: np.ndarray, excluded: Sequence[set[int]], window: tuple[int, int], num: int,
                     seed: int = 0) -> list[list[int]]:
    """Per query, `num` corpus indices drawn uniformly without replacement from ranks [lo, hi).

    Ranks are 0-based positions in `ranked_qk[q]` (best first); indices in `excluded[q]` (positives,
    the query itself) are never drawn. Fewer are returned when the window has too few candidates.
    Query q's draw depends only on (seed, q), so the result does not depend on batching.
    """
    lo, hi = window
    if not 0 <= lo < hi:
        raise ValueError(f"window {window}: need 0 <= start < end")
    if hi > ranked_qk.shape[1]:
        raise ValueError(f"window end {hi} is past the {ranked_qk.shape[1]} ranks searched")
    out = []
    for q, ranked in enumerate(ranked_qk):
        candidates = [int(j) for j in ranked[lo:hi] if j >= 0 and int(j) not in excluded[q]]
        rng = np.random.default_rng([seed, q])
        picked = rng.choice(len(candidates), size=min(num, len(candidates)), replace=False)
        out.append([candidates[p] for p in sorted(picked)])  # kept in rank order
    return out


@dataclasses.dataclass
class MiningStats:
    queries: int = 0
    rows_written: int = 0
    corpus_size: int = 0
    corpus_duplicates_removed: int = 0
    rows_short_of_negatives: int = 0  # fewer than requested (window too small after exclusions)
    rows_without_negatives: int = 0


def dedupe(texts: Sequence[str]) -> tuple[list[str], int]:
    """Texts in first-seen order without repeats, and how many repeats were removed."""
    seen: dict[str, None] = dict.fromkeys(texts)
    return list(seen), len(texts) - len(seen)


def mine_negatives(encoder: Any, records: Sequence[Any], corpus_texts: Sequence[str] | None = None, *,
                   window: tuple[int, int] = (10, 100), num_negatives: int = 7, seed: int = 0,
                   instructions: bool = True, query_max_length: int | None = None,
                   passage_max_length: int | None = None, batch_size: int | None = None,
                   tokens_per_batch: int | None = None, mesh=None,
                   show_progress: bool = False) -> tuple[list[tuple[Any, list[str]]], MiningStats]:
    """Hard negatives for each record (`piccolo_jax.data.records.Record`: query, positives, prompt).

    The corpus defaults to every distinct positive and negative of `records`. Queries are encoded with
    the record's prompt, else the encoder's query prefix (`Encoder.query_prefix`: the model's prompt or
    piccolo's "查询: "; piccolo's for an encoder without one), passages with kind "passage" (the
    encoder's passage prefix); no prefixes when `instructions` is False. Excluded from a record's negatives: the query text itself and every
    positive of every record with the same query text. With `show_progress` the two passes show bars
    labelled "encode queries" and "encode corpus". Returns [(record, negative texts)] in input order, and
    statistics.
    """
    stats = MiningStats(queries=len(records))
    if corpus_texts is None:
        corpus_texts = [t for r in records for t in (*r.positives, *r.negatives)]
    corpus, stats.corpus_duplicates_removed = dedupe(corpus_texts)
    stats.corpus_size = len(corpus)
    if window[1] > len(corpus):
        raise ValueError(f"window end {window[1]} exceeds the corpus size {len(corpus)}")
    position = {t: i for i, t in enumerate(corpus)}
    query_prefix = getattr(encoder, "query_prefix", QUERY_PREFIX)
    q_texts = [((r.prompt or query_prefix) if instructions else "") + r.query for r in records]
    common = {"batch_size": batch_size, "tokens_per_batch": tokens_per_batch}
    q_qd = encoder.encode(q_texts, kind=None, max_length=query_max_length,
                          show_progress=show_progress and "encode queries", **common)
    c_cd = encoder.encode(corpus, kind="passage" if instructions else None, max_length=passage_max_length,
                          show_progress=show_progress and "encode corpus", **common)
    _, ranked_qk = top_k_search(q_qd, c_cd, window[1], mesh=mesh)
    positives_of: dict[str, set[str]] = {}  # every positive of a query text, over all its records
    for r in records:
        positives_of.setdefault(r.query, set()).update(r.positives)
    excluded = [{position[t] for t in (*positives_of[r.query], r.query) if t in position} for r in records]
    picked = sample_negatives(ranked_qk, excluded, window, num_negatives, seed)
    out = []
    for record, negs in zip(records, picked):
        stats.rows_short_of_negatives += len(negs) < num_negatives
        stats.rows_without_negatives += not negs
        out.append((record, [corpus[j] for j in negs]))
    return out, stats


def rows_for_output(mined: Sequence[tuple[Any, list[str]]], fmt: str = "uniem") -> list[dict]:
    """JSON rows: "uniem" {"text", "text_pos", "text_neg": [...]} (one row per positive) or
    "bge" {"query", "pos", "neg", "prompt"?}."""
    rows = []
    for record, negs in mined:
        if fmt == "bge":
            row = {"query": record.query, "pos": list(record.positives), "neg": negs}
            if record.prompt:
                row["prompt"] = record.prompt
            rows.append(row)
        elif fmt == "uniem":
            if record.prompt:
                raise ValueError(f"record {record.query[:30]!r} has a prompt, which the uniem format cannot "
                                 "carry; write --format bge")
            rows.extend({"text": record.query, "text_pos": p, "text_neg": negs} for p in record.positives)
        else:
            raise ValueError(f"format {fmt!r}; expected 'uniem' or 'bge'")
    return rows

