"""The encoder: Flax NNX BERT with scanned layers (`bert`), attention paths — explicit, cuDNN fused
(`attention`), dropout masks that follow (text, token position) (`dropout`), pooling and the Dense head
(`pooling`), and model directories on disk (`directory`: Orbax parameters + config + tokenizer).

May import: `piccolo_jax.config`, `piccolo_jax.io`, `piccolo_jax.parallel`. Parameters carry logical axis
names only; mesh axes are named in `piccolo_jax.parallel.sharding`.
"""
