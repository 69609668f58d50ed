"""Running one verb: the one function both ``healer VERB`` and ``healer run`` call a stage through."""

from __future__ import annotations

from typing import Any

from healer.core.lock import DirectoryLock, is_main_process
from healer.stages import Verb


def invoke(verb: Verb, recipe, opts, inputs: dict[str, Any] | None = None) -> int:
    """Call ``verb`` with ``recipe`` and ``opts``; return its exit code.

    A stage also gets ``inputs``, what its manifest records it is built from (by default its
    :func:`~healer.run.stage_inputs.stage_inputs` under ``recipe``; ``healer run`` passes a round's own),
    and holds its directory's lock on the main process, so two runs never write one stage at once. A
    directory another stage's manifest claims is refused; a finished stage that runs again is marked
    superseded before it writes anything, so an interrupted run never leaves new files under the old
    manifest (a training stage does this itself once it knows it has steps to train). A
    training stage that would resume a finished run whose inputs have changed is refused first (see
    :func:`~healer.run.stage_inputs.refuse_finished_with_other_inputs`).
    """
    func, _ = verb.load()
    if not verb.stage or recipe is None:
        return int(func(recipe, opts) or 0)
    from healer.core.manifest import claim_stage_dir, supersede_stage_manifest
    from healer.run.stage_inputs import refuse_finished_with_other_inputs, stage_inputs

    if inputs is None:
        inputs = stage_inputs(recipe, verb.name)

    def call() -> int:
        if is_main_process():
            claim_stage_dir(recipe.stage_dir(verb.name), verb.name)
            if not verb.trains:  # a training stage retires it itself, once it knows it has work to do
                supersede_stage_manifest(recipe.stage_dir(verb.name))
        # A resume (not --resume none, not cpt's export) continues the finished run's steps.
        if verb.trains_on and getattr(opts, "resume", None) == "auto" and getattr(opts, "action", "train") == "train":
            refuse_finished_with_other_inputs(recipe, verb.name, trains_on=verb.trains_on)
        return int(func(recipe, opts, inputs=inputs) or 0)

    if not is_main_process():
        return call()
    with DirectoryLock(recipe.stage_dir(verb.name), f"healer {verb.name}"):
        return call()
