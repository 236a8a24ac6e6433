"""Training data: record formats (`records`), readers (JSONL `jsonl_scan` / `sources`, TFDS `tfds_store`,
`record_arrays`), `prepare` (JSONL -> TFDS), the dataset-homogeneous sampler (`sampler`), batches and
packed rows (`batching`, `packing`) and the loader that runs them ahead of the step (`loader`).

May import: `piccolo_jax.config`, `io`, `text`, `parallel`.
"""
