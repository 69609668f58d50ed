"""Checkpoint files are read as data, never as code.

DeepSpeed writes ``*_model_states.pt`` / ``*_optim_states.pt`` with ``torch.save`` and reads them back with
``torch.load(weights_only=False)``, which unpickles: a file planted on a shared disk or downloaded with a
checkpoint would run whatever its pickle calls. Every load healer makes or lets DeepSpeed make (its
checkpoint engine, ``zero_to_fp32``) goes through :func:`load_states`: ``weights_only=True`` with an
allowlist of the few plain classes DeepSpeed's state holds. Anything else is refused naming the file and
the callable it asked for, before it is called.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from collections.abc import Iterator

import torch

from healer.core.errors import HealerError


def allowed_globals() -> list:
    """The classes a DeepSpeed 0.x checkpoint holds besides tensors and builtins (its loss scaler, the ZeRO
    stage enum, the fragment addresses of a ZeRO-1/2 partition)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")  # torch's WeightsUnpickler names what was asked

_torch_load = torch.load  # the real one, whatever weights_only_loads() puts in its place


def load_states(f, map_location=None, *args, weights_only=None, **kwargs):
    """``torch.load`` of a checkpoint file with ``weights_only=True`` and :func:`allowed_globals`; a file
    that asks for anything else is refused in one line (``weights_only`` given by a caller is overridden)."""
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            return _torch_load(f, map_location, *args, weights_only=True, **kwargs)
        except pickle.UnpicklingError as err:
            found = _GLOBAL.search(str(err))
            what = f"calls {found[1]}" if found else "holds objects that are not tensors or DeepSpeed state"
            raise HealerError(f"{f}: refused to load: its pickle {what}, which no checkpoint healer or DeepSpeed "
                              "writes does, and loading it could run code. Resume from a checkpoint you wrote "
                              "(--resume DIR) or start over (--resume none)") from None


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside, every ``torch.load`` (DeepSpeed's ``load_checkpoint`` and ``zero_to_fp32`` call it with
    ``weights_only=False``) is :func:`load_states`."""
    previous = torch.load
    torch.load = load_states
    try:
        yield
    finally:
        torch.load = previous
