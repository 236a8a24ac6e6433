"""Which datasets a list of paths names, and why anything else is not one.

Each path given is one of:

* a file whose name ends in ".jsonl", ".parquet" or ".arrow" in any case (`a.jsonl`, `B.Parquet`): one
  dataset named after the file without that suffix (`a`, `B`); any other file is refused;
* a TFDS dataset directory (it holds dataset_info.json, e.g. `OUT/city_qa/1.0.0`): one dataset;
* a directory written by `datasets.Dataset.save_to_disk` (state.json + dataset_info.json): one dataset
  named after the directory; a `DatasetDict`'s directory (dataset_dict.json) is refused naming its splits;
* a Hugging Face hub dataset `hf://datasets/ORG/NAME[/CONFIG][:SPLIT][@REVISION]` (hub_datasets): one dataset;
* a directory: the data files directly inside it (sorted by name), then the TFDS / save_to_disk datasets
  at any depth below it (a TFDS data_dir holds `<name>/<version>/`; at each level the datasets first,
  then the subdirectories, in sorted order). Parquet shards named `NAME-00000-of-00003.parquet` (the
  hub's layout) are one dataset `NAME`; all of its shards must be there.

Data files in a subdirectory of a listed directory are refused with one line naming the subdirectory,
never silently skipped and never read under a made-up name: dataset names are file stems, the names
that weights, prefixes and the resume state refer to, and two `train.jsonl` in `zh/` and `en/` would
collide. List the subdirectory itself (`data/zh`) to read its files; a subdirectory that is itself
listed is not looked into from its parent. Everything else found while scanning (README.md, .txt or
.json files, hidden files and directories such as .DS_Store or an interrupted prepare's
`.piccolo-tmp-*`, directories without datasets, and whatever is not a regular file or directory: named
pipes, sockets, looping or broken symbolic links, even when named `*.jsonl`) is skipped with a warning
saying why; a named pipe is never opened (that would wait for a writer).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import stat
from collections.abc import Sequence

log = logging.getLogger(__name__)

JSONL_SUFFIX = ".jsonl"
DATA_SUFFIXES = (JSONL_SUFFIX, ".parquet", ".arrow")  # files that are datasets; "jsonl", "parquet", "arrow"
HUB_PREFIX = "hf://datasets/"
_SHARD = re.compile(r"^(.+)-(\d{5})-of-(\d{5})\.parquet$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class DatasetRef:
    """One dataset found: its name, the path shown in messages, its kind ("jsonl", "tfds", "arrow": Parquet
    or Arrow files) and its files (one JSONL file; the Parquet / Arrow files of one table; none for TFDS)."""

    name: str
    path: str
    kind: str
    files: tuple[str, ...] = ()


class DatasetPathError(ValueError):
    """A path that is not a dataset or a directory of datasets; str(e) names it."""


def is_jsonl(path: str) -> bool:
    """Whether a file name has the JSONL suffix, in any case."""
    return os.path.basename(path).lower().endswith(JSONL_SUFFIX) and len(os.path.basename(path)) > 6


def data_suffix(path: str) -> str | None:
    """The data suffix of a file name (DATA_SUFFIXES, in any case), or None."""
    name = os.path.basename(path).lower()
    return next((x for x in DATA_SUFFIXES if name.endswith(x) and len(name) > len(x)), None)


def file_stem(path: str) -> str:
    """The dataset name of a data file: its name without the suffix (`dir/City_QA.JSONL` -> `City_QA`)."""
    return os.path.basename(path)[:-len(data_suffix(path) or "")]


def _file_refs(files: Sequence[str]) -> list[DatasetRef]:
    """Datasets of data files of one directory (or listed): each its own, Parquet shards grouped."""
    refs, shards = [], {}
    for file in files:
        match = _SHARD.match(os.path.basename(file))
        if match:
            shards.setdefault((os.path.dirname(file), match.group(1)), []).append((file, match))
        elif data_suffix(file) == JSONL_SUFFIX:
            refs.append(DatasetRef(file_stem(file), file, "jsonl", (file,)))
        else:
            refs.append(DatasetRef(file_stem(file), file, "arrow", (file,)))
    for (directory, name), group in shards.items():
        total = {int(m.group(3)) for _, m in group}
        have = sorted(int(m.group(2)) for _, m in group)
        if len(total) != 1 or have != list(range(total.pop())):
            raise DatasetPathError(f"{group[0][0]}: the shards of {name!r} in {directory or '.'} are incomplete "
                                   f"or mixed (found shard numbers {have} of "
                                   f"{sorted({int(m.group(3)) for _, m in group})})")
        files_in_order = tuple(f for f, _ in sorted(group, key=lambda fm: int(fm[1].group(2))))
        refs.append(DatasetRef(name, os.path.join(directory, f"{name}-*.parquet"), "arrow", files_in_order))
    return refs


def _dir_ref(path: str) -> DatasetRef:
    """The dataset of a TFDS or save_to_disk directory."""
    from piccolo_jax.data import arrow_tables

    if arrow_tables.is_save_to_disk_dir(path):
        return DatasetRef(os.path.basename(os.path.normpath(path)), path, "arrow",
                          tuple(arrow_tables.save_to_disk_files(path)))
    parent, base = os.path.split(os.path.normpath(path))
    name = os.path.basename(parent) if re.fullmatch(r"\d+\.\d+\.\d+", base) else base
    return DatasetRef(name, path, "tfds")


def jsonl_stem(path: str) -> str:
    """The dataset name of a JSONL file: its name without the suffix (`dir/City_QA.JSONL` -> `City_QA`)."""
    return os.path.basename(path)[:-len(JSONL_SUFFIX)]


def is_tfds_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_info.json"))


def _skip(path: str, why: str) -> None:
    log.warning("skipping %s: %s", path, why)


def special_file(path: str) -> str | None:
    """Why `path` is neither a regular file nor a directory (a looping or broken symbolic link, a named
    pipe, a socket, a device), or None when it is one of those or is gone. Only stat()s: a FIFO is never
    opened (opening one blocks until something writes to it)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        try:
            is_link = os.path.islink(path)
        except OSError:
            is_link = False
        if not is_link:
            return None  # removed while scanning
        if e.errno == errno.ELOOP:
            return "a symbolic link loop"
        if e.errno == errno.ENOENT:
            return f"a broken symbolic link (to {os.readlink(path)})"
        return f"a symbolic link that cannot be followed ({e.strerror or e})"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    return f"{kind}, not a regular file"


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
                if data_suffix(name):
                    found.append(full)
                else:
                    _skip(full, f"not a data file ({', '.join(DATA_SUFFIXES)})")
            elif why := special_file(full):
                _skip(full, why)
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
        data = [n for n in entries if data_suffix(n) and os.path.isfile(os.path.join(path, n))]
        if data:
            raise DatasetPathError(f"{path}: {len(data)} data file(s) in a nested directory (e.g. {data[0]}), "
                                   f"which are not read; list {path} itself in the data paths to read them")
        for name in entries:
            full = os.path.join(path, name)
            if name.startswith("."):
                _skip(full, "hidden")
            elif os.path.isfile(full):
                _skip(full, "not inside a TFDS dataset directory")
            elif why := special_file(full):
                _skip(full, why)
        if not entries:
            _skip(path, "empty directory")
        if is_dataset_dict(path):
            _skip(path, "a DatasetDict (list one split's directory to read it)")
            return []
        return self.below(path, entries)


def is_dataset_dict(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_dict.json"))


def find_datasets(paths: Sequence[str]) -> list[DatasetRef]:
    """The datasets `paths` name, by the rules of the module doc. Raises FileNotFoundError for a missing
    path and DatasetPathError (a ValueError) for a file that is not a data file, a directory without
    datasets, data files in a nested directory or an unresolvable hub id, each naming the path."""
    listed = {os.path.realpath(p) for p in paths if os.path.isdir(p)}
    found: list[DatasetRef] = []
    for path in paths:
        path = str(path)
        if path.startswith(HUB_PREFIX):
            from piccolo_jax.data.hub_datasets import resolve_hub_dataset

            found.append(resolve_hub_dataset(path))
        elif "://" in path:  # the readers memory-map and pread local files
            raise DatasetPathError(f"{path}: datasets are read from a local path or {HUB_PREFIX}ORG/NAME; copy them "
                                   "to each host's disk or mount the bucket (gcsfuse) and name the mount")
        elif os.path.isfile(path):
            if not data_suffix(path):
                raise DatasetPathError(f"{path}: unsupported dataset file (expected {', '.join(DATA_SUFFIXES)})")
            found.extend(_file_refs([path]))
        elif os.path.isdir(path):
            if is_tfds_dir(path):
                found.append(_dir_ref(path))
                continue
            if is_dataset_dict(path):
                splits = sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))
                raise DatasetPathError(f"{path}: a DatasetDict with the splits {splits}; name one split's "
                                       f"directory (e.g. {os.path.join(path, splits[0] if splits else 'train')})")
            inside = _Scan(listed - {os.path.realpath(path)}).top(path)
            if not inside:
                raise DatasetPathError(f"{path}: no data files ({', '.join(DATA_SUFFIXES)}) or TFDS / "
                                       "save_to_disk datasets in this directory")
            files = [p for p in inside if os.path.isfile(p)]
            found.extend(_file_refs(files) + [_dir_ref(d) for d in inside if not os.path.isfile(d)])
        elif why := special_file(path):
            raise DatasetPathError(f"{path}: {why}; name a data file or a directory")
        else:
            raise FileNotFoundError(f"{path}: no such dataset file or directory")
    return found


def find_dataset_paths(paths: Sequence[str]) -> list[str]:
    """The path of each dataset `paths` name (find_datasets)."""
    return [ref.path for ref in find_datasets(paths)]
