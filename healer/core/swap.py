"""Directories that appear whole or not at all: built aside, then swapped in.

A stage that writes a directory (a pruned model, a merged or exported checkpoint, a release) builds it in a
fresh ``.<name>.partial-*`` beside the target and renames it into place when it is complete, so the target
holds the old complete directory or the new one, never a mix of both (no file of an earlier result is left
among the new ones). A partial directory carries :data:`PARTIAL_MARK`: only a directory healer marked, or
the old copy it moved aside itself, is ever deleted; a user's ``out.partial`` is never touched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

PARTIAL_MARK = ".healer-partial"


def new_partial_dir(out: str | Path) -> Path:
    """A fresh, uniquely named, marked directory beside ``out`` to build ``out``'s next version in.

    Leftovers of interrupted builds of ``out`` (marked partial directories, old copies moved aside) are
    removed first; the caller holds ``out``'s lock (:class:`healer.core.lock.DirectoryLock`), so none of
    them belongs to a live run.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        if (stale / PARTIAL_MARK).is_file():
            shutil.rmtree(stale, ignore_errors=True)
    for stale in out.parent.glob(f".{out.name}.replaced-*"):
        shutil.rmtree(stale, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    (partial / PARTIAL_MARK).write_text(f"healer builds {out.name} here; deleted when it finishes or restarts\n")
    return partial


def swap_in(partial: str | Path, out: str | Path) -> None:
    """Put the finished ``partial`` (from :func:`new_partial_dir`) at ``out``, replacing what was there.

    The old ``out`` is moved aside before the new one is renamed in, and deleted after: a crash on the way
    leaves the old directory or the new one at ``out`` (or, between the two renames, nothing: the stage then
    runs again), never a mix.
    """
    partial, out = Path(partial), Path(out)
    (partial / PARTIAL_MARK).unlink(missing_ok=True)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.replaced-{uuid.uuid4().hex[:12]}")
        os.rename(out, old)
    os.rename(partial, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
