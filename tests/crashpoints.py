"""Kill a healer verb at each of its filesystem steps, and check what every kill leaves behind.

A *step* is one call that changes a file under the watched directory: an open for writing, a rename or
replace, a delete, a truncate, and the writes done in native code (``torch.save``, safetensors'
``save_file``, a fast tokenizer's ``tokenizer.json``). Python's audit hooks (PEP 578) see every Python-level
call whoever makes it -- healer, transformers, PEFT, DeepSpeed -- and the native writers are wrapped to
announce themselves the same way.

:func:`kill_anywhere` runs one command once per step ``N`` in a process forked from this one and ends that
process with ``os._exit`` (no ``finally``, no atexit: what SIGKILL leaves) right before its ``N``-th step.
Forking from a process that has imported torch, transformers, PEFT and DeepSpeed, and has computed
nothing, costs a fraction of a second per kill instead of an interpreter start.

Run as a script it reads a JSON plan and writes a JSON verdict (the tests and ``bench/kill_anywhere.py``
drive it that way, so the forks never come from a process that has already run torch threads).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

KILLED = 113  # the exit status of a process this module ended (no healer verb exits with it)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
NATIVE = "crashpoints.native_write"
_PATH_EVENTS = {"os.rename": 0, "os.remove": 0, "os.rmdir": 0, "os.truncate": 0, "shutil.rmtree": 0,
                "os.link": 1, "os.symlink": 1, "shutil.move": 0, NATIVE: 0}


def _changed_path(event: str, args: tuple) -> str | None:
    """The path a filesystem event changes, or None when it changes nothing (a read, a directory listing)."""
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
        return os.fsdecode(path) if writes and isinstance(path, (str, bytes, os.PathLike)) else None
    index = _PATH_EVENTS.get(event)
    if index is None or len(args) <= index:
        return None
    path = args[index]
    return os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else None


def _announce_native_writers() -> None:
    """Make the writers that bypass Python's file API raise an audit event first."""
    import safetensors.torch
    import torch
    import transformers.modeling_utils
    from transformers import tokenization_utils_tokenizers

    def announcing(func, path_of):
        def wrapper(*args, **kwargs):
            sys.audit(NATIVE, path_of(args, kwargs))
            return func(*args, **kwargs)
        return wrapper

    second = lambda a, k: a[1] if len(a) > 1 else k.get("f", k.get("filename", ""))  # noqa: E731
    torch.save = announcing(torch.save, second)
    safetensors.torch.save_file = announcing(safetensors.torch.save_file, second)
    transformers.modeling_utils.safe_save_file = announcing(transformers.modeling_utils.safe_save_file, second)
    fast = tokenization_utils_tokenizers.TokenizersBackend
    fast._save_pretrained = announcing(fast._save_pretrained,
                                       lambda a, k: os.path.join(str(a[1] if len(a) > 1 else k["save_directory"]),
                                                                    "tokenizer.json"))


def watch(root: str | Path, on_step) -> None:
    """Call ``on_step(n, event, path)`` before each step that changes a file under ``root`` (n from 1).
    For the life of the process: audit hooks cannot be removed."""
    root = os.path.realpath(root) + os.sep
    count = 0
    busy = False

    def hook(event: str, args: tuple) -> None:
        nonlocal count, busy
        if busy or (event != "open" and event not in _PATH_EVENTS):
            return
        path = _changed_path(event, args)
        if path is None or not os.path.realpath(os.path.abspath(path)).startswith(root):
            return
        busy = True
        try:
            count += 1
            on_step(count, event, path)
        finally:
            busy = False

    _announce_native_writers()
    sys.addaudithook(hook)


# -- what a directory holds --------------------------------------------------------------------------------

def _is_scratch(relative: Path) -> bool:
    """Files no stage reads as a result: hidden temporaries and markers, checkpoints, logs, lock files."""
    return any(part.startswith((".", "checkpoints")) or part in ("logs", "tensorboard") for part in relative.parts)


# Fields and files that record when, how fast or by which process a result was made: two runs from the
# same inputs differ in them and nowhere else.
VOLATILE_KEYS = frozenset({"elapsed_s", "finished_at", "run_id", "started_at", "superseded_at", "wall_s", "created",
                           "seconds", "tokens_per_s", "time", "cpu_time"})
VOLATILE_PREFIXES = ("perf/", "mem/")


def _normalised(path: Path) -> bytes:
    def drop(value):
        if isinstance(value, dict):
            return {k: drop(v) for k, v in value.items() if k not in VOLATILE_KEYS
                    and not k.startswith(VOLATILE_PREFIXES)}
        return [drop(v) for v in value] if isinstance(value, list) else value

    if path.suffix in (".json", ".jsonl"):
        try:
            lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
            return json.dumps([drop(json.loads(line)) for line in lines if line.strip()], sort_keys=True).encode()
        except ValueError:
            pass
    return path.read_bytes()


def digests(directory: str | Path, normalised: bool = False) -> dict[str, str]:
    """sha256 of every result file under ``directory`` (relative path -> hex), scratch files left out; with
    ``normalised``, JSON without :data:`VOLATILE_KEYS` and without the files that only log a run (event files,
    the manifest itself)."""
    directory = Path(directory)
    out = {}
    if not directory.is_dir():
        return out
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if not path.is_file() or _is_scratch(relative):
            continue
        if normalised and (path.name == "manifest.json" or "tfevents" in path.name):
            continue
        data = _normalised(path) if normalised else path.read_bytes()
        out[str(relative)] = hashlib.sha256(data).hexdigest()
    return out


def finished_manifest(stage_dir: str | Path) -> dict | None:
    """The finished manifest in ``stage_dir``; None when there is none (or it is superseded)."""
    try:
        manifest = json.loads((Path(stage_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return None if not isinstance(manifest, dict) or manifest.get("superseded") else manifest


def inputs_hash(manifest: dict | None) -> str | None:
    return ((manifest or {}).get("inputs") or {}).get("hash")


# -- the kill loop ----------------------------------------------------------------------------------------

def _child_output(log: Path) -> None:
    """In a child: send stdout and stderr to ``log`` (kept for the verdict of a failed run)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _run_child(argv: list[str], root: Path, log: Path, on_step=None, sabotage: str | None = None) -> int:
    """Fork, run ``healer ARGV`` in the child with ``on_step`` watching ``root`` (see :func:`watch`) and the
    bug ``sabotage`` planted (see :data:`SABOTAGE`), and return the child's exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _child_output(log)
            _plant(sabotage)
            if on_step is not None:
                watch(root, on_step)
            from healer.cli import main

            code = int(main(argv) or 0)
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else 1
        except BaseException:  # noqa: BLE001 -- a traceback in the child is a failed run, told by its code and log
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _kill_before(n: int):
    def on_step(count, event, path):
        if count == n:
            os._exit(KILLED)
    return on_step


def snapshot(scratch: Path, stage: str) -> dict:
    """What a kill at this moment would leave: the stage's finished manifest (None when there is none), its
    result files as they are and normalised, and the result files of every other directory of the run."""
    stage_dir = scratch / stage
    return {"manifest": finished_manifest(stage_dir), "raw": digests(stage_dir),
            "normalised": digests(stage_dir, normalised=True),
            "others": {d.name: digests(d) for d in sorted(scratch.iterdir())
                       if d.is_dir() and d.name != stage and not d.name.startswith(".")}}


def judge(state: dict, before: dict, after: dict) -> str | None:
    """What is wrong with ``state`` (a :func:`snapshot`), given the snapshots before the verb ran and after it
    ran uninterrupted; None when nothing is.

    The stage directory must hold the previous result, byte for byte, under its finished manifest; or the
    whole new result under a manifest of the new inputs; or no finished manifest at all (the stage then runs
    again). No other directory of the run may have changed.
    """
    manifest = state["manifest"]
    if manifest is not None:
        if before["manifest"] is not None and manifest == before["manifest"]:
            now, expected, which = state["raw"], before["raw"], "old"
        elif inputs_hash(manifest) != inputs_hash(after["manifest"]):
            return "a finished manifest of neither the old inputs nor the new ones"
        else:
            now, expected, which = state["normalised"], after["normalised"], "new"
        if now != expected:
            changed = sorted(k for k in set(now) | set(expected) if now.get(k) != expected.get(k))
            return f"the {which} manifest stands over other files: {changed[:4]}"
    changed = sorted(k for k in set(state["others"]) | set(before["others"])
                     if state["others"].get(k) != before["others"].get(k))
    return f"{changed[0]}/, another directory of the run, changed" if changed else None


def kill_anywhere(argv: list[str], template: Path, scratch: Path, stage: str, kills: int | None = None,
                  recover: bool = True, sabotage: str | None = None) -> dict:
    """Judge what ``healer ARGV`` would leave if it were killed before any one of its steps, in a fresh copy of
    the run directory ``template`` at ``scratch``.

    One uninterrupted run records a :func:`snapshot` right before each step (what a kill there leaves: the
    files are on disk as they are at that moment) and each is judged (:func:`judge`). Then the verb is really
    killed -- ``os._exit`` in a forked child -- before ``kills`` of its steps spread over the run (all when
    None; always the last two), each state judged again and, with ``recover``, the verb run again on it: it
    must exit 0 with the uninterrupted result.
    """
    log = scratch.with_name(scratch.name + f".{stage}.log")

    def fresh() -> None:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(template, scratch, symlinks=True)

    fresh()
    before = snapshot(scratch, stage)
    listing = log.with_suffix(".steps")
    listing.unlink(missing_ok=True)

    def record(n, event, path):
        with open(listing, "a") as fh:  # outside ``scratch``: not a step itself
            fh.write(json.dumps({"what": f"{event} {os.path.relpath(path, scratch)}",
                                 "state": snapshot(scratch, stage)}) + "\n")

    code = _run_child(argv, scratch, log, record, sabotage)
    if code != 0:
        return {"stage": stage, "argv": argv, "error": f"the uninterrupted run exited {code}",
                "log": log.read_text()[-3000:]}
    after = snapshot(scratch, stage)
    steps = [json.loads(line) for line in listing.read_text().splitlines()] if listing.is_file() else []
    bad = [{"step": n, "what": step["what"], "problem": problem, "how": "checked"}
           for n, step in enumerate(steps, 1) if (problem := judge(step["state"], before, after)) is not None]
    total = len(steps)
    points = set(range(1, total + 1)) if kills is None else {1 + round(i * (total - 1) / max(kills - 1, 1))
                                                              for i in range(kills)}
    points = sorted((points | {total - 1, total}) & set(range(1, total + 1)))
    recovered = 0
    for n in points:
        fresh()
        code = _run_child(argv, scratch, log, _kill_before(n), sabotage)
        problem = f"not killed: exited {code}" if code != KILLED else judge(snapshot(scratch, stage), before, after)
        if problem is None and recover:
            code = _run_child(argv, scratch, log, sabotage=sabotage)
            final = snapshot(scratch, stage)
            if code != 0:
                problem = f"the run after the kill exited {code}: {log.read_text()[-500:]}"
            elif final["normalised"] != after["normalised"] or inputs_hash(final["manifest"]) != inputs_hash(
                    after["manifest"]):
                changed = sorted(k for k in set(final["normalised"]) | set(after["normalised"])
                                 if final["normalised"].get(k) != after["normalised"].get(k))
                problem = f"the run after the kill built another result: {changed[:4] or 'its manifest'}"
            else:
                recovered += 1
        if problem is not None:
            bad.append({"step": n, "what": steps[n - 1]["what"], "problem": problem, "how": "killed"})
    return {"stage": stage, "argv": argv, "steps": total, "checked": total, "killed": len(points),
            "recovered": recovered, "bad": bad}


# -- the plan ----------------------------------------------------------------------------------------------

def tiny_pipeline(tmp_path: Path) -> Path:
    """A recipe running every stage on a tiny llama (4 blocks): depth prune, 4 steps of KD-CPT, 2 of LoRA SFT,
    eval against the dense model, release; its run directory is ``tmp_path/run``."""
    from helpers import depth_prune_section, tiny_recipe, write_calibration, write_pipeline_inputs

    corpus, heldout, instruct = write_pipeline_inputs(tmp_path)
    calibration = write_calibration(tmp_path / "calib.jsonl")
    recipe, _ = tiny_recipe(tmp_path, depth_prune_section(calibration, num_blocks=1), f"""
        data:
          sources: [{{path: {corpus}}}]
          seq_len: 32
        cpt:
          micro_batch_size: 2
          global_batch_size: 2
          max_steps: 4
          warmup_steps: 1
          save_every: 2
          kd: {{alpha: 0.5, temperature: 2.0}}
        sft:
          data: {instruct}
          micro_batch_size: 4
          global_batch_size: 4
          max_steps: 2
          max_seq_len: 320
        eval:
          perplexity_files: [{heldout}]
          context_lengths: [32]
          compare_to: dense
        release: {{model_name: tiny-healed}}
    """)
    return recipe


def run_plan(tmp_path: Path, plan: dict, timeout: int = 900) -> list[dict]:
    """Run ``plan`` (see :func:`main`) in a fresh interpreter -- its forks must come from a process that has run
    no torch threads -- and return the verdict."""
    import subprocess

    plan_file, verdict_file = tmp_path / "plan.json", tmp_path / "verdict.json"
    plan_file.write_text(json.dumps(plan))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, __file__, str(plan_file), str(verdict_file)],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    if done.returncode != 0:
        raise RuntimeError(f"crashpoints.py exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(verdict_file.read_text())


# (stage, flags that change its inputs): each verb re-run over its own finished result, as a user changing the
# recipe does; a training stage with --resume none (it trains again from its input).
RERUNS = {
    "prune": ["--prune.num_blocks", "2"],
    "cpt": ["--cpt.lr", "0.001", "--resume", "none"],
    "sft": ["--sft.lr", "0.001", "--resume", "none"],
    "eval": ["--eval.context_lengths", "[16]"],
    "release": ["--release.license", "mit"],
}


# Deliberate bugs a case may plant in its children, to show the judge sees what it is for.
SABOTAGE = {
    # a verb that re-scores under the old manifest instead of retiring it first
    "keep_old_manifest": ("healer.core.manifest", "supersede_stage_manifest", lambda *args, **kwargs: None),
}


def _plant(name: str | None) -> None:
    if name is not None:
        import importlib

        module, attribute, replacement = SABOTAGE[name]
        setattr(importlib.import_module(module), attribute, replacement)


def main(plan_path: str, verdict_path: str) -> int:
    """``python crashpoints.py PLAN.json VERDICT.json``.

    The plan: ``run_dir`` (the recipe's), ``template`` (where the finished run is kept), ``setup`` (healer
    command lines run first, in order, to build the finished run) and ``cases``, each ``stage``, ``argv``,
    optionally ``kills`` (how many real kills; all steps when absent), ``recover`` (default true), ``fresh``
    (the stage's directory removed first: its first run is killed, not a re-run) and ``sabotage`` (a key of
    :data:`SABOTAGE`). The verdict: one :func:`kill_anywhere` result per case.
    """
    import torch

    torch.set_num_threads(1)
    # Imported once here so each fork starts with them loaded (and nothing computed).
    import deepspeed  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import healer.cli  # noqa: F401
    from healer.run import pipeline  # noqa: F401

    plan = json.loads(Path(plan_path).read_text())
    run_dir, template = Path(plan["run_dir"]), Path(plan["template"])
    for argv in plan.get("setup", []):
        code = _run_child(argv, run_dir.parent, run_dir.with_name("setup.log"))
        if code != 0:
            raise SystemExit(f"setup {argv} exited {code}:\n{run_dir.with_name('setup.log').read_text()[-3000:]}")
    if plan.get("setup"):
        shutil.rmtree(template, ignore_errors=True)
        shutil.copytree(run_dir, template, symlinks=True)
    results = []
    for case in plan["cases"]:
        source = template
        if case.get("fresh"):
            source = template.with_name(template.name + f".without-{case['stage']}")
            shutil.rmtree(source, ignore_errors=True)
            shutil.copytree(template, source, symlinks=True)
            shutil.rmtree(source / case["stage"])
        result = kill_anywhere(case["argv"], source, run_dir, case["stage"], kills=case.get("kills"),
                               recover=case.get("recover", True), sabotage=case.get("sabotage"))
        results.append({**result, "fresh": bool(case.get("fresh")), "sabotage": case.get("sabotage")})
        print(json.dumps(results[-1]), flush=True)
    Path(verdict_path).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
