"""The base class every recipe section derives from.

Sections are plain typed data. ``extra="forbid"`` is what turns a typo such as
``prune.ratoi`` into an error naming the key instead of a silently ignored
setting. ``allow_inf_nan=False`` refuses ``inf`` and ``nan`` wherever a number is read (``cpt.lr: inf``,
``cpt.betas: [nan, 0.9]``), naming the key, instead of a run that trains on NaN.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)
