"""Hugging Face hub datasets named `hf://datasets/ORG/NAME[/CONFIG][:SPLIT][@REVISION]`.

The repository is fetched by `huggingface_hub.snapshot_download` (repo_type="dataset"): from the local
Hugging Face cache when it holds the revision (always with HF_HUB_OFFLINE=1), else downloaded. Its data
files are then chosen by the hub's file layout (the YAML `configs:` of a dataset card are not read):

* CONFIG (optional) is a directory of the repository: only files below it are considered;
* SPLIT (default "train") picks the files whose path has a directory named SPLIT or whose name begins
  with SPLIT followed by "-", "_" or "." (`data/train-00000-of-00002.parquet`, `train.jsonl`,
  `default/train/0000.parquet`);
* the files of one split are Parquet / Arrow (one table, in path order), or a single JSONL file.

The dataset is named NAME, then `-CONFIG` and `-SPLIT` when given and not "train": the name that
weights, prefixes, column maps and the resume state use.
"""

from __future__ import annotations

import os
import re

from piccolo_jax.data.discovery import HUB_PREFIX, JSONL_SUFFIX, DatasetPathError, DatasetRef, data_suffix
from piccolo_jax.io.hub import hub_cache_dir, hub_offline

_SPEC = re.compile(r"^(?P<org>[\w.-]+)/(?P<name>[\w.-]+)(?:/(?P<config>[\w.-]+))?(?::(?P<split>[\w.-]+))?"
                   r"(?:@(?P<revision>[\w./-]+))?$")


def parse_spec(spec: str) -> dict:
    """{"repo_id", "config", "split", "revision"} of a hub dataset spec; DatasetPathError when malformed."""
    match = _SPEC.match(spec[len(HUB_PREFIX):])
    if not match:
        raise DatasetPathError(f"{spec}: not a hub dataset; expected {HUB_PREFIX}ORG/NAME[/CONFIG][:SPLIT][@REVISION]")
    return {"repo_id": f"{match['org']}/{match['name']}", "name": match["name"], "config": match["config"],
            "split": match["split"] or "train", "revision": match["revision"]}


def _snapshot(spec: str, repo_id: str, revision: str | None, patterns: list[str] | None) -> str:
    """The local snapshot directory of the repository (only `patterns` downloaded when online)."""
    import huggingface_hub

    offline = hub_offline()  # HF_HUB_OFFLINE / HF_HOME read now, as for hub models (piccolo_jax.io.hub)
    try:
        return huggingface_hub.snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                                 cache_dir=hub_cache_dir(), local_files_only=offline,
                                                 allow_patterns=patterns)
    except Exception as e:  # noqa: BLE001  (every hub failure: offline miss, 404, auth, network) is one line
        fetch = f"hf download {repo_id} --repo-type dataset" + (f" --revision {revision}" if revision else "")
        how = (f"it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; fetch it once online (`{fetch}`)"
               if offline else f"{type(e).__name__}: {' '.join(str(e).split())[:300]}; check the id, `hf auth "
               f"login` for a gated dataset, or `{fetch}` where the hub is reachable and set HF_HUB_OFFLINE=1")
        raise DatasetPathError(f"{spec}: cannot get hub dataset {repo_id}"
                               f"{'@' + revision if revision else ''}: {how}") from None


def _in_split(relative: str, split: str) -> bool:
    parts = relative.split("/")
    name = parts[-1]
    return split in parts[:-1] or any(name.startswith(split + sep) for sep in "-_.")


def resolve_hub_dataset(spec: str) -> DatasetRef:
    """The dataset of a hub spec (module doc), its files in the local snapshot."""
    parsed = parse_spec(spec)
    config = parsed["config"]
    root = _snapshot(spec, parsed["repo_id"], parsed["revision"], [f"{config}/**"] if config else None)
    base = os.path.join(root, parsed["config"]) if parsed["config"] else root
    if not os.path.isdir(base):
        configs = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)) and n[0] != ".")
        raise DatasetPathError(f"{spec}: {parsed['repo_id']} has no config {parsed['config']!r} (its directories: "
                               f"{configs})")
    files = []
    for directory, dirs, names in os.walk(base, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if data_suffix(name):
                files.append(os.path.relpath(os.path.join(directory, name), base).replace(os.sep, "/"))
    chosen = [f for f in files if _in_split(f, parsed["split"])]
    if not chosen:
        raise DatasetPathError(f"{spec}: no data files of split {parsed['split']!r} in {parsed['repo_id']} "
                               f"(its data files: {files[:8]}{' ...' if len(files) > 8 else ''})")
    kinds = {data_suffix(f) for f in chosen}
    if JSONL_SUFFIX in kinds and (len(kinds) > 1 or len(chosen) > 1):
        raise DatasetPathError(f"{spec}: split {parsed['split']!r} is {len(chosen)} files {chosen[:4]}; a hub split "
                               "is read from Parquet / Arrow files or from one JSONL file")
    name = parsed["name"] + "".join(f"-{x}" for x in (parsed["config"],) if x) + (
        f"-{parsed['split']}" if parsed["split"] != "train" else "")
    paths = tuple(os.path.join(base, f) for f in chosen)
    kind = "jsonl" if JSONL_SUFFIX in kinds else "arrow"
    return DatasetRef(name, spec, kind, paths)
