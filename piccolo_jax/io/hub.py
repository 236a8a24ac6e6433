"""Hugging Face hub model ids as model paths: `ORG/NAME` or `ORG/NAME@REVISION` -> a local snapshot directory.

A model argument (`train --init`, `--model` of encode / evaluate / mine, `convert hf2jax`'s input,
`Encoder.load`) that is not an existing local path nor a URL, and reads as a hub id, is resolved with
`huggingface_hub.snapshot_download`: the local cache first (HF_HOME, HF_HUB_CACHE), the hub when online;
with HF_HUB_OFFLINE=1 the cache only. Only the files a model is read from are fetched (JSON configs,
vocab.txt, safetensors weights, our params/, a Dense module; pytorch_model.bin when there is no
safetensors file). What cannot be had is one line naming the id and how to fetch it (`HubModelError`, a
FileNotFoundError: exit code 2 in every command).

    resolve_model_path("BAAI/bge-base-zh-v1.5")        # -> ~/.cache/huggingface/hub/models--BAAI--.../snapshots/<hash>
    resolve_model_path("runs/finetune")                # an existing path: returned as it is

No JAX; huggingface_hub is imported only when an id is resolved.
"""

from __future__ import annotations

import os
from pathlib import Path

from piccolo_jax.config.train import HUB_MODEL_ID

HUB_ID = HUB_MODEL_ID  # ORG/NAME[@REVISION]; config keeps `init = "ORG/NAME"` as an id by the same rule
# What a model directory is read from (fnmatch patterns: `*` crosses folders).
MODEL_PATTERNS = ("*.json", "*.txt", "*.safetensors", "params/*", "2_Dense/*")
BIN_PATTERNS = ("pytorch_model.bin", "2_Dense/pytorch_model.bin")  # only without safetensors (nor params/)
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubModelError(FileNotFoundError):
    """A hub model id that cannot be had: one line naming the id and how to fetch it."""


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """("ORG/NAME", revision or None) when `text` reads as a hub model id, else None."""
    match = HUB_ID.match(str(text))
    if match is None or ".." in match["repo"]:
        return None
    return match["repo"], match["revision"]


def is_hub_id(text) -> bool:
    """True for `ORG/NAME[@REVISION]` that is neither an existing local path nor a URL."""
    text = str(text)
    return "://" not in text and not os.path.exists(text) and parse_hub_id(text) is not None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, at call time (huggingface_hub reads it once, at import)."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    return value.upper() in _TRUE


def hub_cache_dir() -> str | None:
    """HF_HUB_CACHE, else HF_HOME/hub, read at call time; None: huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def resolve_model_path(path):
    """The local snapshot directory of a hub model id (see `is_hub_id`); anything else unchanged."""
    if not is_hub_id(path):
        return path
    repo, revision = parse_hub_id(str(path))
    return download_model(repo, revision)


def download_model(repo: str, revision: str | None = None) -> Path:
    """The snapshot directory of `repo` at `revision` (default: main), from the cache or the hub."""
    from huggingface_hub import snapshot_download

    offline, cache_dir = hub_offline(), hub_cache_dir()
    spec = f"{repo}@{revision}" if revision else repo

    def fetch(patterns) -> Path:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir, local_files_only=offline,
                                      allow_patterns=list(patterns)))

    try:
        snapshot = fetch(MODEL_PATTERNS)
        if not offline and not any(snapshot.glob("model*.safetensors")) and not (snapshot / "params").is_dir():
            snapshot = fetch(BIN_PATTERNS)
    except Exception as e:  # noqa: BLE001  (any hub or cache error: one line naming the id)
        raise HubModelError(_why(spec, repo, revision, offline, e)) from None
    return snapshot


def _why(spec: str, repo: str, revision: str | None, offline: bool, error: Exception) -> str:
    fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    reason = " ".join(f"{type(error).__name__}: {error}".split())
    if len(reason) > 300:
        reason = reason[:300] + "..."
    if offline:
        return (f"{spec}: no such local model directory, and as a Hugging Face hub model id it is not (complete) in "
                f"the cache {hub_cache_dir() or '(the default one)'} while HF_HUB_OFFLINE=1 ({type(error).__name__}): "
                f"fetch it once online (`{fetch}`) or unset HF_HUB_OFFLINE")
    return (f"{spec}: no such local model directory, and the Hugging Face hub did not give it as a model id "
            f"({reason}): check the id{' and revision' if revision else ''}, `hf auth login` for a gated or "
            f"private model, or fetch it where the hub is reachable (`{fetch}`) and set HF_HUB_OFFLINE=1")
