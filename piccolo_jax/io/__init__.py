"""Files: local and object-storage paths (`storage`), the files shipped in the package (`resources`),
the layout, lock, states and exit codes of a run directory (`run_dir`), Hugging Face hub model ids
resolved to local snapshots (`hub`),
and users' text inputs (`text_files`: JSONL / plain text, errors naming file and line).

May import: `piccolo_jax.config`; no JAX.
"""
