"""One-line errors for the commands: bad input or invocation prints `PROG: error: MESSAGE` and exits 2.

    parser = Parser(prog=prog, description=__doc__)      # argparse errors become one line too
    ...
    return run_guarded(parser.prog, lambda: body(args))  # InputError / bad files -> one line, exit 2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

EXIT_USAGE = 2


class InputError(Exception):
    """Bad input found by a command: its message is one line naming the file, line, field or option."""


# Raised by our readers and loaders for bad input; each message names the file / line / field.
INPUT_ERRORS = (InputError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def one_line(message: object) -> str:
    return " ".join(str(message).split())


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`PROG: error: MESSAGE (see --help)`), exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {one_line(message)} (see --help)\n")
        sys.exit(EXIT_USAGE)


def run_guarded(prog: str, body: Callable[[], int | None]) -> int:
    """body()'s exit code (0 for None); an input error becomes one line on stderr and exit code 2."""
    try:
        return int(body() or 0)
    except INPUT_ERRORS as e:
        sys.stderr.write(f"{prog}: error: {one_line(e)}\n")
        return EXIT_USAGE
