"""Hostile-input matrix: run the real CLI on bad input, faults and concurrency; count verdicts.

Each probe builds what it needs in a temporary directory (a tiny random model, a corpus, a recipe), runs
``python -m healer ...`` in a subprocess with a timeout and classifies the outcome:

- ``clear-error``: exit != 0, the last stderr line is one line and no Traceback reached the user
- ``correct``: exit 0 and the probe verified the result
- ``silently-wrong``: exit 0 (or a refusal the probe knows is wrong) with a wrong result
- ``stack-dump``: a Traceback reached the user
- ``hang``: the timeout fired

    python bench/hostile_probes.py                 # every probe (CPU-heavy: about 20-30 minutes on 2 cores)
    python bench/hostile_probes.py -k slurm -k eval  # probes whose class or name contains a word
    python bench/hostile_probes.py --list

A probe that expects a refusal but sees exit 0 checks the result; where exit 0 is also acceptable the probe
says what it verified. Nothing here downloads anything.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

VERDICTS = ("clear-error", "correct", "silently-wrong", "stack-dump", "hang")
ENV = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
           OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
for _key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HEALER_FAULT"):
    ENV.pop(_key, None)


@dataclass
class Result:
    rc: int | None  # None: timed out
    out: str
    err: str
    wall: float
    peak_rss_mb: float = 0.0


@dataclass
class Probe:
    cls: str
    name: str
    fn: Callable[[Path], tuple[str, str]]


PROBES: list[Probe] = []


def probe(cls: str):
    def register(fn):
        PROBES.append(Probe(cls, fn.__name__.removeprefix("p_"), fn))
        return fn
    return register


def cli(*args: str, cwd: Path | None = None, timeout: float = 240, env: dict | None = None) -> Result:
    """Run ``python -m healer ARGS``; a timeout kills the process group and returns rc None."""
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "healer", *map(str, args)], cwd=cwd, env=env or ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        rc = None
    return Result(rc, out, err, time.time() - start)


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def refusal(res: Result, *, names: tuple[str, ...] = (), ok: Callable[[], bool] | None = None) -> tuple[str, str]:
    """A probe that expects a refusal: exit != 0 with one clear line (naming ``names``), or, where ``ok`` is
    given, exit 0 with a result ``ok`` verifies."""
    if res.rc is None:
        return "hang", f"no answer in {res.wall:.0f}s"
    if "Traceback (most recent call last)" in res.err or "Traceback (most recent call last)" in res.out:
        tail = res.err.strip().splitlines()[-1:] or [""]
        return "stack-dump", tail[0][:200]
    line = last_line(res.err) or last_line(res.out)
    if res.rc != 0:
        missing = [n for n in names if n.lower() not in (res.err + res.out).lower()]
        if missing or "panicked" in res.err:
            return "stack-dump" if "panicked" in res.err else "silently-wrong", \
                f"refused but does not name {missing}: {line[:200]}"
        return "clear-error", line[:200]
    if ok is not None:
        try:
            good = ok()
        except Exception as err:  # the check itself failing means the result is not what it should be
            good, line = False, f"check failed: {type(err).__name__}: {err}"
        return ("correct", line[:160]) if good else ("silently-wrong", f"exit 0, result wrong: {line[:160]}")
    return "silently-wrong", f"exit 0 where a refusal was due: {line[:160]}"


def refusals(cls: str, rows: list[tuple]) -> None:
    """Register probes that only expect a refusal: one ``(name, run, names)`` row each, ``run(d)`` the command
    on the probe's directory, ``names`` what its one-line error must mention (or ``names(d)``)."""
    for name, run, names in rows:
        PROBES.append(Probe(cls, name, lambda d, run=run, names=names:
                            refusal(run(d), names=names(d) if callable(names) else names)))


def success(res: Result, ok: Callable[[], bool]) -> tuple[str, str]:
    """A probe that expects the run to succeed with a verified result (a clear refusal also counts as one)."""
    return refusal(res, ok=ok)


# ----------------------------------------------------------------------------------------------------- fixtures

class Fixtures:
    """Things built once per session and copied into each probe's directory when needed."""

    def __init__(self, root: Path):
        self.root = root
        from helpers import SAMPLE_TEXT, save_tiny
        self.text = SAMPLE_TEXT
        self.model = save_tiny(root, "llama", layers=4, hidden=32, intermediate=64)
        self.calib = root / "calib.jsonl"
        self.calib.write_text("".join(json.dumps({"text": f"Document {i}. " + SAMPLE_TEXT * 2}) + "\n"
                                      for i in range(20)))
        self.corpus = root / "corpus"
        self.corpus.mkdir()
        for shard in range(2):
            (self.corpus / f"part_{shard}.jsonl").write_text("".join(
                json.dumps({"text": f"Shard {shard} doc {i}. " + SAMPLE_TEXT,
                            "meta": {"redpajama_set_name": "Tiny"}}) + "\n"
                for i in range(30)))
        self.heldout = root / "heldout.txt"
        self.heldout.write_text(SAMPLE_TEXT * 20)
        self.instruct = root / "instruct.json"
        self.instruct.write_text(json.dumps([{"instruction": f"Repeat {i}.", "input": "", "output": f"{i}"}
                                             for i in range(8)]))
        self._cpt_base: Path | None = None

    def recipe(self, d: Path, extra: str = "", name: str = "recipe.yaml", **fields) -> Path:
        text = textwrap.dedent(f"""\
            name: probe
            run_dir: {d / 'run'}
            model: {{source: {self.model}}}
            data:
              sources: [{{path: {self.corpus}}}]
              seq_len: 32
            """) + textwrap.dedent(extra)
        path = d / name
        path.write_text(text)
        return path

    def cpt_recipe(self, d: Path, stage: Path, **over) -> Path:
        cpt = {"output": str(stage), "zero_stage": 2, "micro_batch_size": 2, "global_batch_size": 2, "max_steps": 2,
               "save_every": 1, "warmup_steps": 0, "schedule": "constant", "eval_every": 1000, "lr": 1e-4}
        cpt.update(over.pop("cpt", {}))
        import yaml
        recipe = {"name": "probe", "run_dir": str(d / "run"), "model": {"source": str(self.model)},
                  "data": {"sources": [{"path": str(over.pop("corpus", self.corpus))}],
                           "seq_len": over.pop("seq_len", 32)},
                  "cpt": cpt}
        path = d / over.pop("name", "cpt.yaml")
        path.write_text(yaml.safe_dump(recipe))
        return path

    def cpt_base(self) -> Path:
        """A finished 2-step cpt stage (checkpoints at steps 1 and 2) on a private copy of the corpus."""
        if self._cpt_base is None:
            d = self.root / "cpt_base"
            d.mkdir()
            shutil.copytree(self.corpus, d / "corpus")
            res = cli("cpt", "--config", self.cpt_recipe(d, d / "cpt", corpus=d / "corpus"), timeout=400)
            if res.rc != 0:
                raise RuntimeError("base cpt run failed:\n" + res.err[-3000:])
            self._cpt_base = d
        return self._cpt_base

    def cpt_copy(self, d: Path) -> tuple[Path, Path]:
        """A copy of the base cpt stage in ``d``; returns (stage dir, the base's corpus dir).

        The corpus stays where the checkpoints were written from: its path is one of the recorded settings.
        """
        base = self.cpt_base()
        shutil.copytree(base / "cpt", d / "cpt", symlinks=True)
        return d / "cpt", base / "corpus"


FX: Fixtures


def metrics(stage: Path) -> list[dict]:
    path = stage / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def layers(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]


def prune(d: Path, *args: str, timeout: float = 240) -> Result:
    # keep_first/keep_last 0: the ppl defaults (4 and 2) leave nothing to remove from a 4-block model
    return cli("prune", "--model", FX.model, "--criterion", "magnitude", "--keep-first", "0", "--keep-last", "0",
               "--run-dir", d / "run", *args, timeout=timeout)


# ------------------------------------------------------------------------------------------------------ recipe

@probe("recipe")
def p_binary_recipe(d):
    (d / "r.yaml").write_bytes(bytes(range(256)) * 8)
    return refusal(cli("prune", d / "r.yaml"), names=("r.yaml",))


@probe("recipe")
def p_non_utf8_recipe(d):
    (d / "r.yaml").write_bytes("name: caf\u00e9\nmodel: {source: x}\n".encode("latin-1"))
    return refusal(cli("prune", d / "r.yaml"), names=("r.yaml",))


refusals('recipe', [
    ('unknown_top_key', lambda d: cli("prune", FX.recipe(d, "promne: {ratio: 0.5}\n")), ("promne",)),
    ('unknown_nested_key', lambda d: cli("prune", FX.recipe(d, "prune: {ratoi: 0.5}\n")), ("ratoi",)),
    ('wrong_type', lambda d: cli("prune", FX.recipe(d, "prune: {ratio: lots}\n")), ("prune.ratio",)),
    ('wrong_type_override', lambda d: cli("cpt", FX.recipe(d), "--cpt.max_steps", "ten"), ("cpt.max_steps",)),
    ('unknown_override', lambda d: cli("prune", FX.recipe(d), "--prune.nope", "1"), ("prune.nope",)),
    ('recipe_is_directory', lambda d: cli("prune", d), lambda d: (str(d),)),
    ('recipe_missing', lambda d: cli("prune", d / "nope.yaml"), ("nope.yaml",)),
])


@probe("recipe")
def p_recipe_empty(d):
    (d / "r.yaml").write_text("")
    return refusal(cli("prune", d / "r.yaml"), names=("r.yaml",))


@probe("recipe")
def p_recipe_top_level_list(d):
    (d / "r.yaml").write_text("- a\n- b\n")
    return refusal(cli("prune", d / "r.yaml"), names=("r.yaml",))


@probe("recipe")
def p_recipe_yaml_syntax(d):
    (d / "r.yaml").write_text("model: {source: [x\n")
    return refusal(cli("prune", d / "r.yaml"), names=("r.yaml",))


@probe("recipe")
def p_recipe_duplicate_section(d):
    # YAML would keep only the second `prune:`; the user meant both keys.
    path = FX.recipe(d, "prune: {method: depth, num_blocks: 1, criterion: magnitude}\nprune: {output: %s}\n"
                     % (d / "out"))
    res = cli("prune", path)
    return refusal(res, names=("prune",), ok=lambda: layers(d / "out") == 3)


@probe("recipe")
def p_newline_in_name(d):
    # A newline in the release name must not break the model card's front matter.
    path = FX.recipe(d, f'release: {{input: {FX.model}, output: {d / "rel"}, model_name: "evil\\nlicense: mit"}}\n')
    res = cli("release", path)

    def ok():
        import yaml
        card = (d / "rel" / "README.md").read_text()
        front = yaml.safe_load(card.split("---")[1])
        return front.get("license") != "mit"
    return refusal(res, names=("model_name",), ok=ok)


@probe("recipe")
def p_newline_in_run_dir_override(d):
    res = prune(d, "--num-blocks", "1", "--output", str(d / "out\nx"))
    return refusal(res, names=("output",), ok=lambda: layers(d / "out\nx") == 3)


refusals('recipe', [
    ('undefined_interpolation', lambda d: cli("prune", FX.recipe(d, "prune: {output: '${nowhere}/p'}\n")),
     ("nowhere",)),
    ('bad_dtype', lambda d: prune(d, "--num-blocks", "1", "--dtype", "float8"), ("dtype",)),
    ('global_batch_not_divisible',
     lambda d: cli("cpt", FX.recipe(d, "cpt: {micro_batch_size: 3, global_batch_size: 4}\n")),
     ("global_batch_size",)),
    ('unknown_verb', lambda d: cli("prun", FX.recipe(d)), ("prun",)),
    ('two_recipes', lambda d: cli("prune", FX.recipe(d), "--config", FX.recipe(d, name="b.yaml")), ("recipe",)),
])


# ------------------------------------------------------------------------------------------------ launch/SLURM

def slurm(d: Path, *extra: str, recipe_extra: str = "") -> Result:
    return cli("launch", "cpt", FX.recipe(d, recipe_extra), "--slurm", "--dry-run", *extra)


refusals('slurm', [
    ('partition_newline', lambda d: slurm(d, recipe_extra='launch: {slurm: {partition: "gpu\\nrm -rf ~"}}\n'),
     ("partition",)),
    ('partition_trailing_newline', lambda d: slurm(d, recipe_extra='launch: {slurm: {partition: "gpu\\n"}}\n'),
     ("partition",)),
    ('account_semicolon', lambda d: slurm(d, "--launch.slurm.account", "a;touch x"), ("account",)),
    ('qos_space', lambda d: slurm(d, "--launch.slurm.qos", "high prio"), ("qos",)),
    ('time_garbage', lambda d: slurm(d, "--launch.slurm.time", "tomorrow"), ("time",)),
    ('constraint_subshell', lambda d: slurm(d, "--launch.slurm.constraint", "$(id)"), ("constraint",)),
    ('mem_garbage', lambda d: slurm(d, "--launch.slurm.mem", "lots"), ("mem",)),
    ('extra_sbatch_space', lambda d: slurm(d, recipe_extra='launch: {slurm: {extra_sbatch: ["--exclusive --x"]}}\n'),
     ("extra_sbatch",)),
    ('extra_sbatch_newline',
     lambda d: slurm(d, recipe_extra='launch: {slurm: {extra_sbatch: ["--exclusive\\ntouch x"]}}\n'),
     ("extra_sbatch",)),
])


@probe("slurm")
def p_setup_newline(d):
    # one setup item is one line; a newline inside it is a second line the user did not see as one
    res = slurm(d, recipe_extra='launch: {slurm: {setup: ["module load cuda\\n#SBATCH --qos=high"]}}\n')
    return refusal(res, names=("setup",), ok=lambda: "#SBATCH --qos=high" not in res.out)


refusals('slurm', [
    ('env_key_not_identifier', lambda d: slurm(d, recipe_extra='launch: {env: {"A B": "1"}}\n'), ("launch.env",)),
    ('env_key_subshell', lambda d: slurm(d, recipe_extra='launch: {env: {"X$(touch pwned)": "1"}}\n'), ("launch.env",)),
])


@probe("slurm")
def p_env_value_secret_not_in_script(d):
    secret = "hf_SECRETSECRETSECRET123456"
    res = slurm(d, recipe_extra=f'launch: {{env: {{HF_TOKEN: "{secret}"}}}}\n')
    return success(res, ok=lambda: secret not in res.out + res.err and "HF_TOKEN" in res.out)


def _run_script_with_stub_slurm(d: Path, script: str) -> None:
    """Run a rendered sbatch script with srun failing and scontrol failing (the requeue path)."""
    bin_dir = d / "stubs"
    bin_dir.mkdir()
    for tool, rc in (("srun", 1), ("scontrol", 1)):
        (bin_dir / tool).write_text(f"#!/bin/sh\nexit {rc}\n")
        (bin_dir / tool).chmod(0o755)
    (d / "job.sh").write_text(script)
    env = dict(ENV, PATH=f"{bin_dir}:{ENV['PATH']}", SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="1")
    subprocess.run(["bash", str(d / "job.sh")], cwd=d, env=env, capture_output=True, timeout=60)


@probe("slurm")
def p_run_dir_subshell(d):
    marker = d / "pwned"
    run_dir = d / f"run$(touch {marker})"
    res = cli("launch", "cpt", FX.recipe(d), "--slurm", "--dry-run", "--run-dir", run_dir)

    def ok():
        script = res.out[res.out.index("#!/bin/bash"):]
        _run_script_with_stub_slurm(d, script)
        return not marker.exists()
    return refusal(res, ok=ok)


@probe("slurm")
def p_run_dir_quote(d):
    marker = d / "pwned2"
    res = cli("launch", "cpt", FX.recipe(d), "--slurm", "--dry-run", "--run-dir", f"{d}/r'; touch {marker}; '")

    def ok():
        script = res.out[res.out.index("#!/bin/bash"):]
        _run_script_with_stub_slurm(d, script)
        return not marker.exists()
    return refusal(res, ok=ok)


refusals('slurm', [
    ('master_port_range', lambda d: slurm(d, "--master-port", "99999"), ("master-port",)),
    ('gpus_negative', lambda d: slurm(d, "--gpus-per-node", "-2"), ("gpus_per_node",)),
])


refusals('launch', [
    ('nproc_zero', lambda d: cli("launch", "cpt", FX.recipe(d), "--nproc", "0", "--dry-run"), ("nproc",)),
    ('launch_unknown_stage', lambda d: cli("launch", "train", FX.recipe(d), "--dry-run"), ("train",)),
    ('launch_stray_argument', lambda d: cli("launch", "cpt", FX.recipe(d), "extra", "--dry-run"), ("extra",)),
])


# ---------------------------------------------------------------------------------------------------- hostfile

def hostfile(d: Path, content: bytes | str, *extra: str) -> Result:
    path = d / "hosts"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return cli("launch", "cpt", FX.recipe(d), "--hostfile", path, "--dry-run", *extra)


refusals('hostfile', [
    ('host_dash', lambda d: hostfile(d, "-oProxyCommand=touch_pwned slots=1\n"), ("hosts",)),
    ('hostfile_binary', lambda d: hostfile(d, bytes(range(256))), ("hosts",)),
    ('hostfile_non_utf8', lambda d: hostfile(d, "n\u00f6de1 slots=1\n".encode("latin-1")), ("hosts",)),
    ('hostfile_bad_slots', lambda d: hostfile(d, "node1 slots=two\n"), ("hosts",)),
])


@probe("hostfile")
def p_hostfile_empty(d):
    return refusal(hostfile(d, "# nothing\n"), names=("hosts",))


refusals('hostfile', [
    ('hostfile_missing', lambda d: cli("launch", "cpt", FX.recipe(d), "--hostfile", d / "nope", "--dry-run"),
     ("nope",)),
    ('hostfile_semicolon_host', lambda d: hostfile(d, "node1;touch_x slots=1\n"), ("hosts",)),
    ('hostfile_duplicate_host', lambda d: hostfile(d, "node1 slots=1\nnode1 slots=1\n"), ("node1",)),
])


@probe("hostfile")
def p_hostfile_key_checking_default(d):
    # The default must keep ssh's host key check on; `no` is an opt-in.
    res = hostfile(d, "node1 slots=1\nnode2 slots=1\n")
    return success(res, ok=lambda: "StrictHostKeyChecking=no" not in res.out)


# ------------------------------------------------------------------------------------------------------- prune

@probe("prune")
def p_output_equals_input(d):
    model = d / "m"
    shutil.copytree(FX.model, model)
    res = cli("prune", "--model", model, "--criterion", "magnitude", "--num-blocks", "1", "--output", model,
              "--run-dir", d / "run")
    return refusal(res, names=(str(model),), ok=lambda: False)


@probe("prune")
def p_output_inside_input(d):
    model = d / "m"
    shutil.copytree(FX.model, model)
    res = cli("prune", "--model", model, "--criterion", "magnitude", "--num-blocks", "1", "--output", model / "p",
              "--run-dir", d / "run")
    return refusal(res, ok=lambda: layers(model) == 4 and layers(model / "p") == 3)


refusals('prune', [
    ('blocks_empty', lambda d: prune(d, "--blocks", "[]", "--output", d / "out"), ("blocks",)),
    ('blocks_out_of_range', lambda d: prune(d, "--blocks", "[9]", "--output", d / "out"), ("blocks",)),
])


@probe("prune")
def p_blocks_duplicate(d):
    res = prune(d, "--blocks", "[1, 1]", "--output", d / "out")
    return refusal(res, names=("blocks",), ok=lambda: layers(d / "out") == 3)


refusals('prune', [
    ('blocks_negative', lambda d: prune(d, "--blocks", "[-1]", "--output", d / "out"), ("blocks",)),
    ('all_blocks', lambda d: prune(d, "--num-blocks", "4", "--output", d / "out"), ("num_blocks",)),
    ('ratio_above_one', lambda d: prune(d, "--ratio", "1.5", "--output", d / "out"), ("ratio",)),
    ('ratio_negative', lambda d: prune(d, "--ratio", "-0.2", "--output", d / "out"), ("ratio",)),
    ('ratio_and_blocks', lambda d: prune(d, "--ratio", "0.25", "--num-blocks", "2", "--output", d / "out"), ("ratio",)),
])


@probe("prune")
def p_dry_run_flag(d):
    res = prune(d, "--num-blocks", "1", "--output", d / "out", "--dry-run")
    return refusal(res, names=("--dry-run",), ok=lambda: not (d / "out").exists())


@probe("prune")
def p_stray_positional(d):
    res = cli("prune", FX.recipe(d, f"prune: {{criterion: magnitude, num_blocks: 1, output: {d / 'out'}}}\n"),
              "oops")
    return refusal(res, names=("oops",))


@probe("prune")
def p_calib_seq_len_above_max_positions(d):
    res = prune(d, "--criterion", "ppl", "--calibration", FX.calib, "--num-blocks", "1", "--seq-len", "4096",
                "--num-samples", "2", "--output", d / "out")
    return refusal(res, names=("seq_len",))


@probe("prune")
def p_output_is_a_file(d):
    (d / "out").write_text("precious")
    res = prune(d, "--criterion", "ppl", "--calibration", FX.calib, "--num-samples", "2", "--seq-len", "32",
                "--num-blocks", "1", "--output", d / "out")
    quick = res.wall < 60
    verdict = refusal(res, names=("out",))
    if verdict[0] == "clear-error" and (d / "out").read_text() != "precious":
        return "silently-wrong", "refused but the file was changed"
    return verdict[0], verdict[1] + ("" if quick else f" (after {res.wall:.0f}s)")


refusals('prune', [
    ('unknown_criterion', lambda d: prune(d, "--criterion", "vibes", "--num-blocks", "1"), ("vibes",)),
    ('calibration_missing',
     lambda d: prune(d, "--criterion", "ppl", "--num-blocks", "1", "--calibration", d / "nope.jsonl"),
     ("nope.jsonl",)),
])


@probe("prune")
def p_calibration_binary(d):
    (d / "c.jsonl").write_bytes(bytes(range(256)) * 40)
    return refusal(prune(d, "--criterion", "ppl", "--num-blocks", "1", "--calibration", d / "c.jsonl",
                         "--seq-len", "32", "--num-samples", "2"), names=("c.jsonl",))


@probe("prune")
def p_calibration_non_utf8_txt(d):
    (d / "c.txt").write_bytes(("caf\u00e9 " * 400 + "\n").encode("latin-1") * 5)
    res = prune(d, "--criterion", "ppl", "--num-blocks", "1", "--calibration", d / "c.txt", "--seq-len", "32",
                "--num-samples", "2", "--output", d / "out")
    return refusal(res, names=("c.txt",), ok=lambda: layers(d / "out") == 3)


refusals('prune', [
    ('calibration_wrong_field', lambda d: prune(d, "--criterion", "ppl", "--num-blocks", "1", "--calibration", FX.calib,
                         "--prune.calibration.text_field", "body", "--seq-len", "32", "--num-samples", "2"),
     ("body",)),
])


@probe("prune")
def p_calibration_empty(d):
    (d / "c.jsonl").write_text("")
    return refusal(prune(d, "--criterion", "ppl", "--num-blocks", "1", "--calibration", d / "c.jsonl",
                         "--seq-len", "32", "--num-samples", "2"), names=("c.jsonl",))


refusals('prune', [
    ('width_ratio_all', lambda d: prune(d, "--method", "width", "--criterion", "maw", "--ratio", "1.0"), ("ratio",)),
])


@probe("prune")
def p_prune_twice_changed_ratio(d):
    # a second prune into the same output with another setting: redo it or refuse, never keep the old weights
    first = prune(d, "--num-blocks", "1", "--output", d / "out")
    if first.rc != 0:
        return refusal(first)
    res = prune(d, "--num-blocks", "2", "--output", d / "out")
    return refusal(res, names=("out",), ok=lambda: layers(d / "out") == 2)


@probe("prune")
def p_prune_depth_then_width_same_output(d):
    first = prune(d, "--num-blocks", "1", "--output", d / "out")
    if first.rc != 0:
        return refusal(first)
    res = prune(d, "--method", "width", "--criterion", "maw", "--ratio", "0.5", "--round-to", "32",
                "--output", d / "out")

    def ok():
        cfg = json.loads((d / "out" / "config.json").read_text())
        return cfg["num_hidden_layers"] == 4 and cfg["intermediate_size"] == 32
    return refusal(res, names=("out",), ok=ok)


# ------------------------------------------------------------------------------------------------- model files

def broken_model(d: Path, edit: Callable[[Path], None]) -> Path:
    model = d / "m"
    shutil.copytree(FX.model, model)
    edit(model)
    return model


def prune_model(d: Path, model: Path, *extra) -> Result:
    return cli("prune", "--model", model, "--criterion", "magnitude", "--num-blocks", "1", "--output", d / "out",
               "--run-dir", d / "run", *extra)


@probe("model")
def p_truncated_safetensors(d):
    def edit(m):
        p = m / "model.safetensors"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return refusal(prune_model(d, broken_model(d, edit)), names=("model.safetensors",))


refusals('model', [
    ('garbage_safetensors',
     lambda d: prune_model(d, broken_model(d, lambda m: (m / "model.safetensors").write_bytes(b"\xff" * 4096))),
     ("model.safetensors",)),
])


@probe("model")
def p_safetensors_bad_header(d):
    def edit(m):
        header = b'{"model.embed_tokens.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 99999]}}'
        (m / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    return refusal(prune_model(d, broken_model(d, edit)), names=("model.safetensors",))


refusals('model', [
    ('config_invalid_json',
     lambda d: prune_model(d, broken_model(d, lambda m: (m / "config.json").write_text("{not json"))),
     ("config.json",)),
    ('config_binary',
     lambda d: prune_model(d, broken_model(d, lambda m: (m / "config.json").write_bytes(bytes(range(256))))),
     ("config.json",)),
])


@probe("model")
def p_config_unknown_architecture(d):
    def edit(m):
        cfg = json.loads((m / "config.json").read_text())
        cfg["model_type"] = "mamba_xl"
        (m / "config.json").write_text(json.dumps(cfg))
    return refusal(prune_model(d, broken_model(d, edit)), names=("mamba_xl",))


@probe("model")
def p_config_layers_mismatch(d):
    def edit(m):
        cfg = json.loads((m / "config.json").read_text())
        cfg["num_hidden_layers"] = 6
        (m / "config.json").write_text(json.dumps(cfg))
    return refusal(prune_model(d, broken_model(d, edit)), names=("m",))


refusals('model', [
    ('missing_weights', lambda d: prune_model(d, broken_model(d, lambda m: (m / "model.safetensors").unlink())),
     ("m",)),
])


@probe("model")
def p_corrupt_gguf(d):
    (d / "x.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 10)
    return refusal(prune_model(d, d / "x.gguf"), names=("x.gguf",))


@probe("model")
def p_truncated_gguf(d):
    (d / "y.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    return refusal(prune_model(d, d / "y.gguf"), names=("y.gguf",))


@probe("model")
def p_model_is_text_file(d):
    (d / "model.bin").write_text("hello")
    return refusal(prune_model(d, d / "model.bin"), names=("model.bin",))


refusals('model', [
    ('model_missing_offline', lambda d: prune_model(d, d / "no_such_model"), ("no_such_model",)),
    ('tokenizer_corrupt',
     lambda d: prune_model(d, broken_model(d, lambda m: (m / "tokenizer.json").write_text("{oops"))),
     ("tokenizer",)),
])


# -------------------------------------------------------------------------------------------------------- eval

def evaluate(d: Path, files: list[Path], *extra: str, output: Path | None = None) -> tuple[Result, Path]:
    out = output or d / "ev"
    recipe = FX.recipe(d, f"eval: {{perplexity_files: {json.dumps([str(f) for f in files])}, "
                          f"context_lengths: [32], max_tokens: 512}}\n")
    return cli("eval", recipe, "--input", FX.model, "--output", out, *extra), out


def ppl_entries(out: Path) -> list:
    report = json.loads((out / "eval.json").read_text())
    ppl = report.get("perplexity", report)
    return list(ppl.items()) if isinstance(ppl, dict) else list(ppl)


@probe("eval")
def p_ppl_same_basename(d):
    (d / "a").mkdir()
    (d / "b").mkdir()
    (d / "a" / "x.txt").write_text(FX.text * 10)
    (d / "b" / "x.txt").write_text("completely different words here. " * 200)
    res, out = evaluate(d, [d / "a" / "x.txt", d / "b" / "x.txt"])

    def ok():
        text = (out / "eval.json").read_text()
        return str(d / "a" / "x.txt") in text or (text.count("x.txt") >= 2 and len(ppl_entries(out)) >= 2)
    return success(res, ok)


@probe("eval")
def p_ppl_jsonl_gz(d):
    lines = "".join(json.dumps({"text": FX.text * 3}) + "\n" for _ in range(5))
    (d / "p.jsonl").write_text(lines)
    (d / "g").mkdir()
    with gzip.open(d / "g" / "p.jsonl.gz", "wt") as fh:
        fh.write(lines)
    res, out = evaluate(d, [d / "p.jsonl", d / "g" / "p.jsonl.gz"])

    def ok():
        numbers = []
        def walk(x):
            if isinstance(x, dict):
                for k, v in x.items():
                    if k in ("ppl", "perplexity") and isinstance(v, (int, float)):
                        numbers.append(v)
                    else:
                        walk(v)
            elif isinstance(x, list):
                for v in x:
                    walk(v)
        walk(json.loads((out / "eval.json").read_text()))
        return len(numbers) >= 2 and abs(numbers[0] - numbers[1]) < 1e-3 * numbers[0]
    return success(res, ok)


@probe("eval")
def p_ppl_invalid_json(d):
    (d / "bad.json").write_text('[{"text": "a"}, {"text": ')
    return refusal(evaluate(d, [d / "bad.json"])[0], names=("bad.json",))


@probe("eval")
def p_ppl_binary(d):
    (d / "bin.txt").write_bytes(bytes(range(256)) * 50)
    return refusal(evaluate(d, [d / "bin.txt"])[0], names=("bin.txt",))


refusals('eval', [
    ('ppl_missing', lambda d: evaluate(d, [d / "gone.txt"])[0], ("gone.txt",)),
])


@probe("eval")
def p_ppl_empty(d):
    (d / "empty.txt").write_text("")
    return refusal(evaluate(d, [d / "empty.txt"])[0], names=("empty.txt",))


@probe("eval")
def p_eval_output_is_file(d):
    (d / "evfile").write_text("precious")
    res, _ = evaluate(d, [FX.heldout], output=d / "evfile")
    verdict = refusal(res, names=("evfile",))
    if (d / "evfile").read_text() != "precious":
        return "silently-wrong", "the file was overwritten"
    return verdict


@probe("eval")
def p_eval_context_zero(d):
    recipe = FX.recipe(d, f"eval: {{perplexity_files: [{FX.heldout}], context_lengths: [0]}}\n")
    return refusal(cli("eval", recipe, "--input", FX.model, "--output", d / "ev"), names=("context_lengths",))


@probe("eval")
def p_eval_unknown_task(d):
    (d / "t.jsonl").write_text('{"question": "q"}\n')
    recipe = FX.recipe(d, f"eval: {{tasks: {{arc_hardest: {d / 't.jsonl'}}}, context_lengths: [32]}}\n")
    return refusal(cli("eval", recipe, "--input", FX.model, "--output", d / "ev"), names=("arc_hardest",))


@probe("eval")
def p_eval_task_file_garbage(d):
    (d / "t.jsonl").write_bytes(bytes(range(256)) * 10)
    recipe = FX.recipe(d, f"eval: {{tasks: {{arc_easy: {d / 't.jsonl'}}}, context_lengths: [32]}}\n")
    return refusal(cli("eval", recipe, "--input", FX.model, "--output", d / "ev"), names=("t.jsonl",))


# -------------------------------------------------------------------------------------------------------- data

def data_stats(d: Path, sources_yaml: str, *extra: str, seq_len: int = 32, timeout: float = 240) -> Result:
    path = d / "data.yaml"
    path.write_text(f"name: p\nrun_dir: {d / 'run'}\nmodel: {{source: {FX.model}}}\n"
                    f"data:\n  sources: {sources_yaml}\n  seq_len: {seq_len}\n")
    return cli("data", "stats", "--config", path, "--batches", "2", *extra, timeout=timeout)


refusals('data', [
    ('negative_source_weight', lambda d: data_stats(d, f"[{{path: {FX.corpus}, weight: -1}}]"), ("weight",)),
    ('negative_domain_weight', lambda d: data_stats(d, f"[{{path: {FX.corpus}, domains: {{Tiny: -0.5, Other: 1.5}}}}]"),
     ("domains",)),
    ('domain_weights_sum_zero', lambda d: data_stats(d, f"[{{path: {FX.corpus}, domains: {{Tiny: 0, Other: 0}}}}]"),
     ("domains",)),
    ('source_weights_sum_zero', lambda d: data_stats(d, f"[{{path: {FX.corpus}, weight: 0}}]"), ("weight",)),
])


@probe("data")
def p_sft_seq_len_above_max_positions(d):
    recipe = FX.recipe(d, f"sft: {{data: {FX.instruct}, max_steps: 1, micro_batch_size: 2, global_batch_size: 2, "
                          f"input: {FX.model}, output: {d / 'sft'}, max_seq_len: 4096}}\n")
    return refusal(cli("sft", recipe), names=("max_seq_len",))


refusals('data', [
    ('cpt_seq_len_above_max_positions', lambda d: cli("cpt", FX.cpt_recipe(d, d / "cpt", seq_len=4096)), ("seq_len",)),
    ('source_missing', lambda d: data_stats(d, f"[{{path: {d / 'nowhere'}}}]"), ("nowhere",)),
])


@probe("data")
def p_source_empty_dir(d):
    (d / "empty").mkdir()
    return refusal(data_stats(d, f"[{{path: {d / 'empty'}}}]"), names=("empty",))


def _corrupt_shard_corpus(d: Path) -> Path:
    import zstandard
    c = d / "c"
    c.mkdir()
    for shard in range(3):
        (c / f"good_{shard}.jsonl").write_text("".join(json.dumps({"text": f"{shard} {i} " + FX.text}) + "\n"
                                                   for i in range(20)))
    good = zstandard.ZstdCompressor().compress(b'{"text": "hi"}\n' * 50)
    (c / "bad.jsonl.zst").write_bytes(good[: len(good) // 2] + b"\x00garbage" * 20)
    return c


@probe("data")
def p_corrupt_shard_two_workers(d):
    c = _corrupt_shard_corpus(d)
    res = data_stats(d, f"[{{path: {c}}}]", "--workers", "2", "--batches", "40")

    def ok():
        import re
        text = res.out + res.err
        # `skipped: corrupt_shard 1`: the one corrupt shard, counted once although two workers read the source
        counts = [int(n) for n in re.findall(r"corrupt_shard[:=]?\s+(\d+)", text)]
        return counts == [1]
    return success(res, ok)


@probe("data")
def p_bad_records_strict(d):
    c = d / "c"
    c.mkdir()
    (c / "a.jsonl").write_text('{"text": "ok"}\n{"text": broken\n' + '{"text": "fine"}\n' * 10)
    return refusal(data_stats(d, f"[{{path: {c}}}]", "--data.bad_records", "strict"), names=("a.jsonl",))


@probe("data")
def p_jsonl_not_utf8(d):
    c = d / "c"
    c.mkdir()
    (c / "a.jsonl").write_bytes(b'{"text": "caf\xe9"}\n' * 50)
    res = data_stats(d, f"[{{path: {c}}}]", "--data.bad_records", "strict")
    return refusal(res, names=("a.jsonl",))


_PEAK = "healer-probe-peak-rss-kb="
# Runs the CLI as its only child and reports that child's peak RSS (RUSAGE_CHILDREN of a fresh process).
_WRAP = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
         f"print('{_PEAK}%d' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
         "sys.exit(rc)")


def _rss_cli(args: list[str], timeout: float = 300) -> Result:
    """The CLI with its peak resident memory measured (the largest of the healer process and its children)."""
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-c", _WRAP, sys.executable, "-m", "healer", *map(str, args)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        rc = None
    peak = [int(line[len(_PEAK):]) for line in err.splitlines() if line.startswith(_PEAK)]
    err = "\n".join(line for line in err.splitlines() if not line.startswith(_PEAK))
    return Result(rc, out, err, time.time() - start, peak_rss_mb=(peak[0] / 1024 if peak else float("inf")))


@probe("memory")
def p_10mb_record_stream(d):
    c = d / "c"
    c.mkdir()
    word = "pruning heals blocks "
    (c / "big.jsonl").write_text(json.dumps({"text": word * (10_000_000 // len(word))}) + "\n")
    path = d / "data.yaml"
    path.write_text(f"name: p\nmodel: {{source: {FX.model}}}\ndata:\n  sources: [{{path: {c}}}]\n  seq_len: 32\n")
    res = _rss_cli(["data", "stats", "--config", path, "--batches", "4"])
    verdict = success(res, ok=lambda: res.peak_rss_mb < 1200)
    return verdict[0], f"peak RSS {res.peak_rss_mb:.0f} MB; " + verdict[1]


@probe("memory")
def p_10mb_record_calibration(d):
    word = "pruning heals blocks "
    (d / "big.jsonl").write_text(json.dumps({"text": word * (10_000_000 // len(word))}) + "\n")
    res = _rss_cli(["prune", "--model", FX.model, "--criterion", "ppl", "--calibration", d / "big.jsonl",
                    "--num-samples", "2", "--seq-len", "32", "--num-blocks", "1", "--output", d / "out",
                    "--keep-first", "0", "--keep-last", "0", "--run-dir", d / "run"])
    verdict = success(res, ok=lambda: res.peak_rss_mb < 1200 and layers(d / "out") == 3)
    return verdict[0], f"peak RSS {res.peak_rss_mb:.0f} MB; " + verdict[1]


# --------------------------------------------------------------------------------------------------------- sft

def sft(d: Path, data: Path) -> Result:
    recipe = FX.recipe(d, f"sft: {{data: {data}, max_steps: 1, micro_batch_size: 2, global_batch_size: 2, "
                          f"input: {FX.model}, output: {d / 'sft'}, max_seq_len: 64}}\n")
    return cli("sft", recipe)


@probe("sft")
def p_sft_binary(d):
    (d / "s.json").write_bytes(bytes(range(256)) * 20)
    return refusal(sft(d, d / "s.json"), names=("s.json",))


@probe("sft")
def p_sft_non_utf8(d):
    (d / "s.jsonl").write_bytes(b'{"instruction": "caf\xe9", "output": "x"}\n' * 5)
    return refusal(sft(d, d / "s.jsonl"), names=("s.jsonl",))


@probe("sft")
def p_sft_missing_fields(d):
    (d / "s.json").write_text(json.dumps([{"question": "q", "answer": "a"}] * 4))
    return refusal(sft(d, d / "s.json"), names=("s.json",))


@probe("sft")
def p_sft_empty_list(d):
    (d / "s.json").write_text("[]")
    return refusal(sft(d, d / "s.json"), names=("s.json",))


@probe("sft")
def p_sft_invalid_json(d):
    (d / "s.json").write_text('[{"instruction": "a", "output": ')
    return refusal(sft(d, d / "s.json"), names=("s.json",))


refusals('sft', [
    ('sft_missing', lambda d: sft(d, d / "gone.json"), ("gone.json",)),
])


# ------------------------------------------------------------------------------------------------- checkpoints

class _Evil:
    """Unpickling this touches a marker file: proof that a checkpoint file ran code."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(marker: Path, size: int | None = None) -> bytes:
    evil = _Evil()
    evil.marker = str(marker)
    payload = pickle.dumps(evil, protocol=2)
    # padded to the size complete.json recorded, so a size check alone does not catch it
    return payload + b"\0" * max(0, (size or 0) - len(payload))


def resume(d: Path, stage: Path, corpus: Path, *extra: str, timeout: float = 400, **over) -> Result:
    return cli("cpt", "--config", FX.cpt_recipe(d, stage, corpus=corpus, **over), *extra, timeout=timeout)


LAST = "step00000002"


@probe("checkpoint")
def p_crafted_trainer_state_pt(d):
    stage, corpus = FX.cpt_copy(d)
    (stage / "checkpoints" / LAST / "trainer_state_rank0.pt").write_bytes(_evil_pickle(d / "pwned"))
    res = resume(d, stage, corpus, cpt={"max_steps": 3})
    return success(res, ok=lambda: not (d / "pwned").exists() and metrics(stage)[-1]["step"] == 3)


@probe("checkpoint")
def p_crafted_model_states_same_size(d):
    stage, corpus = FX.cpt_copy(d)
    for step in ("step00000001", LAST):
        target = stage / "checkpoints" / step / "mp_rank_00_model_states.pt"
        target.write_bytes(_evil_pickle(d / "pwned", target.stat().st_size))
    res = resume(d, stage, corpus, cpt={"max_steps": 3})
    if (d / "pwned").exists():
        return "silently-wrong", "DeepSpeed unpickled a crafted *_model_states.pt (documented trust boundary)"
    return refusal(res, names=("checkpoint",))


def _largest_state_file(stage: Path) -> Path:
    """The biggest ``*_states.pt`` of the last checkpoint: the optimizer state (its file name depends on the
    engine: a one-rank ZeRO-1/2 run uses a stage-0 engine, which keeps it in ``mp_rank_00_model_states.pt``)."""
    return max((stage / "checkpoints" / LAST).glob("*_states.pt"), key=lambda f: f.stat().st_size)


@probe("checkpoint")
def p_truncated_with_complete(d):
    stage, corpus = FX.cpt_copy(d)
    target = _largest_state_file(stage)
    target.write_bytes(target.read_bytes()[:100])
    res = resume(d, stage, corpus, cpt={"max_steps": 3})
    return success(res, ok=lambda: "step00000001" in res.err and [m["step"] for m in metrics(stage)][-2:] == [2, 3])


@probe("checkpoint")
def p_same_size_garbage_with_complete(d):
    stage, corpus = FX.cpt_copy(d)
    target = _largest_state_file(stage)
    target.write_bytes(b"\x13" * target.stat().st_size)
    res = resume(d, stage, corpus, cpt={"max_steps": 3})
    return refusal(res, names=("step00000002",), ok=lambda: "step00000001" in res.err
                   and [m["step"] for m in metrics(stage)][-2:] == [2, 3])


@probe("checkpoint")
def p_trainer_state_garbage(d):
    stage, corpus = FX.cpt_copy(d)
    target = stage / "checkpoints" / LAST / "trainer_state_rank0.json"
    target.write_text("x" * target.stat().st_size)
    res = resume(d, stage, corpus, cpt={"max_steps": 3})
    return refusal(res, names=("step00000002",), ok=lambda: "step00000001" in res.err
                   and [m["step"] for m in metrics(stage)][-2:] == [2, 3])


@probe("checkpoint")
def p_zero_stage_change(d):
    # Another ZeRO stage is an elastic resume (README, "Resume"); on one rank ZeRO-1 and 2 both run as ZeRO-0,
    # so it is a plain resume. Either way it must go on from step 2 and say why.
    stage, corpus = FX.cpt_copy(d)
    res = resume(d, stage, corpus, cpt={"max_steps": 3, "zero_stage": 1})
    said = res.err + res.out
    return refusal(res, names=("zero_stage",), ok=lambda: "resumed from" in said and "step00000002" in said
                   and ("elastic resume" in said or "one rank shards nothing" in said)
                   and [m["step"] for m in metrics(stage)][-2:] == [2, 3])


@probe("checkpoint")
def p_resume_changed_lr(d):
    stage, corpus = FX.cpt_copy(d)
    res = resume(d, stage, corpus, cpt={"max_steps": 3, "lr": 0.1})
    return refusal(res, names=("lr",), ok=lambda: abs(metrics(stage)[-1]["train/lr"] - 0.1) < 1e-9)


@probe("checkpoint")
def p_resume_more_steps(d):
    stage, corpus = FX.cpt_copy(d)
    res = resume(d, stage, corpus, cpt={"max_steps": 4})

    def ok():
        manifest = json.loads((stage / "manifest.json").read_text())
        return [m["step"] for m in metrics(stage)] == [1, 2, 3, 4] and manifest["outputs"]["steps"] == 4
    return refusal(res, names=("max_steps",), ok=ok)


@probe("checkpoint")
def p_resume_changed_seq_len(d):
    stage, corpus = FX.cpt_copy(d)
    res = resume(d, stage, corpus, cpt={"max_steps": 3}, seq_len=16)
    return refusal(res, names=("seq_len",), ok=lambda: metrics(stage)[-1]["step"] == 3)


@probe("checkpoint")
def p_resume_changed_data_same_names(d):
    stage, corpus = FX.cpt_copy(d)
    shutil.copytree(corpus, d / "original")
    try:
        for f in corpus.iterdir():
            f.write_text("".join(json.dumps({"text": f"replaced {i} " + "other words " * 20}) + "\n"
                                 for i in range(25)))
        res = resume(d, stage, corpus, cpt={"max_steps": 3})
    finally:
        shutil.rmtree(corpus)
        shutil.copytree(d / "original", corpus)
    def ok():
        said = any(w in res.err.lower() for w in ("changed", "fingerprint", "different"))
        return said and metrics(stage)[-1]["step"] == 3
    return refusal(res, names=("data",), ok=ok)


@probe("checkpoint")
def p_resume_dir_not_a_checkpoint(d):
    (d / "junk").mkdir()
    (d / "junk" / "x.pt").write_bytes(_evil_pickle(d / "pwned"))
    res = cli("cpt", "--config", FX.cpt_recipe(d, d / "cpt"), "--resume", d / "junk")
    verdict = refusal(res, names=("junk",))
    return ("silently-wrong", "ran code") if (d / "pwned").exists() else verdict


@probe("stale")
def p_cpt_finished_then_new_input(d):
    stage, corpus = FX.cpt_copy(d)
    pruned = d / "pruned"
    first = prune(d, "--num-blocks", "1", "--output", pruned)
    if first.rc != 0:
        return refusal(first)
    res = resume(d, stage, corpus, cpt={"input": str(pruned)})

    def ok():
        return layers(stage / "hf") == 3 and "skipping" not in res.err
    return refusal(res, names=("cpt",), ok=ok)


@probe("stale")
def p_cpt_finished_then_changed_lr(d):
    stage, corpus = FX.cpt_copy(d)
    res = resume(d, stage, corpus, cpt={"lr": 0.01})
    return refusal(res, names=("lr",), ok=lambda: "skipping" not in res.err and metrics(stage)[-1]["train/lr"] == 0.01)


@probe("stale")
def p_eval_finished_then_other_input(d):
    other = d / "pruned"
    first = prune(d, "--num-blocks", "1", "--output", other)
    res1, out = evaluate(d, [FX.heldout])
    if res1.rc != 0 or first.rc != 0:
        return refusal(res1)
    before = (out / "eval.json").read_text()
    recipe = FX.recipe(d, f"eval: {{perplexity_files: [{FX.heldout}], context_lengths: [32], max_tokens: 512}}\n",
                       name="r2.yaml")
    res = cli("eval", recipe, "--input", other, "--output", out)
    return refusal(res, names=("eval",), ok=lambda: (out / "eval.json").read_text() != before)


# ------------------------------------------------------------------------------------------------- concurrency

def _spawn(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "healer", *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace")


def _both(a: subprocess.Popen, b: subprocess.Popen, timeout: float) -> list[Result]:
    out = []
    for p in (a, b):
        try:
            o, e = p.communicate(timeout=timeout)
            out.append(Result(p.returncode, o, e, 0))
        except subprocess.TimeoutExpired:
            p.kill()
            o, e = p.communicate()
            out.append(Result(None, o, e, 0))
    return out


def _pair_verdict(results: list[Result], ok: Callable[[], bool]) -> tuple[str, str]:
    if any(r.rc is None for r in results):
        return "hang", "a run did not finish"
    if any("Traceback (most recent call last)" in r.err for r in results):
        return "stack-dump", next(last_line(r.err) for r in results if "Traceback" in r.err)[:200]
    rcs = sorted(r.rc for r in results)
    try:
        good = ok()
    except Exception:
        good = False
    if rcs[0] == 0 and rcs[1] != 0:
        refused = next(r for r in results if r.rc != 0)
        if not good:
            return "silently-wrong", "one refused but the result is inconsistent"
        if "in use" in refused.err or "lock" in refused.err.lower():
            return "clear-error", last_line(refused.err)[:200]
        return "silently-wrong", "second failed for another reason: " + last_line(refused.err)[:160]
    if rcs == [0, 0]:
        return ("correct", "both finished, result consistent") if good else ("silently-wrong", "both exit 0, "
                                                                             "result inconsistent")
    return "silently-wrong", "both failed: " + last_line(results[0].err)[:160]


@probe("concurrency")
def p_two_prunes_one_output(d):
    a = _spawn("prune", "--model", FX.model, "--criterion", "magnitude", "--num-blocks", "1", "--output", d / "out",
               "--run-dir", d / "r1")
    time.sleep(1.0)
    b = _spawn("prune", "--model", FX.model, "--criterion", "magnitude", "--num-blocks", "2", "--output", d / "out",
               "--run-dir", d / "r2")
    results = _both(a, b, 300)

    def ok():
        report = json.loads((d / "out" / "prune_report.json").read_text())
        removed = report.get("removed_blocks") or report.get("blocks") or report.get("removed") or []
        n = len(removed) if isinstance(removed, list) else int(removed)
        return layers(d / "out") == 4 - n
    return _pair_verdict(results, ok)


@probe("concurrency")
def p_two_cpt_one_stage(d):
    recipe = FX.cpt_recipe(d, d / "cpt", cpt={"max_steps": 3})
    a = _spawn("cpt", "--config", recipe)
    time.sleep(2.0)
    b = _spawn("cpt", "--config", recipe)
    results = _both(a, b, 500)
    return _pair_verdict(results, ok=lambda: [m["step"] for m in metrics(d / "cpt")] == [1, 2, 3])


@probe("concurrency")
def p_two_evals_one_output(d):
    recipe = FX.recipe(d, f"eval: {{perplexity_files: [{FX.heldout}], context_lengths: [32], max_tokens: 512}}\n")
    a = _spawn("eval", recipe, "--input", FX.model, "--output", d / "ev")
    time.sleep(0.5)
    b = _spawn("eval", recipe, "--input", FX.model, "--output", d / "ev")
    results = _both(a, b, 300)
    return _pair_verdict(results, ok=lambda: json.loads((d / "ev" / "eval.json").read_text()) is not None)


# ----------------------------------------------------------------------------------------------------- release

SECRET = "hf_ProbeSecretValue0123456789abcdef"


def _release(d: Path, extra: str = "", *args: str, output: Path | None = None) -> tuple[Result, Path]:
    out = output or d / "rel"
    recipe = FX.recipe(d, f"release: {{input: {FX.model}, output: {out}}}\n" + extra)
    return cli("release", recipe, *args), out


def _no_secret(out: Path, secret: str) -> bool:
    for f in out.rglob("*"):
        if f.is_file() and secret.encode() in f.read_bytes():
            return False
    return True


@probe("release")
def p_secret_env_in_release(d):
    res, out = _release(d, f"launch: {{env: {{HF_TOKEN: {SECRET}, WANDB_API_KEY: wandbsecret0123456789}}}}\n")
    return success(res, ok=lambda: _no_secret(out, SECRET) and _no_secret(out, "wandbsecret0123456789")
                   and SECRET not in res.out + res.err)


@probe("release")
def p_secret_override_in_release(d):
    res, out = _release(d, "", "--launch.env", json.dumps({"HF_TOKEN": SECRET}))
    return success(res, ok=lambda: _no_secret(out, SECRET) and SECRET not in res.out + res.err)


@probe("release")
def p_token_looking_value_in_release(d):
    # a token pasted where it does not belong (a tag) still must not be published
    res, out = _release(d, "", "--release.tags", json.dumps([SECRET]))
    return success(res, ok=lambda: _no_secret(out, SECRET))


@probe("release")
def p_release_output_is_input(d):
    model = d / "m"
    shutil.copytree(FX.model, model)
    recipe = FX.recipe(d, f"release: {{input: {model}, output: {model}}}\n")
    return refusal(cli("release", recipe), names=(str(model),))


@probe("release")
def p_release_output_is_file(d):
    (d / "relfile").write_text("precious")
    res, _ = _release(d, output=d / "relfile")
    verdict = refusal(res, names=("relfile",))
    if (d / "relfile").read_text() != "precious":
        return "silently-wrong", "the file was overwritten"
    return verdict


@probe("release")
def p_release_input_missing(d):
    recipe = FX.recipe(d, f"release: {{input: {d / 'gone'}, output: {d / 'rel'}}}\n")
    return refusal(cli("release", recipe), names=("gone",))


@probe("release")
def p_release_loads(d):
    res, out = _release(d)

    def ok():
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained(out)
        return (out / "README.md").is_file()
    return success(res, ok)


# ------------------------------------------------------------------------------------ results that must be true

def _bomb(d: Path) -> Path:
    """Nine levels of nine YAML aliases: 400 bytes that stand for 9**9 values."""
    lines = ["model: {source: x}", "a: &a [" + ", ".join(["x"] * 9) + "]"]
    lines += [f"{b}: &{b} [" + ", ".join([f"*{a}"] * 9) + "]" for a, b in zip("abcdefgh", "bcdefghi")]
    (d / "bomb.yaml").write_text("\n".join(lines) + "\n")
    return d / "bomb.yaml"


def _finished(d: Path, stage: str) -> Path:
    """A directory a finished ``stage`` claims (its manifest), as another stage's output."""
    from healer.core.manifest import write_stage_manifest

    write_stage_manifest(d / "run" / stage, stage, None, {"steps": 1})
    return d / "run" / stage


def _bad_task_file(d: Path) -> Path:
    rows = [{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}]
    (d / "arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "arc.jsonl"


refusals("numbers", [
    ("lr_inf", lambda d: cli("cpt", FX.recipe(d), "--cpt.lr", "inf"), ("cpt.lr",)),
    ("lr_nan_in_yaml", lambda d: cli("cpt", FX.recipe(d, "cpt: {lr: .nan}\n")), ("cpt.lr",)),
    ("betas_nan", lambda d: cli("cpt", FX.recipe(d), "cpt.betas=[nan,0.95]"), ("cpt.betas",)),
    ("beta_one", lambda d: cli("cpt", FX.recipe(d), "cpt.betas=[0.9,1.5]"), ("cpt.betas",)),
    ("kd_temperature_inf", lambda d: cli("cpt", FX.recipe(d), "cpt.kd.temperature=inf"), ("cpt.kd.temperature",)),
    ("sft_epochs_inf", lambda d: cli("sft", FX.recipe(d), "sft.epochs=inf"), ("sft.epochs",)),
    ("weight_inf", lambda d: cli("cpt", FX.recipe(d), "data.sources=[{path: x, weight: .inf}]"),
     ("data.sources.0.weight",)),
])

refusals("input", [
    ("yaml_alias_bomb", lambda d: cli("prune", _bomb(d), timeout=30), ("aliases",)),
    ("yaml_alias_bomb_override", lambda d: cli("prune", FX.recipe(d), "prune.blocks={a: &a [1,1,1,1,1,1,1,1,1,1], "
                                               "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], c: &c [*b,*b,*b,*b,*b,*b,*b,"
                                               "*b,*b,*b], d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], e: [*d,*d,*d,*d,*d,"
                                               "*d,*d,*d,*d,*d]}", timeout=30), ("aliases",)),
    ("run_dir_self_reference", lambda d: cli("prune", FX.recipe(d), "--run-dir", "${run_dir}/x"), ("run_dir",)),
    ("unknown_task_before_perplexity", lambda d: cli("eval", FX.recipe(d), f"eval.tasks={{arcc_easy: {d}/a}}"),
     ("arcc_easy",)),
    ("task_record_bad_answer",
     lambda d: cli("eval", FX.recipe(d), f"eval.perplexity_files=[{FX.heldout}]", "eval.context_lengths=[16]",
                   f"eval.tasks={{arc_easy: {_bad_task_file(d)}}}"),
     ("arc.jsonl record 1",)),
    ("only_cpt_on_a_fresh_run_dir", lambda d: cli("run", FX.recipe(d, "prune: {num_blocks: 1, criterion: magnitude}\n"
                                                              "cpt: {max_steps: 1}\n"), "--only", "cpt"),
     ("prune has not written",)),
    ("model_name_newline", lambda d: cli("release", FX.recipe(d), 'release.model_name="x\nlicense: mit"'),
     ("release.model_name",)),
    ("repo_id_quote", lambda d: cli("release", FX.recipe(d), 'release.repo_id=a/b"); import os #'),
     ("release.repo_id",)),
])

refusals("ownership", [
    ("sft_into_a_cpt_dir", lambda d: cli("sft", FX.recipe(d), f"sft.output={_finished(d, 'cpt')}"), ("sft.output",)),
    ("eval_into_a_release", lambda d: cli("eval", FX.recipe(d), f"eval.output={_finished(d, 'release')}"),
     ("eval.output",)),
])


@probe("ownership")
def p_release_keeps_a_users_partial_dir(d):
    mine = d / "rel.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    res = cli("release", FX.recipe(d), f"release.input={FX.model}", f"release.output={d / 'rel'}")
    return success(res, ok=lambda: (mine / "notes.txt").read_text() == "mine"
                   and (d / "rel" / "manifest.json").exists())


@probe("numbers")
def p_lr_that_diverges_stops_at_its_step(d):
    stage = d / "cpt"
    res = cli("cpt", "--config", FX.cpt_recipe(d, stage, cpt={"lr": 1e30, "max_steps": 6}), timeout=400)
    return refusal(res, names=("training loss is nan", "last good checkpoint"),
                   ok=lambda: False)  # exit 0 would mean it trained on NaN


@probe("trust")
def p_planted_pickle_never_runs(d):
    stage, corpus = FX.cpt_copy(d)
    marker = d / "pwned"
    state = sorted((stage / "checkpoints").glob("step*/mp_rank_00_model_states.pt"))[-1]  # the one resumed
    import torch

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)
    blob = torch.load(state, weights_only=False)
    blob["planted"] = Payload()
    torch.save(blob, state)
    complete = state.parent / "complete.json"
    record = json.loads(complete.read_text())
    record["files"][state.name] = state.stat().st_size  # as a planted copy would
    complete.write_text(json.dumps(record))
    res = cli("cpt", "--config", FX.cpt_recipe(d, stage, corpus=corpus, cpt={"max_steps": 3}), timeout=400)
    if marker.exists():
        return "silently-wrong", "the planted pickle ran"
    return refusal(res, names=("refused to load",))


# -------------------------------------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", action="append", default=[], help="run probes whose class or name contains this")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    parser.add_argument("--json", help="write every verdict to this file")
    args = parser.parse_args()
    chosen = [p for p in PROBES if not args.k or any(k in p.cls or k in p.name for k in args.k)]
    if args.list:
        for p in chosen:
            print(f"{p.cls:12} {p.name}")
        print(len(chosen), "probes")
        return 0
    global FX
    root = Path(tempfile.mkdtemp(prefix="healer-probes-"))
    FX = Fixtures(root / "fixtures")
    rows = []
    for i, p in enumerate(chosen, 1):
        d = root / f"{p.cls}-{p.name}"
        d.mkdir()
        start = time.time()
        try:
            verdict, detail = p.fn(d)
        except Exception as err:  # a probe that cannot set itself up is reported, not hidden
            verdict, detail = "probe-error", f"{type(err).__name__}: {str(err)[:300]}"
        rows.append({"class": p.cls, "probe": p.name, "verdict": verdict, "detail": detail,
                     "seconds": round(time.time() - start, 1)})
        print(f"[{i}/{len(chosen)}] {p.cls:12} {p.name:40} {verdict:15} {time.time() - start:5.0f}s  {detail}",
              flush=True)
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
    by_class: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        by_class[r["class"]][r["verdict"]] += 1
    cols = VERDICTS + ("probe-error",)
    print("\n| class | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for cls, counts in by_class.items():
        print(f"| {cls} | " + " | ".join(str(counts[c]) for c in cols) + " |")
    total = Counter(r["verdict"] for r in rows)
    print("| **all** | " + " | ".join(f"**{total[c]}**" for c in cols) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if total["silently-wrong"] or total["stack-dump"] or total["hang"] else 0


if __name__ == "__main__":
    sys.exit(main())
