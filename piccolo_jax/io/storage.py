"""Where a run's files live: a local (POSIX) path, or an object-storage URL (`gs://bucket/...`).

Local paths are `pathlib.Path`s; URLs are `etils.epath.Path`s (fsspec / gcsfs underneath), which Orbax
and TFDS take as they are. What object storage lacks is handled here once:

* no rename: callers write in place and mark completeness with a small object written last
  (`export/export.json`, Orbax's own commit marker for checkpoints);
* no append: `ObjectText` keeps a text object (metrics.jsonl, train.log) as lines in memory and rewrites
  it at most every `FLUSH_S` seconds and on close;
* no local file handles for readers that need one (tokenizers, safetensors): `local_copy` downloads a
  directory to a cache directory first; every copy streams (`copy_file`, COPY_BUFFER_BYTES at a time).

`STORAGE_EMULATOR_HOST` (a GCS emulator, as in the tests) also points tensorstore's GCS driver, which
Orbax uses for arrays, at the emulator (`TENSORSTORE_GCS_HTTP_URL`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Union

FLUSH_S = 30.0  # an ObjectText is rewritten at most this often (and on close)
BUCKET_CHECK_S = 30.0  # a bucket that does not answer within this long is reported as unreachable
COPY_BUFFER_BYTES = 8 << 20  # files are copied in pieces of 8 MiB: a 1.3 GB safetensors never sits in memory

AnyPath = Union[Path, "epath.Path"]  # noqa: F821


def is_url(path) -> bool:
    return "://" in str(path)


def configure_emulator() -> None:
    """Point tensorstore at a GCS emulator named by STORAGE_EMULATOR_HOST (before tensorstore is used)."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host and "TENSORSTORE_GCS_HTTP_URL" not in os.environ:
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = host if "://" in host else f"http://{host}"


def ocdbt_supported(path) -> bool:
    """Whether Orbax may use its OCDBT format under `path`. OCDBT's conditional writes need object
    generations, which GCS reports (x-goog-generation) but the GCS emulators on PyPI do not: with
    STORAGE_EMULATOR_HOST set, URLs get one zarr array per tensor instead. Real buckets use OCDBT."""
    return not (is_url(path) and os.environ.get("STORAGE_EMULATOR_HOST"))


def as_path(path) -> AnyPath:
    """A local path made absolute, or an epath for a URL."""
    if is_url(path):
        from etils import epath

        configure_emulator()
        return epath.Path(str(path))
    return Path(path).expanduser().absolute()


def check_bucket(url: str, what: str) -> None:
    """Refuse (ValueError, one line) a URL whose bucket does not exist or does not answer in time."""
    from etils import epath

    scheme, rest = str(url).split("://", 1)
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(lambda: epath.Path(bucket + "/").exists())
    try:
        exists = future.result(timeout=BUCKET_CHECK_S)
    except concurrent.futures.TimeoutError:
        raise ValueError(f"{what} {url}: the bucket {bucket} did not answer within {BUCKET_CHECK_S:.0f} s") from None
    except Exception as e:  # credentials, DNS, permissions: the storage client's own words
        raise ValueError(f"{what} {url}: cannot reach the bucket {bucket}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        pool.shutdown(wait=False)
    if not exists:
        raise ValueError(f"{what} {url}: the bucket {bucket} does not exist (or is not visible with these "
                         "credentials)")


def local_copy(path, names: tuple[str, ...] | None = None) -> Path:
    """`path` itself when local; else a local cache copy of the URL directory (only `names`, if given).

    Used for the small files that libraries read by local path: tokenizers, HF configs and weights.
    """
    if not is_url(path):
        return Path(path)
    source = as_path(path)
    digest = hashlib.sha256(str(source).encode()).hexdigest()[:16]
    dest = Path(tempfile.gettempdir()) / "piccolo-jax-cache" / f"{source.name}-{digest}"
    dest.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if names is not None and item.name not in names:
            continue
        if item.is_dir():
            if names is None:
                copy_tree(item, dest / item.name)
            continue
        copy_file(item, dest / item.name)
    return dest


def copy_file(src, dst) -> None:
    """Stream one file between any two of: local path, URL, COPY_BUFFER_BYTES at a time."""
    src, dst = as_path(src), as_path(dst)
    if not is_url(src) and not is_url(dst):
        shutil.copyfile(src, dst)
        return
    with src.open("rb") as fin, dst.open("wb") as fout:
        shutil.copyfileobj(fin, fout, COPY_BUFFER_BYTES)


def copy_tree(src, dst) -> None:
    """Copy a directory tree between any two of: local path, URL."""
    src, dst = as_path(src), as_path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_dir():
            copy_tree(item, dst / item.name)
        else:
            copy_file(item, dst / item.name)


def remove_tree(path) -> None:
    path = as_path(path)
    if not path.exists():
        return
    if is_url(path):
        path.rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


class ObjectText:
    """A text object that grows by lines (metrics.jsonl, train.log) on storage that cannot append.

    Local paths are appended to as files are. For URLs the lines are kept and the whole object is
    rewritten at most every FLUSH_S seconds (`flush(force=True)` and `close()` write at once); the
    existing object is read first, so a resumed run continues it.
    """

    def __init__(self, path):
        self.path = as_path(path)
        self._url = is_url(self.path)
        if self._url:
            self._lines: list[str] = [self.path.read_text(encoding="utf-8")] if self.path.exists() else []
            self._dirty, self._last = False, 0.0
            self._file = None
        else:
            self._file = open(self.path, "a", encoding="utf-8")

    def write(self, text: str) -> None:
        if not self._url:
            self._file.write(text)
            return
        self._lines.append(text)
        self._dirty = True

    def flush(self, force: bool = False) -> None:
        if not self._url:
            if self._file is not None:
                self._file.flush()
            return
        if self._dirty and (force or time.monotonic() - self._last >= FLUSH_S):
            self.path.write_text("".join(self._lines), encoding="utf-8")
            self._dirty, self._last = False, time.monotonic()

    def close(self) -> None:
        """Idempotent (logging closes its handlers once more at exit)."""
        if not self._url:
            if self._file is not None:
                self._file.close()
                self._file = None
            return
        self.flush(force=True)
