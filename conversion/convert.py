"""`python conversion/convert.py hf2jax|jax2hf ...` = `piccolo-jax convert ...` (see its --help).

The conversion code itself is `piccolo_jax.hf` (name table, readers, writers) and
`piccolo_jax.commands.convert` (this command).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run from a clone without installing: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from piccolo_jax.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
