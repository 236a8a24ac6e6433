"""Sentence embeddings at inference: `Encoder.load(path).encode(texts)`, sharded and packed.

How a call to `Encoder.encode` spends its compute:

1. Texts are tokenised (with the query / passage prefix for kind "query" / "passage": the model's
   sentence-transformers prompts, else piccolo's "查询: " / "结果: ") in chunks of 65,536,
   truncated to `max_length` tokens including [CLS] and [SEP].
2. Each chunk's texts are sorted by token count, longest first, and packed (`batching.plan_packed_batches`):
   a batch's rows are L = bucket(its longest text) tokens long and it has about `tokens_per_batch` tokens
   (rows x L); texts fill the rows by first fit, several short texts to a row, each attending only to
   itself (segment ids; `model.encode_packed`), so the encoder computes real tokens and a little slack
   per row. `batch_size` caps the texts of a batch, as in sentence-transformers (an upper bound; the
   token budget usually binds first).
3. Bucket lengths are 8 per octave (multiples of 8 up to 128, then of 16 up to 256, of 32 up to 512):
   512 tokens need at most 32 row lengths; a batch that ends early (the last one, or at `batch_size`)
   rounds its rows up to a power of two, so a call compiles few shapes.
4. Each batch is split over all batch devices of the mesh, a block of rows per device (parameters
   replicated, or sharded with strategy "fsdp"); results come back to the host two batches late, so
   tokenising the next batch overlaps the device work.

`Encoder.encode(texts, dim=d)` returns Matryoshka embeddings: the first d coordinates, L2-normalised
again (for a model trained with Matryoshka losses at d; the same as truncating the raw vector and
normalising). `Encoder(..., packing=False)` pads instead (one text per row, rows padded to their bucket; the same
embeddings). `embed` is the array-level function (token ids -> embeddings) for use inside other JAX
programs; `embed_fn` is it compiled with the Encoder's shardings (B a multiple of the batch shards).

A mesh of your own (`mesh=`) may have any axis types and any subset of the axes data / fsdp / tensor;
`axis_names=` maps other names onto those (`sharding.adopt_mesh`: the same device array, renamed, Auto).

Multi-process (after `jax.distributed.initialize`; the default mesh then holds every process's devices):
every process calls `encode` with the same texts. Process p of P tokenises texts p, p + P, p + 2P, ...;
the token counts (4 bytes a text) are all-gathered, so every process derives the same batch plan (the
same batch-shard count S as one process over all devices, so the same batches); each then tokenises the
other texts its own devices' rows hold (about 2N / P texts tokenised per process in all, not N). Each
process packs and runs only the blocks of its own devices (`jax.make_array_from_callback`), each device
computes exactly the block it would compute in one process over all devices, and at the end of the call
`gather.gather_rows` copies every process's rows to every process: the embeddings are bit-identical
to one process's. A mesh of this process's devices only (`mesh=`) encodes everything locally instead.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from piccolo_jax.config.data import PASSAGE_PREFIX, QUERY_PREFIX
from piccolo_jax.config.model import ModelConfig
from piccolo_jax.inference import batching
from piccolo_jax.model.bert import abstract_model, encode_packed
from piccolo_jax.model.bert import encode as model_encode
from piccolo_jax.parallel import gather, sharding
from piccolo_jax.text.tokenizer import Tokenizer

KINDS = ("query", "passage", None)  # Encoder.encode's kinds: which prefix a text gets (None: none)
# Default token budget per batch shard (padded tokens). On CPU small batches stay in cache and were
# fastest in benchmarks/bench_inference.py (1,024 beat 4,096 by ~1.3x on MiniLM); accelerators want
# large batches to fill their matmul units.
TOKENS_PER_SHARD = {"cpu": 1024}
TOKENS_PER_SHARD_ACCELERATOR = 16384
CHUNK_TEXTS = 1 << 16  # texts tokenised, sorted and bucketed at a time (bounds the host's token-id lists)


# ------------------------------------------------------------------------------------ array-level function
def truncate_embeddings(e_nd: np.ndarray, dim: int, normalize: bool = True) -> np.ndarray:
    """Matryoshka prefix of float32 embeddings [N, D]: e[:, :dim], renormalised when `normalize`
    (x / max(||x||, 1e-12), the norm in float64 then rounded, as sentence-transformers' truncate_dim +
    normalize_embeddings up to float32 rounding)."""
    head = np.ascontiguousarray(e_nd[..., :dim], dtype=np.float32)
    if not normalize:
        return head
    norm = np.linalg.norm(head.astype(np.float64), axis=-1, keepdims=True)
    return (head / np.maximum(norm, 1e-12)).astype(np.float32)


def embed(cfg: ModelConfig, params: Any, input_ids_bt: jax.Array, attention_mask_bt: jax.Array,
          normalize: bool = True) -> jax.Array:
    """Pure, jittable: token ids [B, T] + mask [B, T] -> float32 sentence embeddings [B, E] (E = the Dense
    head's width, else the hidden size D).

    Pooling follows `cfg.pooling`; `normalize` decides the L2 normalisation (whatever `cfg.normalize`
    says), so `normalize=False` gives the raw pooled vector. Pass `params` as an argument of your own
    `jax.jit` (not as a closure) so they are not baked into the program as constants.
    """
    raw_cfg = cfg.replace(normalize=False) if cfg.normalize else cfg
    e_bd = model_encode(raw_cfg, params, input_ids_bt, attention_mask_bt)["embeddings"]
    if normalize:  # torch.nn.functional.normalize: x / max(||x||, 1e-12)
        e_bd = e_bd / jnp.maximum(jnp.linalg.norm(e_bd, axis=-1, keepdims=True), 1e-12)
    return e_bd


# ------------------------------------------------------------------------------------------------ Encoder
class Encoder:
    """Sentence encoder over a device mesh. Build with `Encoder.load(path)`; call `encode(texts)`."""

    def __init__(self, cfg: ModelConfig, params: Any, tokenizer: Tokenizer, *, mesh=None,
                 axis_names: Mapping[str, str] | None = None, strategy: str = "dp", max_length: int | None = None,
                 tokens_per_batch: int | None = None, packing: bool = True,
                 query_prefix: str = QUERY_PREFIX, passage_prefix: str = PASSAGE_PREFIX):
        """Place `params` (numpy or jax arrays) on `mesh` (default: every device) with `strategy`;
        `axis_names` maps the axes of your own mesh to data / fsdp / tensor (`load` says more);
        `packing` False pads one text per row instead of packing several (the same embeddings);
        `query_prefix` / `passage_prefix`: what kind "query" / "passage" prepend (default piccolo's)."""
        mesh = _mesh(mesh, axis_names, strategy)
        self.cfg, self.mesh, self.strategy, self.tokenizer = cfg, mesh, strategy, tokenizer
        self.max_length = _check_max_length(max_length or cfg.max_position_embeddings, cfg)
        self.tokens_per_batch = tokens_per_batch
        _, abstract, logical = abstract_model(cfg)
        self.param_shardings = sharding.param_shardings(abstract, logical, mesh, strategy)
        me = jax.process_index()
        self.spans_processes = any(d.process_index != me for d in mesh.devices.flat)  # multi-process mesh
        self.params = _place(params, self.param_shardings) if self.spans_processes else \
            jax.device_put(params, self.param_shardings)
        self.num_shards = sharding.data_parallel_size(mesh)
        self.packing = packing
        for name, value in (("query_prefix", query_prefix), ("passage_prefix", passage_prefix)):
            if not isinstance(value, str):
                raise TypeError(f"{name}={value!r}: expected a string")
        self.query_prefix, self.passage_prefix = query_prefix, passage_prefix
        self._fns: dict[bool, Callable] = {}
        self._packed_fns: dict[tuple[bool, int], Callable] = {}

    @classmethod
    def load(cls, path: str | os.PathLike, *, dtype: str = "float32", strategy: str = "dp", mesh=None,
             axis_names: Mapping[str, str] | None = None, max_length: int | None = None,
             tokens_per_batch: int | None = None, query_prefix: str | None = None,
             passage_prefix: str | None = None) -> Encoder:
        """Load a Hugging Face BERT directory, a piccolo-jax model directory, a training run directory
        (its export/model, as `--init` takes it), or a Hugging Face hub id `ORG/NAME[@REVISION]` (from the
        local cache, downloaded first when online: `piccolo_jax.io.hub`).

        dtype: "float32" or "bfloat16" compute (parameters stay float32; embeddings are float32).
        strategy: "dp" replicates parameters on every device; "fsdp" shards them (large models).
        mesh: a `jax.sharding.Mesh` of your own (default: every device on the batch axis). Its axes are
            piccolo-jax's "data" / "fsdp" (the batch is split over both) and "tensor" (attention heads and
            FFN split), any subset in any order, of any axis types (Explicit ones too: the Encoder works
            on an equivalent Auto-typed mesh over the same device array, `self.mesh`).
        axis_names: maps other axis names to those, e.g. {"batch": "data", "model": "tensor"}; a mesh
            with other names and no mapping is refused with a ValueError naming its axes.
        max_length: token limit incl. [CLS]/[SEP]; default `max_seq_length` of sentence_bert_config.json,
            else the model's position count (512).
        query_prefix / passage_prefix: what kind "query" / "passage" prepend; default the model's
            sentence-transformers prompts (config_sentence_transformers.json: "query", "document"), else
            piccolo's "查询: " / "结果: " (`hf.prompts.read_prompts`).
        """
        from piccolo_jax.hf.prompts import ST_CONFIG, read_prompts
        from piccolo_jax.io.run_dir import resolve_model_dir
        from piccolo_jax.io.storage import local_copy
        from piccolo_jax.model import directory

        path = resolve_model_dir(path)  # a run directory stands for its export/model; URLs allowed
        small_files = local_copy(path, directory.TOKENIZER_FILES + ("config.json", "sentence_bert_config.json",
                                                                    ST_CONFIG))
        prompts = read_prompts(small_files) or {"query": QUERY_PREFIX, "passage": PASSAGE_PREFIX}
        mesh = _mesh(mesh, axis_names, strategy)  # refuse a mesh we cannot use before reading weights
        if directory.is_model_dir(path):
            cfg = ModelConfig.from_json_file(small_files / "config.json", compute_dtype=dtype)
            _, abstract, logical = abstract_model(cfg)  # restore straight into the final shardings
            shardings = sharding.param_shardings(abstract, logical, mesh, strategy)
            target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                  shardings)
            _, params = directory.load_model_dir(path, abstract=target, compute_dtype=dtype)
        elif (path / "config.json").is_file():
            from piccolo_jax.hf import load_hf_model

            cfg, params, _ = load_hf_model(local_copy(path), compute_dtype=dtype)
        else:
            raise FileNotFoundError(f"{path}: neither a piccolo-jax model directory (config.json + params/), "
                                    "a Hugging Face directory (config.json + weights) nor a run directory "
                                    "(export/model)")
        return cls(cfg, params, Tokenizer.from_dir(small_files), mesh=mesh, strategy=strategy,
                   max_length=max_length or _st_max_seq_length(small_files), tokens_per_batch=tokens_per_batch,
                   query_prefix=prompts["query"] if query_prefix is None else query_prefix,
                   passage_prefix=prompts["passage"] if passage_prefix is None else passage_prefix)

    def prefix(self, kind: str | None) -> str:
        """What `encode(..., kind=kind)` prepends to each text."""
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}; expected 'query', 'passage' or None")
        return {"query": self.query_prefix, "passage": self.passage_prefix, None: ""}[kind]

    @property
    def default_tokens_per_batch(self) -> int:
        """Computed tokens (rows x row length) per global batch when tokens_per_batch is not given."""
        platform = self.mesh.devices.flat[0].platform
        return TOKENS_PER_SHARD.get(platform, TOKENS_PER_SHARD_ACCELERATOR) * self.num_shards

    @property
    def dim(self) -> int:
        """Embedding width: the Dense head's output size, else the hidden size D."""
        return self.cfg.embedding_dim

    def embed_fn(self, normalize: bool = True) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
        """Compiled `(params, input_ids_bt, attention_mask_bt) -> embeddings_bd`, batch sharded.

        `jax.jit(embed)` with the Encoder's shardings: `params` as `self.param_shardings` (pass
        `self.params`), ids and mask int32 [B, T] (T <= `max_length`; `self.tokenizer.encode`) split by
        rows over the batch devices of `self.mesh`, float32 [B, E] out, L2-normalised when `normalize`,
        with the same sharding. Numpy inputs are placed by the call; jax arrays on another mesh (yours)
        are moved onto those shardings first. Cached per `normalize`; jax compiles once per (B, T).
        B must be a multiple of the batch-shard count `num_shards` (data x fsdp sizes of the mesh): other
        counts are refused with a ValueError naming both (pad with empty texts, or use `encode`).
        """
        if normalize not in self._fns:
            cfg, shards = self.cfg, self.num_shards
            rows = sharding.batch_sharding(self.mesh, 2)
            jitted = jax.jit(lambda p, ids, mask: embed(cfg, p, ids, mask, normalize),
                             in_shardings=(self.param_shardings, rows, rows), out_shardings=rows)

            def onto_rows(x_bt):  # a concrete jax array on another mesh (a user's): reshard it onto ours
                foreign = isinstance(x_bt, jax.Array) and not isinstance(x_bt, jax.core.Tracer) \
                    and x_bt.sharding != rows
                return jax.device_put(x_bt, rows) if foreign else x_bt

            def fn(params, input_ids_bt, attention_mask_bt):
                b = np.shape(input_ids_bt)[0]
                if b % shards:  # e.g. 6 rows on 8 shards: pad to -(-6 // 8) * 8 = 8 rows
                    raise ValueError(f"embed_fn: {b} rows do not split over the {shards} batch shards of the "
                                     f"mesh (data x fsdp); pass a multiple of {shards} rows (pad to "
                                     f"{-(-b // shards) * shards}) or use encode(), which takes any count")
                return jitted(params, onto_rows(input_ids_bt), onto_rows(attention_mask_bt))

            self._fns[normalize] = fn
        return self._fns[normalize]

    def packed_fn(self, num_slots: int, normalize: bool = True) -> Callable:
        """Compiled `(params, ids, positions, segments [S r, L]) -> embeddings [S, num_slots, D]` of S blocks
        of r packed rows (block s on batch shard s); cached per (normalize, num_slots)."""
        if (normalize, num_slots) not in self._packed_fns:
            cfg, s = self.cfg, self.num_shards
            rows = sharding.batch_sharding(self.mesh, 2)

            def fn(p, ids, positions, segments):
                blocks = lambda x: x.reshape(s, -1, x.shape[-1])  # noqa: E731
                return encode_packed(cfg, p, blocks(ids), blocks(positions), blocks(segments), num_slots,
                                     normalize=normalize)

            self._packed_fns[(normalize, num_slots)] = jax.jit(
                fn, in_shardings=(self.param_shardings, rows, rows, rows),
                out_shardings=sharding.batch_sharding(self.mesh, 3))
        return self._packed_fns[(normalize, num_slots)]

    def encode(self, texts: str | Sequence[str], kind: str | None = None, *, batch_size: int | None = None,
               max_length: int | None = None, normalize: bool = True, show_progress: bool | str = False,
               tokens_per_batch: int | None = None, dim: int | None = None) -> np.ndarray:
        """Embed `texts`: float32 numpy [N, D] in input order ([D] for a single string).

        kind: "query" prefixes `query_prefix`, "passage" `passage_prefix` (the model's sentence-transformers
            prompts, else piccolo's "查询: " / "结果: "; see `load`), None adds nothing.
        batch_size: at most this many texts per batch, as in sentence-transformers (None: no limit).
        tokens_per_batch: computed tokens (rows x row length) of one global batch. Default: 1,024 per
            batch shard on CPU, 16,384 on GPU / TPU (or the Encoder's `tokens_per_batch`).
        normalize: L2-normalise (False returns the raw pooled vector even if the model normalises).
        show_progress: a progress bar; a string labels it (e.g. "encode corpus").
        dim: Matryoshka truncation: the first `dim` coordinates (1 <= dim <= `self.dim`), renormalised when
            `normalize` (x[:dim] / max(||x[:dim]||, 1e-12)); [N, dim].
        """
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        prefix = self.prefix(kind)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is a {type(t).__name__}, expected str")
        max_length = _check_max_length(max_length or self.max_length, self.cfg)
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, (int, np.integer))
                                or not 1 <= dim <= self.dim):
            raise ValueError(f"dim={dim!r} must be an int in [1, {self.dim}] (the embedding width)")
        budget = tokens_per_batch or self.tokens_per_batch or self.default_tokens_per_batch
        if budget < 1:
            raise ValueError(f"tokens_per_batch={budget} must be positive")
        out_nd = np.zeros((len(texts), self.dim), dtype=np.float32)
        owners_n = np.zeros(len(texts), np.int32) if self.spans_processes else None  # process of each row
        progress = _progress(len(texts), show_progress)
        def plan(lengths_n):
            if self.packing:
                return batching.plan_packed_batches(lengths_n, budget, lambda n: batching.bucket_length(n, max_length),
                                                   self.num_shards, batch_size)
            return batching.plan_batches(lengths_n, budget, max_length, self.num_shards, batch_size)

        for start in range(0, len(texts), CHUNK_TEXTS):  # bounded host memory for the token ids
            chunk = texts[start:start + CHUNK_TEXTS]
            if self.spans_processes:
                token_ids, batches = self._tokenise_shares(chunk, max_length, prefix, plan)
            else:
                token_ids = self.tokenizer.token_ids(chunk, max_length, prefix)
                batches = plan(np.fromiter(map(len, token_ids), dtype=np.int64, count=len(token_ids)))
            if self.packing:
                for batch, e_bsd, owners in self._run(None, token_ids, batches, normalize):
                    out_nd[start + batch.texts] = e_bsd[batch.block, batch.slot]
                    if owners_n is not None:
                        owners_n[start + batch.texts] = owners[batch.block]
                    progress.update(len(batch.texts))
                continue
            for batch, e_bd, owners in self._run(self.embed_fn(normalize), token_ids, batches, normalize):
                out_nd[start + batch.rows] = e_bd[:len(batch.rows)]
                if owners_n is not None:
                    owners_n[start + batch.rows] = owners[:len(batch.rows)]
                progress.update(len(batch.rows))
        progress.close()
        if owners_n is not None:  # every process's rows to every process, in input order
            out_nd = gather.gather_rows(out_nd, owners_n)
        if dim is not None:
            out_nd = truncate_embeddings(out_nd, int(dim), normalize)
        return out_nd[0] if single else out_nd

    def _token_ids(self, texts: list[str], max_length: int, prefix: str) -> list:
        return self.tokenizer.token_ids(texts, max_length, prefix) if texts else []

    def _tokenise_shares(self, texts: list[str], max_length: int, prefix: str, plan) -> tuple[list, list]:
        """Over several processes: (token ids, batch plan), tokenising a 1 / P share for the token counts
        (all-gathered), then the texts of this process's own rows. A text no row of this process holds
        gets zeros of its length (its rows are never read here: `_rows` fills this process's devices)."""
        me, count, n = jax.process_index(), jax.process_count(), len(texts)
        share = np.arange(me, n, count)
        token_ids: list = [None] * n
        for i, ids in zip(share, self._token_ids([texts[i] for i in share], max_length, prefix)):
            token_ids[i] = ids
        lengths_n1 = np.zeros((n, 1), np.int32)
        lengths_n1[share, 0] = [len(token_ids[i]) for i in share]
        lengths_n = gather.gather_rows(lengths_n1, np.arange(n, dtype=np.int32) % count)[:, 0].astype(np.int64)
        batches = plan(lengths_n)
        rows_sharding = sharding.batch_sharding(self.mesh, 2)
        needed = []
        for b in batches:
            shape = (b.blocks * b.rows_per_block, b.length) if self.packing else (b.num_rows, b.length)
            mine_r = np.zeros(shape[0], bool)
            for index in rows_sharding.addressable_devices_indices_map(shape).values():
                mine_r[index[0]] = True
            if self.packing:
                needed.append(b.texts[mine_r[b.block * b.rows_per_block + b.row]])
            else:
                needed.append(b.rows[mine_r[:len(b.rows)]])
        todo = [int(i) for i in np.unique(np.concatenate(needed or [np.zeros(0, np.int64)]))
                if token_ids[i] is None]
        for i, ids in zip(todo, self._token_ids([texts[i] for i in todo], max_length, prefix)):
            token_ids[i] = ids
        zeros = np.zeros(max_length, np.int32)
        return [zeros[:lengths_n[i]] if t is None else t for i, t in enumerate(token_ids)], batches

    def _run(self, fn, token_ids, batches: list, normalize: bool
             ) -> Iterator[tuple[Any, np.ndarray, np.ndarray | None]]:
        """Dispatch batches asynchronously; fetch each result two batches later (bounded device memory).
        `fn` None: packed batches (`batching.PackedBatch`), each through `packed_fn`.

        Yields (batch, result, owners): one process, the whole result and None; a mesh over several
        processes, the result with this process's rows filled (the rest zero) and the process owning
        each index of its axis 0 (a block, or a row)."""
        pending: collections.deque = collections.deque()

        def fetch():
            done, e = pending.popleft()
            if not self.spans_processes:
                return done, np.asarray(e), None
            host = np.zeros(e.shape, e.dtype)
            for shard in e.addressable_shards:
                host[shard.index] = np.asarray(shard.data)
            return done, host, gather.owner_processes(e.sharding, e.shape)

        for batch in batches:
            if fn is None:
                arrays = batching.pack_inference_batch(token_ids, batch, self.tokenizer.pad_id)
                result = self.packed_fn(batch.num_slots, normalize)(self.params, *self._rows(arrays))
            else:
                result = fn(self.params, *self._rows(batching.pack_batch(token_ids, batch, self.tokenizer.pad_id)))
            pending.append((batch, result))
            if len(pending) > 2:
                yield fetch()
        while pending:
            yield fetch()

    def _rows(self, arrays: Sequence[np.ndarray]) -> Sequence:
        """Host rows as the batch-sharded inputs of a compiled call: numpy as it is in one process; over
        several processes, global arrays of which this process supplies its own devices' rows."""
        if not self.spans_processes:
            return arrays
        rows = sharding.batch_sharding(self.mesh, 2)
        return [jax.make_array_from_callback(a.shape, rows, lambda index, a=a: a[index]) for a in arrays]


def _mesh(mesh, axis_names: Mapping[str, str] | None, strategy: str):
    """The Encoder's mesh: `mesh` (a user's, as ours: `sharding.adopt_mesh`), else the default."""
    if strategy not in ("dp", "fsdp"):
        raise ValueError(f"strategy={strategy!r}; expected 'dp' (replicated) or 'fsdp' (sharded)")
    if mesh is None:
        if axis_names:
            raise ValueError(f"axis_names={dict(axis_names)} without a mesh: they name the axes of your mesh=")
        return default_mesh(strategy)
    return sharding.adopt_mesh(mesh, axis_names)


def default_mesh(strategy: str = "dp"):
    """Every device on the batch axis: "dp" over the data axis, "fsdp" over the fsdp axis."""
    if strategy not in ("dp", "fsdp"):
        raise ValueError(f"strategy={strategy!r}; expected 'dp' (replicated) or 'fsdp' (sharded)")
    mesh_cfg = sharding.MeshConfig(data=-1, strategy="dp") if strategy == "dp" else \
        sharding.MeshConfig(data=1, fsdp=-1, strategy="fsdp")
    return sharding.make_mesh(mesh_cfg)


def _place(params: Any, shardings: Any) -> Any:
    """Parameters onto shardings that span processes: each process supplies its own devices' pieces
    (every process holds the same values); arrays already global are resharded."""
    def put(x, s):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, s)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])
    return jax.tree.map(put, params, shardings)


def _check_max_length(max_length: int, cfg: ModelConfig) -> int:
    if not 3 <= max_length <= cfg.max_position_embeddings:
        raise ValueError(f"max_length={max_length} must be in [3, {cfg.max_position_embeddings}] "
                         "(the model's position embeddings)")
    return int(max_length)


def _st_max_seq_length(path: Path) -> int | None:
    """`max_seq_length` of a sentence-transformers `sentence_bert_config.json`, if the directory has one."""
    f = path / "sentence_bert_config.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8")).get("max_seq_length")
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: invalid JSON at line {e.lineno}: {e.msg}") from e


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, show: bool | str):
    """A tqdm bar over `total` texts when `show` is truthy, labelled `show` when it is a string."""
    if not show:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="text", desc=show if isinstance(show, str) else "encode")
