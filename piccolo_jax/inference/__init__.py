"""Embedding texts: `Encoder` (sharded, token-budget batches, input order kept; `encoder`), the batch
plans it runs (`batching`: padded buckets and packed rows) and hard-negative mining (`mining`).

May import: `piccolo_jax.config`, `io`, `text`, `parallel`, `model`, `hf`.
"""
