"""`python -m piccolo_jax <command>`: the same as the `piccolo-jax` console script."""

import sys

from piccolo_jax.cli import main

sys.exit(main())
