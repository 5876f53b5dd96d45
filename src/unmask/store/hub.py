"""Deltas on the Hugging Face hub: find a delta folder by hub id, upload one.

`SparseDelta.from_pretrained(name)` reads a local folder when `name` is one (a local path always
wins) and otherwise downloads the repository's delta files through `huggingface_hub`'s
`snapshot_download`, which keeps them in the usual hub cache (``HF_HUB_CACHE``) and works offline
(``HF_HUB_OFFLINE=1``) once they are there. `upload` backs `SparseDelta.push_to_hub`.
Needs `huggingface_hub` (a dependency of transformers), imported only when the hub is used.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unmask.store.delta_format import CONFIG_FILE, TENSORS_FILE, DeltaError
from unmask.store.model_card import CARD_FILE, is_hub_id, model_card

if TYPE_CHECKING:
    from unmask.store.delta import SparseDelta

HUB_FILES = [CONFIG_FILE, TENSORS_FILE, CARD_FILE]  # what a delta repository holds


def delta_folder(
    name: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> Path:
    """The local folder of the delta `name`: `name` itself if it exists, else its hub snapshot.

    A name that exists on disk, or is not of the form ``owner/name`` (absolute, ``./``, ``~``,
    no ``/`` or more than one), is a local path and is returned as it is (reading it reports
    what is missing).
    Otherwise the repository's delta files are fetched (or found in the cache) at `revision`.
    Raises DeltaError when the hub has no such repository or cannot be reached and the cache
    does not hold it.
    """
    path = Path(name).expanduser()
    text = str(name)
    if path.exists() or not is_hub_id(text) or text.count("/") != 1:
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            text,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            allow_patterns=[CONFIG_FILE, TENSORS_FILE],
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        raise DeltaError(
            f"{text} is not a local folder, and getting it from the Hugging Face hub failed "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); give the "
            "path of a delta folder, or a hub repository id that holds one (with network "
            "access, or its files already in the hub cache for HF_HUB_OFFLINE=1)"
        ) from err
    return Path(folder)


def upload(
    delta: SparseDelta,
    repo_id: str,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
) -> Any:
    """Create the hub repository `repo_id` if needed and upload the delta's files to it.

    The files are those `save_pretrained` writes, with a model card naming `repo_id`.
    Returns what `HfApi.upload_folder` returns (the commit's information).
    """
    if not is_hub_id(repo_id) or "/" not in repo_id:
        raise ValueError(f"repo_id {repo_id!r} is not a hub repository id such as 'owner/name'")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as tmp:
        delta.save_pretrained(tmp)
        (Path(tmp) / CARD_FILE).write_text(model_card(delta, repo_id), encoding="utf-8")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            repo_type="model",
            revision=revision,
            allow_patterns=HUB_FILES,
            commit_message=commit_message or f"Upload unmask delta ({delta.num_weights:,} weights)",
        )
