"""The command-line programs, one module each, every one a `main(argv, prog) -> exit code`.

`piccolo_jax.cli` dispatches `piccolo-jax <command>` to them; `scripts/*.py` and `conversion/convert.py`
are thin wrappers around the same functions. Library modules never import from here.
"""
