"""`python scripts/mine_negatives.py ...` = `piccolo-jax mine ...` (see `piccolo-jax mine --help`)."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run from a clone without installing: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from piccolo_jax.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["mine", *sys.argv[1:]]))
