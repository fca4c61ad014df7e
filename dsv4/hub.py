"""`--model` as a Hugging Face repo id, found in the local Hugging Face cache; nothing is ever downloaded.

A `--model` value that is not an existing path but reads `org/name` or `org/name@revision` names a snapshot in the
cache layout that huggingface_hub (and transformers, vLLM, `hf download`, ...) writes, documented at
https://huggingface.co/docs/hub/local-cache:

    <cache>/models--<org>--<name>/refs/<revision>        holds a commit hash (revision default: main)
    <cache>/models--<org>--<name>/snapshots/<commit>/    the repository's files at that commit

with <cache> = $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
~/.cache/huggingface/hub. A revision may also be a commit hash (a snapshot folder's name). The layout is read
directly, so huggingface_hub is not a dependency.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from dsv4.errors import DSV4Error

REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def hub_cache() -> Path:
    """The Hugging Face hub cache folder this machine uses (it may not exist)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def resolve_model(model: str | Path) -> Path:
    """The checkpoint folder `model` names: an existing path as it is; a repo id (`org/name[@revision]`) as its
    snapshot in the local Hugging Face cache. Anything else is returned as a path, for the loader to report."""
    path = Path(model)
    match = REPO_ID.match(str(model))
    if path.exists() or match is None or ".." in str(model):
        return path
    repo, revision = match["repo"], match["revision"] or "main"
    cache = hub_cache()
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    ref = repo_dir / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo_dir / "snapshots" / commit
    if snapshot.is_dir():
        return snapshot
    where = (f"the cache has no revision {revision!r} of it (snapshots: "
             f"{', '.join(sorted(p.name for p in (repo_dir / 'snapshots').iterdir())) or 'none'})"
             if (repo_dir / "snapshots").is_dir() else f"it is not in the Hugging Face cache at {cache}")
    raise DSV4Error(f"model {model}: no such directory, and {where}; dsv4 never downloads: fetch it first "
                    f"(e.g. `hf download {repo}`) or pass the checkpoint directory")
