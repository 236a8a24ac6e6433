"""Which datasets a list of paths names: JSONL files and TFDS directories, and why anything else is not one.

Each path given is one of:

* a file whose name ends in ".jsonl" in any case (`a.jsonl`, `B.JSONL`): one dataset named after the
  file without that suffix (`a`, `B`); any other file is refused;
* a TFDS dataset directory (it holds dataset_info.json, e.g. `OUT/city_qa/1.0.0`): one dataset;
* a directory: the JSONL files directly inside it (sorted by name), then the TFDS datasets at any
  depth below it (a TFDS data_dir holds `<name>/<version>/`; at each level the datasets first, then
  the subdirectories, in sorted order).

JSONL files in a subdirectory of a listed directory are refused with one line naming the subdirectory,
never silently skipped and never read under a made-up name: dataset names are file stems, the names
that weights, prefixes and the resume state refer to, and two `train.jsonl` in `zh/` and `en/` would
collide. List the subdirectory itself (`data/zh`) to read its files; a subdirectory that is itself
listed is not looked into from its parent. Everything else found while scanning (README.md, .txt or
.json files, hidden files and directories such as .DS_Store or an interrupted prepare's
`.piccolo-tmp-*`, directories without datasets) is skipped with a warning saying why.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

log = logging.getLogger(__name__)

JSONL_SUFFIX = ".jsonl"


class DatasetPathError(ValueError):
    """A path that is not a dataset or a directory of datasets; str(e) names it."""


def is_jsonl(path: str) -> bool:
    """Whether a file name has the JSONL suffix, in any case."""
    return os.path.basename(path).lower().endswith(JSONL_SUFFIX) and len(os.path.basename(path)) > 6


def jsonl_stem(path: str) -> str:
    """The dataset name of a JSONL file: its name without the suffix (`dir/City_QA.JSONL` -> `City_QA`)."""
    return os.path.basename(path)[:-len(JSONL_SUFFIX)]


def is_tfds_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_info.json"))


def _skip(path: str, why: str) -> None:
    log.warning("skipping %s: %s", path, why)


class _Scan:
    def __init__(self, listed: set[str]):
        self.listed = listed  # real paths of the directories given, not entered from their parents
        self.seen: set[str] = set()  # real paths of the directories entered (symlink loops)

    def top(self, path: str) -> list[str]:
        entries = sorted(os.listdir(path))
        found = []
        for name in entries:
            full = os.path.join(path, name)
            if name.startswith("."):
                _skip(full, "hidden")
            elif os.path.isfile(full):
                if is_jsonl(name):
                    found.append(full)
                else:
                    _skip(full, f"not a {JSONL_SUFFIX} file")
        return found + self.below(path, entries)

    def below(self, path: str, entries: list[str]) -> list[str]:
        """TFDS datasets in the subdirectories of `path` (and deeper); refuses nested JSONL files."""
        self.seen.add(os.path.realpath(path))
        subdirs = []
        for name in entries:
            full = os.path.join(path, name)
            if name.startswith(".") or not os.path.isdir(full):
                continue
            if os.path.realpath(full) in self.listed:
                log.info("%s is listed itself; not reading it again from %s", full, path)
            elif os.path.realpath(full) in self.seen:
                _skip(full, "already scanned (a symbolic link loop?)")
            else:
                subdirs.append(full)
        found = [d for d in subdirs if is_tfds_dir(d)]
        for sub in subdirs:
            if not is_tfds_dir(sub):
                found += self.nested(sub)
        return found

    def nested(self, path: str) -> list[str]:
        entries = sorted(os.listdir(path))
        jsonl = [n for n in entries if is_jsonl(n) and os.path.isfile(os.path.join(path, n))]
        if jsonl:
            raise DatasetPathError(f"{path}: {len(jsonl)} .jsonl file(s) in a nested directory (e.g. {jsonl[0]}), "
                             f"which are not read; list {path} itself in the data paths to read them")
        for name in entries:
            full = os.path.join(path, name)
            if name.startswith("."):
                _skip(full, "hidden")
            elif os.path.isfile(full):
                _skip(full, "not inside a TFDS dataset directory")
        if not entries:
            _skip(path, "empty directory")
        return self.below(path, entries)


def find_dataset_paths(paths: Sequence[str]) -> list[str]:
    """Expand `paths` into dataset paths (.jsonl files and TFDS directories) by the rules of the module
    doc. Raises FileNotFoundError for a missing path and DatasetPathError (a ValueError) for a file that is not JSONL, a
    directory without datasets or JSONL files in a nested directory, each naming the path."""
    listed = {os.path.realpath(p) for p in paths if os.path.isdir(p)}
    found: list[str] = []
    for path in paths:
        if "://" in str(path):  # the readers memory-map and pread local files
            raise DatasetPathError(f"{path}: datasets are read from a local path; copy them to each host's disk or "
                                   "mount the bucket (gcsfuse) and name the mount")
        if os.path.isfile(path):
            if not is_jsonl(path):
                raise DatasetPathError(f"{path}: unsupported dataset file (expected {JSONL_SUFFIX})")
            found.append(path)
        elif os.path.isdir(path):
            if is_tfds_dir(path):
                found.append(path)
                continue
            inside = _Scan(listed - {os.path.realpath(path)}).top(path)
            if not inside:
                raise DatasetPathError(f"{path}: no {JSONL_SUFFIX} files or TFDS datasets in this directory")
            found.extend(inside)
        else:
            raise FileNotFoundError(f"{path}: no such dataset file or directory")
    return found
