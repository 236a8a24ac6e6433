"""A Hugging Face hub cache written by a test, offline: huggingface_hub's own layout, so that
`snapshot_download(..., local_files_only=True)` (and `datasets` with HF_HUB_OFFLINE=1) find it.

    HUB/models--ORG--NAME/                   (datasets--ORG--NAME/ for a dataset)
        blobs/<sha256>                        each file's bytes, once
        snapshots/<40-hex>/<relative path>    a relative symlink to its blob
        refs/main                             the 40-hex commit hash (no newline)

HUB is HF_HOME/hub (or HF_HUB_CACHE). Point HF_HOME at the parent and set HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def lay_model(hub_dir, repo_id: str, src_dir, revision_hash: str | None = None) -> Path:
    """Every file under `src_dir` as model `repo_id` at `revision_hash` (default: one derived from the id),
    ref main; returns the snapshot directory."""
    src_dir = Path(src_dir)
    files = {p.relative_to(src_dir).as_posix(): p for p in sorted(src_dir.rglob("*")) if p.is_file()}
    return _lay(Path(hub_dir), "models", repo_id, files, revision_hash)


def lay_dataset(hub_dir, repo_id: str, files: dict[str, str | os.PathLike],
                revision_hash: str | None = None) -> Path:
    """Dataset `repo_id` holding `files` ({path in the repository: source file}); returns the snapshot."""
    return _lay(Path(hub_dir), "datasets", repo_id, {k: Path(v) for k, v in files.items()}, revision_hash)


def _lay(hub_dir: Path, kind: str, repo_id: str, files: dict[str, Path], revision_hash: str | None) -> Path:
    org_name = repo_id.split("/")
    assert len(org_name) == 2 and all(org_name), f"{repo_id!r}: expected ORG/NAME"
    revision_hash = revision_hash or hashlib.sha1(f"{kind}/{repo_id}".encode()).hexdigest()
    assert len(revision_hash) == 40 and all(c in "0123456789abcdef" for c in revision_hash), revision_hash
    repo = hub_dir / f"{kind}--{org_name[0]}--{org_name[1]}"
    snapshot = repo / "snapshots" / revision_hash
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, src in files.items():
        digest = hashlib.sha256(Path(src).read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(src, blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision_hash)
    return snapshot
