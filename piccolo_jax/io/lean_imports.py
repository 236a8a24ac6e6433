"""Importing third-party packages without the optional modules they would load for nothing.

Some dependencies import heavy optional packages at module level only to support cases that never
arise here: tensorboardX loads torch (to recognise torch tensors), boto3 and google-cloud-storage (for
its own s3:// and gs:// writers) and flax's NNX loads IPython (to ask whether it runs inside IPython,
which it cannot unless IPython is already loaded). Together ~5 s of every trainer start when torch is
installed, ~1.3 s without it. `hidden(...)` makes such imports fail with ImportError, which those
packages catch, for the duration of one import; modules already loaded are left as they are, and
everything stays importable afterwards.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def hidden(*names: str) -> Iterator[None]:
    """Within the block `import <name>` raises ImportError for each name not already imported."""
    absent = [n for n in names if n not in sys.modules]
    for name in absent:
        sys.modules[name] = None  # the import system raises ImportError for a None entry
    try:
        yield
    finally:
        for name in absent:
            if sys.modules.get(name, ...) is None:
                del sys.modules[name]
