"""Text to token ids: the BERT WordPiece tokenizer (`tokenizer`), its vectorised per-character fast path
(`char_wordpiece`) and ragged int arrays (`ragged`).

May import: `piccolo_jax.config`, `piccolo_jax.io`; no JAX.
"""
