"""``release.push: org/name``: upload a finished, verified release directory to the Hugging Face Hub.

The upload is the last thing ``healer release`` does: only a release whose manifest exists and whose files
still match it is pushed. The token is huggingface_hub's own (``HF_TOKEN`` or ``hf auth login``); it is
never read from the recipe and never written anywhere. The upload function is a parameter so tests (and
a dry run) can stand in for the Hub.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from healer.core.errors import HealerError
from healer.core.manifest import read_stage_manifest

Upload = Callable[..., str]


def verify_release(folder: Path) -> list[str]:
    """The files of the release ``folder`` (relative paths); raises when they do not match its manifest."""
    from healer.core.hashing import file_hashes

    manifest = read_stage_manifest(folder)
    if not manifest or manifest.get("stage") != "release":
        raise HealerError(f"release.push: {folder} has no release manifest (the release did not finish); nothing "
                          "was uploaded")
    listed = (manifest.get("outputs") or {}).get("files") or {}
    found = file_hashes(folder)
    if found != listed:
        changed = sorted(set(found) ^ set(listed) | {k for k in found.keys() & listed.keys() if found[k] != listed[k]})
        raise HealerError(f"release.push: {folder} changed after it was written ({', '.join(changed[:3])}); "
                          "nothing was uploaded")
    return sorted(found) + ["manifest.json"]


def hub_upload(*, folder: Path, repo_id: str, private: bool, revision: str | None, commit_message: str) -> str:
    """Create ``repo_id`` if needed (and the branch ``revision``), upload ``folder``; returns the commit URL."""
    from huggingface_hub import HfApi, get_token

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise HealerError(f"release.push {repo_id}: HF_HUB_OFFLINE is set; unset it to upload")
    token = get_token()
    if not token:
        raise HealerError(f"release.push {repo_id}: no Hugging Face token; set HF_TOKEN or run `hf auth login` "
                          "(never a token in the recipe)")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, repo_type="model",
                                 commit_message=commit_message)
    except Exception as err:  # network, auth, permissions: one line, never the token
        first = (str(err).strip().splitlines() or [type(err).__name__])[0].replace(token, "<redacted>")
        raise HealerError(f"release.push {repo_id}: upload failed: {type(err).__name__}: {first}") from None
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"


def push_release(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                 commit_message: str | None = None, upload: Upload | None = None) -> str:
    """Verify the release ``folder`` against its manifest, then upload it to ``repo_id``; returns the commit URL.

    ``upload`` replaces :func:`hub_upload` (same keyword arguments), e.g. a fake in tests.
    """
    files = verify_release(folder)
    message = commit_message or f"healer release of {folder.name} ({len(files)} files)"
    return (upload or hub_upload)(folder=folder, repo_id=repo_id, private=private, revision=revision,
                                  commit_message=message)
