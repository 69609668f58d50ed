"""A tiny `healer cpt` job for the launch tests: a 2-layer random Llama, a small jsonl corpus, ZeRO-2 on CPU.

:func:`reference_run` trains it once per test session, uninterrupted, as `healer launch --nproc 2 cpt`
(one node, two ranks); the loopback and SLURM tests compare their runs against it.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import yaml
from helpers import SAMPLE_TEXT, save_tiny

STEPS = 60  # a few seconds of training: long enough for a preemption signal to land mid-run


def cpt_workspace(root: Path) -> dict[str, Path]:
    student = save_tiny(root, "llama", name="student", layers=2, hidden=32, intermediate=64, heads=4, kv_heads=2)
    rng = random.Random(0)
    words = SAMPLE_TEXT.split()
    corpus = root / "train.jsonl"
    with open(corpus, "w") as fh:
        for _ in range(300):
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))}) + "\n")
    return {"root": root, "student": student, "train": corpus}


def cpt_recipe(ws: dict[str, Path], run_dir: Path, steps: int = STEPS) -> Path:
    """A recipe whose cpt stage writes to ``<run_dir>/cpt``; global batch 4 = 2 ranks x micro 1 x accum 2."""
    recipe = {
        "run_dir": str(run_dir),
        "model": {"source": str(ws["student"])},
        "data": {"sources": [{"path": str(ws["train"])}], "seq_len": 32},
        "cpt": {"zero_stage": 2, "micro_batch_size": 1, "global_batch_size": 4, "max_steps": steps, "lr": 3e-3,
                "warmup_steps": 1, "save_every": 100, "keep_last": 1, "eval_every": 1000,
                # plain CE: the student is model.source itself, so default KD would train on a loss of ~0
                "kd": None},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "cpt" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "cpt" / "hf" / "model.safetensors")


_REFERENCE: dict = {}


def reference_run(tmp_path_factory) -> tuple[dict[str, Path], Path]:
    """The workspace and the run dir of one uninterrupted single-node 2-rank run (made once per session)."""
    if not _REFERENCE:
        root = tmp_path_factory.mktemp("cpt_reference")
        ws = cpt_workspace(root)
        run_dir = root / "one_node"
        recipe = cpt_recipe(ws, run_dir)
        done = subprocess.run([sys.executable, "-m", "healer", "launch", "--nproc", "2", "cpt", str(recipe)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        _REFERENCE.update(ws=ws, run=run_dir)
    return _REFERENCE["ws"], _REFERENCE["run"]
