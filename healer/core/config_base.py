"""The base class every recipe section derives from.

Sections are plain typed data. ``extra="forbid"`` is what turns a typo such as
``prune.ratoi`` into an error naming the key instead of a silently ignored
setting.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
