"""Hostile-input matrix: run the real CLI on bad input, faults and concurrency; count verdicts.

Each probe builds what it needs in a temporary directory (a tiny random model, a corpus, a recipe), runs
``python -m healer ...`` in a subprocess with a timeout and classifies the outcome:

- ``clear-error``: exit != 0, the last stderr line is one line and no Traceback reached the user
- ``correct``: exit 0 and the probe verified the result
- ``silently-wrong``: exit 0 (or a refusal the probe knows is wrong) with a wrong result
- ``stack-dump``: a Traceback reached the user
- ``hang``: the timeout fired

    python bench/hostile_probes.py                 # every probe (CPU-heavy: about 10-30 minutes on 2 cores)
    python bench/hostile_probes.py -k slurm -k eval  # probes whose class or name contains a word
    python bench/hostile_probes.py --list

Most probes are rows of a table: a command that must be refused naming what is wrong, or, where the row has
a check, may exit 0 with a result the check verifies. Probes of several steps are functions. Nothing here
downloads anything.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import re
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
TRACEBACK = "Traceback (most recent call last)"


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


def probes(cls: str, *rows) -> None:
    """Register a class of probes, in order. A row is a function ``p_NAME(d) -> (verdict, detail)``, or
    ``(name, run, names[, ok])``: ``run(d)`` runs the command in the probe's directory ``d``; ``names`` (a
    string, a tuple, or a function of ``d`` giving one) is what its refusal must mention; ``ok(d, res)``, where
    given, verifies the result of an exit 0."""
    for row in rows:
        if callable(row):
            PROBES.append(Probe(cls, row.__name__.removeprefix("p_"), row))
        else:
            PROBES.append(Probe(cls, row[0], lambda d, row=row: _row_verdict(d, *row[1:])))


def _row_verdict(d: Path, run, names, ok=None) -> tuple[str, str]:
    res = run(d)
    names = names(d) if callable(names) else names
    return refusal(res, names=(names,) if isinstance(names, str) else names, ok=ok and (lambda: ok(d, res)))


def cli(*args, timeout: float = 240) -> Result:
    """Run ``python -m healer ARGS``; a timeout kills the process group and returns rc None."""
    return run_cmd([sys.executable, "-m", "healer", *map(str, args)], timeout)


def run_cmd(cmd: list[str], timeout: float) -> Result:
    start = time.time()
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", start_new_session=True)
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
    if TRACEBACK in res.err or TRACEBACK in res.out:
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


def unless_ran(marker: Path, verdict: tuple[str, str], why: str) -> tuple[str, str]:
    """Planted code that ran is wrong whatever the exit code says."""
    return ("silently-wrong", why) if marker.exists() else verdict


def kept(path: Path, verdict: tuple[str, str]) -> tuple[str, str]:
    """A user's file the command was pointed at must still hold what the probe wrote there."""
    return ("silently-wrong", "the file was overwritten") if path.read_text() != "precious" else verdict


def put(d: Path, name: str, content: str | bytes | None = None) -> Path:
    """Write ``content`` (text or bytes) to ``d / name``, or, without content, make that a folder."""
    path = d / name
    if content is None:
        path.mkdir(parents=True, exist_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# ----------------------------------------------------------------------------------------------------- fixtures

class Fixtures:
    """Things built once per run and copied into each probe's directory when needed."""

    def __init__(self, root: Path):
        from helpers import SAMPLE_TEXT, save_tiny
        self.root, self.text, self._cpt_base = root, SAMPLE_TEXT, None
        self.model = save_tiny(root, "llama", layers=4, hidden=32, intermediate=64)
        self.calib = put(root, "calib.jsonl", jsonl({"text": f"Document {i}. " + SAMPLE_TEXT * 2} for i in range(20)))
        self.corpus = root / "corpus"
        for shard in range(2):
            put(self.corpus, f"part_{shard}.jsonl", jsonl({"text": f"Shard {shard} doc {i}. " + SAMPLE_TEXT,
                                                           "meta": {"redpajama_set_name": "Tiny"}} for i in range(30)))
        self.heldout = put(root, "heldout.txt", SAMPLE_TEXT * 20)
        self.instruct = put(root, "instruct.json", json.dumps(
            [{"instruction": f"Repeat {i}.", "input": "", "output": f"{i}"} for i in range(8)]))

    def recipe(self, d: Path, extra: str = "", name: str = "recipe.yaml") -> Path:
        return put(d, name, f"name: probe\nrun_dir: {d / 'run'}\nmodel: {{source: {self.model}}}\ndata:\n"
                            f"  sources: [{{path: {self.corpus}}}]\n  seq_len: 32\n" + textwrap.dedent(extra))

    def cpt_recipe(self, d: Path, stage: Path, cpt: dict | None = None, corpus: Path | None = None,
                   seq_len: int = 32) -> Path:
        import yaml
        settings = {"output": str(stage), "zero_stage": 2, "micro_batch_size": 2, "global_batch_size": 2,
                    "max_steps": 2, "save_every": 1, "warmup_steps": 0, "schedule": "constant", "eval_every": 1000,
                    "lr": 1e-4, **(cpt or {})}
        return put(d, "cpt.yaml", yaml.safe_dump({
            "name": "probe", "run_dir": str(d / "run"), "model": {"source": str(self.model)},
            "data": {"sources": [{"path": str(corpus or self.corpus)}], "seq_len": seq_len}, "cpt": settings}))

    def cpt_copy(self, d: Path) -> tuple[Path, Path]:
        """A copy, in ``d / "cpt"``, of a finished 2-step cpt stage (checkpoints at steps 1 and 2) built once;
        returns (stage dir, its corpus dir). The corpus stays where the checkpoints were written from: its path
        is one of the recorded settings."""
        if self._cpt_base is None:
            base = put(self.root, "cpt_base")
            shutil.copytree(self.corpus, base / "corpus")
            res = cli("cpt", "--config", self.cpt_recipe(base, base / "cpt", corpus=base / "corpus"), timeout=400)
            if res.rc != 0:
                raise RuntimeError("base cpt run failed:\n" + res.err[-3000:])
            self._cpt_base = base
        shutil.copytree(self._cpt_base / "cpt", d / "cpt", symlinks=True)
        return d / "cpt", self._cpt_base / "corpus"


FX: Fixtures


def metrics(stage: Path) -> list[dict]:
    path = stage / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def steps(stage: Path) -> list[int]:
    return [m["step"] for m in metrics(stage)]


def layers(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]


def model_copy(d: Path, edit: Callable[[Path], object] | None = None) -> Path:
    model = d / "m"
    shutil.copytree(FX.model, model)
    if edit:
        edit(model)
    return model


def prune(d: Path, *args) -> Result:
    # keep_first/keep_last 0: the ppl defaults (4 and 2) leave nothing to remove from a 4-block model
    return cli("prune", "--model", FX.model, "--criterion", "magnitude", "--keep-first", "0", "--keep-last", "0",
               "--run-dir", d / "run", *args)


def prune_ppl(d: Path, calibration: Path, *extra) -> Result:
    return prune(d, "--criterion", "ppl", "--num-blocks", "1", "--calibration", calibration, "--seq-len", "32",
                 "--num-samples", "2", *extra)


def prune_model(d: Path, model: Path) -> Result:
    return cli("prune", "--model", model, "--criterion", "magnitude", "--num-blocks", "1", "--output", d / "out",
               "--run-dir", d / "run")


def evaluate(d: Path, files: list[Path], output: Path | None = None) -> Result:
    recipe = FX.recipe(d, f"eval: {{perplexity_files: {json.dumps([str(f) for f in files])}, "
                          f"context_lengths: [32], max_tokens: 512}}\n")
    return cli("eval", recipe, "--input", FX.model, "--output", output or d / "ev")


def slurm(d: Path, *extra, recipe_extra: str = "") -> Result:
    return cli("launch", "cpt", FX.recipe(d, recipe_extra), "--slurm", "--dry-run", *extra)


def resume(d: Path, stage: Path, corpus: Path, **over) -> Result:
    return cli("cpt", "--config", FX.cpt_recipe(d, stage, corpus=corpus, **over), timeout=400)


# ------------------------------------------------------------------------------------------------------ recipe

def bad_recipe(content: str | bytes) -> Callable[[Path], Result]:
    return lambda d: cli("prune", put(d, "r.yaml", content))


def p_newline_in_name(d):
    # A newline in the release name must not break the model card's front matter.
    res = cli("release", FX.recipe(d, f'release: {{input: {FX.model}, output: {d / "rel"}, '
                                      'model_name: "evil\\nlicense: mit"}\n'))

    def ok():
        import yaml
        return yaml.safe_load((d / "rel" / "README.md").read_text().split("---")[1]).get("license") != "mit"
    return refusal(res, names=("model_name",), ok=ok)


probes(
    "recipe",
    ("binary_recipe", bad_recipe(bytes(range(256)) * 8), "r.yaml"),
    ("non_utf8_recipe", bad_recipe("name: caf\u00e9\nmodel: {source: x}\n".encode("latin-1")), "r.yaml"),
    ("unknown_top_key", lambda d: cli("prune", FX.recipe(d, "promne: {ratio: 0.5}\n")), "promne"),
    ("unknown_nested_key", lambda d: cli("prune", FX.recipe(d, "prune: {ratoi: 0.5}\n")), "ratoi"),
    ("wrong_type", lambda d: cli("prune", FX.recipe(d, "prune: {ratio: lots}\n")), "prune.ratio"),
    ("wrong_type_override", lambda d: cli("cpt", FX.recipe(d), "--cpt.max_steps", "ten"), "cpt.max_steps"),
    ("unknown_override", lambda d: cli("prune", FX.recipe(d), "--prune.nope", "1"), "prune.nope"),
    ("recipe_is_directory", lambda d: cli("prune", d), lambda d: str(d)),
    ("recipe_missing", lambda d: cli("prune", d / "nope.yaml"), "nope.yaml"),
    ("recipe_empty", bad_recipe(""), "r.yaml"),
    ("recipe_top_level_list", bad_recipe("- a\n- b\n"), "r.yaml"),
    ("recipe_yaml_syntax", bad_recipe("model: {source: [x\n"), "r.yaml"),
    # YAML would keep only the second `prune:`; the user meant both keys.
    ("recipe_duplicate_section", lambda d: cli("prune", FX.recipe(
        d, f"prune: {{method: depth, num_blocks: 1, criterion: magnitude}}\nprune: {{output: {d / 'out'}}}\n")),
     "prune", lambda d, _: layers(d / "out") == 3),
    p_newline_in_name,
    ("newline_in_run_dir_override", lambda d: prune(d, "--num-blocks", "1", "--output", str(d / "out\nx")), "output",
     lambda d, _: layers(d / "out\nx") == 3),
    ("undefined_interpolation", lambda d: cli("prune", FX.recipe(d, "prune: {output: '${nowhere}/p'}\n")), "nowhere"),
    ("bad_dtype", lambda d: prune(d, "--num-blocks", "1", "--dtype", "float8"), "dtype"),
    ("global_batch_not_divisible",
     lambda d: cli("cpt", FX.recipe(d, "cpt: {micro_batch_size: 3, global_batch_size: 4}\n")), "global_batch_size"),
    ("unknown_verb", lambda d: cli("prun", FX.recipe(d)), "prun"),
    ("two_recipes", lambda d: cli("prune", FX.recipe(d), "--config", FX.recipe(d, name="b.yaml")), "recipe"),
)


# ------------------------------------------------------------------------------------------------ launch/SLURM

def in_recipe(text: str) -> Callable[[Path], Result]:
    return lambda d: slurm(d, recipe_extra=text)


def flags(*args: str) -> Callable[[Path], Result]:
    return lambda d: slurm(d, *args)


def script_ran_nothing(d: Path, res: Result) -> bool:
    """Run the rendered sbatch script with srun and scontrol failing (the requeue path); no marker may appear."""
    stubs = put(d, "stubs")
    for tool in ("srun", "scontrol"):
        put(stubs, tool, "#!/bin/sh\nexit 1\n").chmod(0o755)
    script = put(d, "job.sh", res.out[res.out.index("#!/bin/bash"):])
    env = dict(ENV, PATH=f"{stubs}:{ENV['PATH']}", SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="1")
    subprocess.run(["bash", str(script)], cwd=d, env=env, capture_output=True, timeout=60)
    return not (d / "pwned").exists()


TOKEN = "hf_SECRETSECRETSECRET123456"

probes(
    "slurm",
    ("partition_newline", in_recipe('launch: {slurm: {partition: "gpu\\nrm -rf ~"}}\n'), "partition"),
    ("partition_trailing_newline", in_recipe('launch: {slurm: {partition: "gpu\\n"}}\n'), "partition"),
    ("account_semicolon", flags("--launch.slurm.account", "a;touch x"), "account"),
    ("qos_space", flags("--launch.slurm.qos", "high prio"), "qos"),
    ("time_garbage", flags("--launch.slurm.time", "tomorrow"), "time"),
    ("constraint_subshell", flags("--launch.slurm.constraint", "$(id)"), "constraint"),
    ("mem_garbage", flags("--launch.slurm.mem", "lots"), "mem"),
    ("extra_sbatch_space", in_recipe('launch: {slurm: {extra_sbatch: ["--exclusive --x"]}}\n'), "extra_sbatch"),
    ("extra_sbatch_newline", in_recipe('launch: {slurm: {extra_sbatch: ["--exclusive\\ntouch x"]}}\n'), "extra_sbatch"),
    # one setup item is one line; a newline inside it is a second line the user did not see as one
    ("setup_newline", in_recipe('launch: {slurm: {setup: ["module load cuda\\n#SBATCH --qos=high"]}}\n'), "setup",
     lambda d, res: "#SBATCH --qos=high" not in res.out),
    ("env_key_not_identifier", in_recipe('launch: {env: {"A B": "1"}}\n'), "launch.env"),
    ("env_key_subshell", in_recipe('launch: {env: {"X$(touch pwned)": "1"}}\n'), "launch.env"),
    ("env_value_secret_not_in_script", in_recipe(f'launch: {{env: {{HF_TOKEN: "{TOKEN}"}}}}\n'), (),
     lambda d, res: TOKEN not in res.out + res.err and "HF_TOKEN" in res.out),
    # a path is pasted into the script: it must stay one inert word there
    ("run_dir_subshell", lambda d: slurm(d, "--run-dir", d / f"run$(touch {d / 'pwned'})"), (), script_ran_nothing),
    ("run_dir_quote", lambda d: slurm(d, "--run-dir", f"{d}/r'; touch {d / 'pwned'}; '"), (), script_ran_nothing),
    ("master_port_range", flags("--master-port", "99999"), "master-port"),
    ("gpus_negative", flags("--gpus-per-node", "-2"), "gpus_per_node"),
)

probes(
    "launch",
    ("nproc_zero", lambda d: cli("launch", "cpt", FX.recipe(d), "--nproc", "0", "--dry-run"), "nproc"),
    ("launch_unknown_stage", lambda d: cli("launch", "train", FX.recipe(d), "--dry-run"), "train"),
    ("launch_stray_argument", lambda d: cli("launch", "cpt", FX.recipe(d), "extra", "--dry-run"), "extra"),
)


# ---------------------------------------------------------------------------------------------------- hostfile

def hostfile(content: str | bytes) -> Callable[[Path], Result]:
    return lambda d: cli("launch", "cpt", FX.recipe(d), "--hostfile", put(d, "hosts", content), "--dry-run")


probes(
    "hostfile",
    ("host_dash", hostfile("-oProxyCommand=touch_pwned slots=1\n"), "hosts"),
    ("hostfile_binary", hostfile(bytes(range(256))), "hosts"),
    ("hostfile_non_utf8", hostfile("n\u00f6de1 slots=1\n".encode("latin-1")), "hosts"),
    ("hostfile_bad_slots", hostfile("node1 slots=two\n"), "hosts"),
    ("hostfile_empty", hostfile("# nothing\n"), "hosts"),
    ("hostfile_missing", lambda d: cli("launch", "cpt", FX.recipe(d), "--hostfile", d / "nope", "--dry-run"), "nope"),
    ("hostfile_semicolon_host", hostfile("node1;touch_x slots=1\n"), "hosts"),
    ("hostfile_duplicate_host", hostfile("node1 slots=1\nnode1 slots=1\n"), "node1"),
    # the default must keep ssh's host key check on; `no` is an opt-in
    ("hostfile_key_checking_default", hostfile("node1 slots=1\nnode2 slots=1\n"), (),
     lambda d, res: "StrictHostKeyChecking=no" not in res.out),
)


# ------------------------------------------------------------------------------------------------------- prune

def pruned(*args) -> Callable[[Path], Result]:
    return lambda d: prune(d, *args, "--output", d / "out")


def prune_into_copy(d: Path, output: str) -> Result:
    """Prune a private copy of the model into ``output``, a path inside that copy ("" is the copy itself)."""
    model = model_copy(d)
    return cli("prune", "--model", model, "--criterion", "magnitude", "--num-blocks", "1", "--output", model / output,
               "--run-dir", d / "run")


def p_output_is_a_file(d):
    res = prune_ppl(d, FX.calib, "--output", put(d, "out", "precious"))
    verdict = refusal(res, names=("out",))
    if verdict[0] == "clear-error" and (d / "out").read_text() != "precious":
        return "silently-wrong", "refused but the file was changed"
    return verdict[0], verdict[1] + ("" if res.wall < 60 else f" (after {res.wall:.0f}s)")


def second_prune(d: Path, *args, ok: Callable[[], bool]) -> tuple[str, str]:
    # a second prune into the same output with another setting: redo it or refuse, never keep the old weights
    first = prune(d, "--num-blocks", "1", "--output", d / "out")
    if first.rc != 0:
        return refusal(first)
    return refusal(prune(d, *args, "--output", d / "out"), names=("out",), ok=ok)


def p_prune_twice_changed_ratio(d):
    return second_prune(d, "--num-blocks", "2", ok=lambda: layers(d / "out") == 2)


def p_prune_depth_then_width_same_output(d):
    def ok():
        cfg = json.loads((d / "out" / "config.json").read_text())
        return cfg["num_hidden_layers"] == 4 and cfg["intermediate_size"] == 32
    return second_prune(d, "--method", "width", "--criterion", "maw", "--ratio", "0.5", "--round-to", "32", ok=ok)


probes(
    "prune",
    ("output_equals_input", lambda d: prune_into_copy(d, ""), lambda d: str(d / "m"), lambda d, _: False),
    ("output_inside_input", lambda d: prune_into_copy(d, "p"), (),
     lambda d, _: layers(d / "m") == 4 and layers(d / "m" / "p") == 3),
    ("blocks_empty", pruned("--blocks", "[]"), "blocks"),
    ("blocks_out_of_range", pruned("--blocks", "[9]"), "blocks"),
    ("blocks_duplicate", pruned("--blocks", "[1, 1]"), "blocks", lambda d, _: layers(d / "out") == 3),
    ("blocks_negative", pruned("--blocks", "[-1]"), "blocks"),
    ("all_blocks", pruned("--num-blocks", "4"), "num_blocks"),
    ("ratio_above_one", pruned("--ratio", "1.5"), "ratio"),
    ("ratio_negative", pruned("--ratio", "-0.2"), "ratio"),
    ("ratio_and_blocks", pruned("--ratio", "0.25", "--num-blocks", "2"), "ratio"),
    ("dry_run_flag", lambda d: prune(d, "--num-blocks", "1", "--output", d / "out", "--dry-run"), "--dry-run",
     lambda d, _: not (d / "out").exists()),
    ("stray_positional", lambda d: cli("prune", FX.recipe(
        d, f"prune: {{criterion: magnitude, num_blocks: 1, output: {d / 'out'}}}\n"), "oops"), "oops"),
    ("calib_seq_len_above_max_positions", lambda d: prune(d, "--criterion", "ppl", "--calibration", FX.calib,
                                                          "--num-blocks", "1", "--seq-len", "4096", "--num-samples",
                                                          "2", "--output", d / "out"), "seq_len"),
    p_output_is_a_file,
    ("unknown_criterion", lambda d: prune(d, "--criterion", "vibes", "--num-blocks", "1"), "vibes"),
    ("calibration_missing",
     lambda d: prune(d, "--criterion", "ppl", "--num-blocks", "1", "--calibration", d / "nope.jsonl"), "nope.jsonl"),
    ("calibration_binary", lambda d: prune_ppl(d, put(d, "c.jsonl", bytes(range(256)) * 40)), "c.jsonl"),
    ("calibration_non_utf8_txt", lambda d: prune_ppl(d, put(d, "c.txt", ("caf\u00e9 " * 400 + "\n").encode(
        "latin-1") * 5), "--output", d / "out"), "c.txt", lambda d, _: layers(d / "out") == 3),
    ("calibration_wrong_field", lambda d: prune_ppl(d, FX.calib, "--prune.calibration.text_field", "body"), "body"),
    ("calibration_empty", lambda d: prune_ppl(d, put(d, "c.jsonl", "")), "c.jsonl"),
    ("width_ratio_all", lambda d: prune(d, "--method", "width", "--criterion", "maw", "--ratio", "1.0"), "ratio"),
    p_prune_twice_changed_ratio,
    p_prune_depth_then_width_same_output,
)


# ------------------------------------------------------------------------------------------------- model files

def broken(edit: Callable[[Path], object]) -> Callable[[Path], Result]:
    return lambda d: prune_model(d, model_copy(d, edit))


def config(**keys) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        (model / "config.json").write_text(json.dumps(json.loads((model / "config.json").read_text()) | keys))
    return edit


def halve(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# a header that claims more bytes than the file holds
HEADER = b'{"model.embed_tokens.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 99999]}}'

probes(
    "model",
    ("truncated_safetensors", broken(lambda m: halve(m / "model.safetensors")), "model.safetensors"),
    ("garbage_safetensors", broken(lambda m: put(m, "model.safetensors", b"\xff" * 4096)), "model.safetensors"),
    ("safetensors_bad_header", broken(lambda m: put(m, "model.safetensors", len(HEADER).to_bytes(8, "little")
                                                    + HEADER + b"\0" * 4)), "model.safetensors"),
    ("config_invalid_json", broken(lambda m: put(m, "config.json", "{not json")), "config.json"),
    ("config_binary", broken(lambda m: put(m, "config.json", bytes(range(256)))), "config.json"),
    ("config_unknown_architecture", broken(config(model_type="mamba_xl")), "mamba_xl"),
    ("config_layers_mismatch", broken(config(num_hidden_layers=6)), "m"),
    ("missing_weights", broken(lambda m: (m / "model.safetensors").unlink()), "m"),
    ("corrupt_gguf", lambda d: prune_model(d, put(d, "x.gguf", b"GGUF" + bytes(range(256)) * 10)), "x.gguf"),
    ("truncated_gguf", lambda d: prune_model(d, put(d, "y.gguf", b"GGUF\x03\x00\x00\x00")), "y.gguf"),
    ("model_is_text_file", lambda d: prune_model(d, put(d, "model.bin", "hello")), "model.bin"),
    ("model_missing_offline", lambda d: prune_model(d, d / "no_such_model"), "no_such_model"),
    ("tokenizer_corrupt", broken(lambda m: put(m, "tokenizer.json", "{oops")), "tokenizer"),
)


# -------------------------------------------------------------------------------------------------------- eval

def ppl_of(name: str, content: str | bytes) -> Callable[[Path], Result]:
    return lambda d: evaluate(d, [put(d, name, content)])


def eval_task(task: str, content: str | bytes) -> Callable[[Path], Result]:
    return lambda d: cli("eval", FX.recipe(d, f"eval: {{tasks: {{{task}: {put(d, 't.jsonl', content)}}}, "
                                              "context_lengths: [32]}\n"), "--input", FX.model, "--output", d / "ev")


def both_reported(d: Path, _) -> bool:
    # two files of one name: each needs its own entry, told apart by its path
    text = (d / "ev" / "eval.json").read_text()
    report = json.loads(text)
    return str(d / "a" / "x.txt") in text or (text.count("x.txt") >= 2 and len(report.get("perplexity", report)) >= 2)


def ppl_numbers(x) -> list[float]:
    if isinstance(x, dict):
        return [n for k, v in x.items()
                for n in ([v] if k in ("ppl", "perplexity") and isinstance(v, (int, float)) else ppl_numbers(v))]
    return [n for v in x for n in ppl_numbers(v)] if isinstance(x, list) else []


def p_ppl_jsonl_gz(d):
    lines = jsonl({"text": FX.text * 3} for _ in range(5))
    with gzip.open(put(d, "g") / "p.jsonl.gz", "wt") as fh:
        fh.write(lines)
    res = evaluate(d, [put(d, "p.jsonl", lines), d / "g" / "p.jsonl.gz"])

    def ok():  # the same text, gzipped or not, has the same perplexity
        numbers = ppl_numbers(json.loads((d / "ev" / "eval.json").read_text()))
        return len(numbers) >= 2 and abs(numbers[0] - numbers[1]) < 1e-3 * numbers[0]
    return refusal(res, ok=ok)


def p_eval_output_is_file(d):
    res = evaluate(d, [FX.heldout], output=put(d, "evfile", "precious"))
    return kept(d / "evfile", refusal(res, names=("evfile",)))


probes(
    "eval",
    ("ppl_same_basename", lambda d: evaluate(d, [put(d, "a/x.txt", FX.text * 10),
                                                 put(d, "b/x.txt", "completely different words here. " * 200)]),
     (), both_reported),
    p_ppl_jsonl_gz,
    ("ppl_invalid_json", ppl_of("bad.json", '[{"text": "a"}, {"text": '), "bad.json"),
    ("ppl_binary", ppl_of("bin.txt", bytes(range(256)) * 50), "bin.txt"),
    ("ppl_missing", lambda d: evaluate(d, [d / "gone.txt"]), "gone.txt"),
    ("ppl_empty", ppl_of("empty.txt", ""), "empty.txt"),
    p_eval_output_is_file,
    ("eval_context_zero", lambda d: cli("eval", FX.recipe(
        d, f"eval: {{perplexity_files: [{FX.heldout}], context_lengths: [0]}}\n"), "--input", FX.model,
        "--output", d / "ev"), "context_lengths"),
    ("eval_unknown_task", eval_task("arc_hardest", '{"question": "q"}\n'), "arc_hardest"),
    ("eval_task_file_garbage", eval_task("arc_easy", bytes(range(256)) * 10), "t.jsonl"),
)


# -------------------------------------------------------------------------------------------------------- data

def data_stats(source: Callable[[Path], object], *extra) -> Callable[[Path], Result]:
    """``healer data stats`` on one source, ``source(d)`` as YAML flow (a path stands for ``{path: ...}``)."""
    def run(d: Path) -> Result:
        spec = source(d)
        if isinstance(spec, Path):
            spec = f"{{path: {spec}}}"
        path = put(d, "data.yaml", f"name: p\nrun_dir: {d / 'run'}\nmodel: {{source: {FX.model}}}\ndata:\n"
                                   f"  sources: [{spec}]\n  seq_len: 32\n")
        return cli("data", "stats", "--config", path, "--batches", "2", *extra)
    return run


def corrupt_shard_corpus(d: Path) -> Path:
    import zstandard
    for shard in range(3):
        put(d, f"c/good_{shard}.jsonl", jsonl({"text": f"{shard} {i} " + FX.text} for i in range(20)))
    good = zstandard.ZstdCompressor().compress(b'{"text": "hi"}\n' * 50)
    return put(d, "c/bad.jsonl.zst", good[: len(good) // 2] + b"\x00garbage" * 20).parent


STRICT = ("--data.bad_records", "strict")

probes(
    "data",
    ("negative_source_weight", data_stats(lambda d: f"{{path: {FX.corpus}, weight: -1}}"), "weight"),
    ("negative_domain_weight", data_stats(lambda d: f"{{path: {FX.corpus}, domains: {{Tiny: -0.5, Other: 1.5}}}}"),
     "domains"),
    ("domain_weights_sum_zero", data_stats(lambda d: f"{{path: {FX.corpus}, domains: {{Tiny: 0, Other: 0}}}}"),
     "domains"),
    ("source_weights_sum_zero", data_stats(lambda d: f"{{path: {FX.corpus}, weight: 0}}"), "weight"),
    ("sft_seq_len_above_max_positions", lambda d: sft(d, FX.instruct, max_seq_len=4096), "max_seq_len"),
    ("cpt_seq_len_above_max_positions", lambda d: cli("cpt", FX.cpt_recipe(d, d / "cpt", seq_len=4096)), "seq_len"),
    ("source_missing", data_stats(lambda d: d / "nowhere"), "nowhere"),
    ("source_empty_dir", data_stats(lambda d: put(d, "empty")), "empty"),
    # `skipped: corrupt_shard 1`: the one corrupt shard, counted once although two workers read the source
    ("corrupt_shard_two_workers", data_stats(corrupt_shard_corpus, "--workers", "2", "--batches", "40"), (),
     lambda d, res: [int(n) for n in re.findall(r"corrupt_shard[:=]?\s+(\d+)", res.out + res.err)] == [1]),
    ("bad_records_strict", data_stats(lambda d: put(d, "c/a.jsonl", '{"text": "ok"}\n{"text": broken\n'
                                                    + '{"text": "fine"}\n' * 10).parent, *STRICT), "a.jsonl"),
    ("jsonl_not_utf8", data_stats(lambda d: put(d, "c/a.jsonl", b'{"text": "caf\xe9"}\n' * 50).parent, *STRICT),
     "a.jsonl"),
)


# ------------------------------------------------------------------------------------------------------ memory

PEAK = "healer-probe-peak-rss-kb="
# Runs the CLI as its only child and reports that child's peak RSS (RUSAGE_CHILDREN of a fresh process).
WRAP = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
        f"print('{PEAK}%d' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")


def within_memory(args: list, ok: Callable[[], bool]) -> tuple[str, str]:
    """The CLI with its peak resident memory measured: the result must be right and the peak under 1.2 GB."""
    res = run_cmd([sys.executable, "-c", WRAP, sys.executable, "-m", "healer", *map(str, args)], 300)
    peak = [int(line[len(PEAK):]) for line in res.err.splitlines() if line.startswith(PEAK)]
    res.err = "\n".join(line for line in res.err.splitlines() if not line.startswith(PEAK))
    res.peak_rss_mb = peak[0] / 1024 if peak else float("inf")
    verdict = refusal(res, ok=lambda: res.peak_rss_mb < 1200 and ok())
    return verdict[0], f"peak RSS {res.peak_rss_mb:.0f} MB; " + verdict[1]


def big_record(d: Path, name: str) -> Path:
    word = "pruning heals blocks "
    return put(d, name, json.dumps({"text": word * (10_000_000 // len(word))}) + "\n")


def p_10mb_record_stream(d):
    config = put(d, "data.yaml", f"name: p\nmodel: {{source: {FX.model}}}\ndata:\n"
                                 f"  sources: [{{path: {big_record(d, 'c/big.jsonl').parent}}}]\n  seq_len: 32\n")
    return within_memory(["data", "stats", "--config", config, "--batches", "4"], ok=lambda: True)


def p_10mb_record_calibration(d):
    return within_memory(["prune", "--model", FX.model, "--criterion", "ppl", "--calibration",
                          big_record(d, "big.jsonl"), "--num-samples", "2", "--seq-len", "32", "--num-blocks", "1",
                          "--output", d / "out", "--keep-first", "0", "--keep-last", "0", "--run-dir", d / "run"],
                         ok=lambda: layers(d / "out") == 3)


probes("memory", p_10mb_record_stream, p_10mb_record_calibration)


# --------------------------------------------------------------------------------------------------------- sft

def sft(d: Path, data: Path, max_seq_len: int = 64) -> Result:
    return cli("sft", FX.recipe(d, f"sft: {{data: {data}, max_steps: 1, micro_batch_size: 2, global_batch_size: 2, "
                                   f"input: {FX.model}, output: {d / 'sft'}, max_seq_len: {max_seq_len}}}\n"))


def sft_on(name: str, content: str | bytes) -> Callable[[Path], Result]:
    return lambda d: sft(d, put(d, name, content))


probes(
    "sft",
    ("sft_binary", sft_on("s.json", bytes(range(256)) * 20), "s.json"),
    ("sft_non_utf8", sft_on("s.jsonl", b'{"instruction": "caf\xe9", "output": "x"}\n' * 5), "s.jsonl"),
    ("sft_missing_fields", sft_on("s.json", json.dumps([{"question": "q", "answer": "a"}] * 4)), "s.json"),
    ("sft_empty_list", sft_on("s.json", "[]"), "s.json"),
    ("sft_invalid_json", sft_on("s.json", '[{"instruction": "a", "output": '), "s.json"),
    ("sft_missing", lambda d: sft(d, d / "gone.json"), "gone.json"),
)


# ------------------------------------------------------------------------------------------------- checkpoints

class Evil:
    """Unpickling this touches ``marker``: proof that a checkpoint file ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_pickle(marker: Path, size: int = 0) -> bytes:
    payload = pickle.dumps(Evil(marker), protocol=2)
    # padded to the size complete.json recorded, so a size check alone does not catch it
    return payload + b"\0" * max(0, size - len(payload))


LAST = "step00000002"


def resumed(edit: Callable[[Path, Path], object] | None = None, **over) -> Callable[[Path], Result]:
    """Resume a copy of the finished 2-step stage (in ``d / "cpt"``) after ``edit(d, stage)``."""
    def run(d: Path) -> Result:
        stage, corpus = FX.cpt_copy(d)
        if edit:
            edit(d, stage)
        return resume(d, stage, corpus, **over)
    return run


def largest_state_file(stage: Path) -> Path:
    """The biggest ``*_states.pt`` of the last checkpoint: the optimizer state (its file name depends on the
    engine: a one-rank ZeRO-1/2 run uses a stage-0 engine, which keeps it in ``mp_rank_00_model_states.pt``)."""
    return max((stage / "checkpoints" / LAST).glob("*_states.pt"), key=lambda f: f.stat().st_size)


def rewrite(pick: Callable[[Path], Path], new: Callable[[Path], bytes]) -> Callable[[Path, Path], None]:
    """An edit for :func:`resumed`: the checkpoint file ``pick(stage)`` replaced by ``new(that file)``."""
    def edit(d: Path, stage: Path) -> None:
        target = pick(stage)
        target.write_bytes(new(target))
    return edit


def fell_back(d: Path, res: Result) -> bool:
    """Resumed from the checkpoint before the broken one and trained on to step 3."""
    return "step00000001" in res.err and steps(d / "cpt")[-2:] == [2, 3]


def resumed_elastic(d: Path, res: Result) -> bool:
    # Another ZeRO stage is an elastic resume (README, "Resume"); on one rank ZeRO-1 and 2 both run as ZeRO-0,
    # so it is a plain resume. Either way it must go on from step 2 and say why.
    said = res.err + res.out
    return ("resumed from" in said and "step00000002" in said
            and ("elastic resume" in said or "one rank shards nothing" in said) and steps(d / "cpt")[-2:] == [2, 3])


def p_crafted_model_states_same_size(d):
    def plant(d, stage):
        for step in ("step00000001", LAST):
            target = stage / "checkpoints" / step / "mp_rank_00_model_states.pt"
            target.write_bytes(evil_pickle(d / "pwned", target.stat().st_size))
    res = resumed(plant, cpt={"max_steps": 3})(d)
    return unless_ran(d / "pwned", refusal(res, names=("checkpoint",)),
                      "DeepSpeed unpickled a crafted *_model_states.pt (documented trust boundary)")


def p_resume_changed_data_same_names(d):
    stage, corpus = FX.cpt_copy(d)
    shutil.copytree(corpus, d / "original")
    try:
        for f in corpus.iterdir():
            f.write_text(jsonl({"text": f"replaced {i} " + "other words " * 20} for i in range(25)))
        res = resume(d, stage, corpus, cpt={"max_steps": 3})
    finally:  # the corpus is shared with every other checkpoint probe
        shutil.rmtree(corpus)
        shutil.copytree(d / "original", corpus)
    said = any(w in res.err.lower() for w in ("changed", "fingerprint", "different"))
    return refusal(res, names=("data",), ok=lambda: said and steps(stage)[-1] == 3)


def p_resume_more_steps_from_another_input(d):
    from helpers import save_tiny
    stage, corpus = FX.cpt_copy(d)
    other = save_tiny(d, "llama", name="other", layers=4, hidden=32, intermediate=64, seed=5)  # same shapes
    res = resume(d, stage, corpus, cpt={"max_steps": 3, "input": str(other)})
    return refusal(res, names=("cpt.input", str(other)))


def p_resume_dir_not_a_checkpoint(d):
    junk = put(d, "junk/x.pt", evil_pickle(d / "pwned")).parent
    res = cli("cpt", "--config", FX.cpt_recipe(d, d / "cpt"), "--resume", junk)
    return unless_ran(d / "pwned", refusal(res, names=("junk",)), "ran code")


probes(
    "checkpoint",
    ("crafted_trainer_state_pt", resumed(lambda d, stage: put(stage / "checkpoints" / LAST, "trainer_state_rank0.pt",
                                                              evil_pickle(d / "pwned")), cpt={"max_steps": 3}),
     (), lambda d, _: not (d / "pwned").exists() and steps(d / "cpt")[-1] == 3),
    p_crafted_model_states_same_size,
    ("truncated_with_complete", resumed(rewrite(largest_state_file, lambda f: f.read_bytes()[:100]),
                                        cpt={"max_steps": 3}), (), fell_back),
    ("same_size_garbage_with_complete", resumed(rewrite(largest_state_file, lambda f: b"\x13" * f.stat().st_size),
                                                cpt={"max_steps": 3}), LAST, fell_back),
    ("trainer_state_garbage", resumed(rewrite(lambda stage: stage / "checkpoints" / LAST / "trainer_state_rank0.json",
                                              lambda f: b"x" * f.stat().st_size), cpt={"max_steps": 3}),
     LAST, fell_back),
    ("zero_stage_change", resumed(cpt={"max_steps": 3, "zero_stage": 1}), "zero_stage", resumed_elastic),
    ("resume_changed_lr", resumed(cpt={"max_steps": 3, "lr": 0.1}), "lr",
     lambda d, _: abs(metrics(d / "cpt")[-1]["train/lr"] - 0.1) < 1e-9),
    ("resume_more_steps", resumed(cpt={"max_steps": 4}), "max_steps", lambda d, _: steps(d / "cpt") == [1, 2, 3, 4]
     and json.loads((d / "cpt" / "manifest.json").read_text())["outputs"]["steps"] == 4),
    ("resume_changed_seq_len", resumed(cpt={"max_steps": 3}, seq_len=16), "seq_len",
     lambda d, _: steps(d / "cpt")[-1] == 3),
    p_resume_changed_data_same_names,
    p_resume_more_steps_from_another_input,
    p_resume_dir_not_a_checkpoint,
)


# ------------------------------------------------------------------------------------------------------- stale

def p_cpt_finished_then_new_input(d):
    stage, corpus = FX.cpt_copy(d)
    first = prune(d, "--num-blocks", "1", "--output", d / "pruned")
    if first.rc != 0:
        return refusal(first)
    res = resume(d, stage, corpus, cpt={"input": str(d / "pruned")})
    return refusal(res, names=("cpt",), ok=lambda: layers(stage / "hf") == 3 and "skipping" not in res.err)


def p_eval_finished_then_other_input(d):
    first = prune(d, "--num-blocks", "1", "--output", d / "pruned")
    res1 = evaluate(d, [FX.heldout])
    if res1.rc != 0 or first.rc != 0:
        return refusal(res1)
    before = (d / "ev" / "eval.json").read_text()
    recipe = FX.recipe(d, f"eval: {{perplexity_files: [{FX.heldout}], context_lengths: [32], max_tokens: 512}}\n",
                       name="r2.yaml")
    res = cli("eval", recipe, "--input", d / "pruned", "--output", d / "ev")
    return refusal(res, names=("eval",), ok=lambda: (d / "ev" / "eval.json").read_text() != before)


def p_run_model_rewritten_at_same_path(d):
    from helpers import save_tiny
    model = d / "model"
    shutil.copytree(FX.model, model)
    recipe = put(d, "r.yaml", f"name: probe\nrun_dir: {d / 'run'}\nmodel: {{source: {model}}}\n"
                              "prune: {method: depth, blocks: [1]}\n")
    first = cli("run", recipe)
    if first.rc != 0:
        return refusal(first)
    save_tiny(d, "llama", name="model", layers=4, hidden=32, intermediate=64, seed=7)  # same size, other bytes
    return refusal(cli("run", recipe), names=("model.source file model.safetensors",))


def p_sft_data_records_reordered(d):
    recipe = FX.recipe(d, f"sft: {{data: {d / 'instruct.json'}, max_steps: 1, micro_batch_size: 2, "
                          "global_batch_size: 2, max_seq_len: 320, zero_stage: 0}\n")
    records = json.loads(FX.instruct.read_text())
    put(d, "instruct.json", json.dumps(records))
    first = cli("sft", recipe)
    if first.rc != 0:
        return refusal(first)
    put(d, "instruct.json", json.dumps(records[::-1]))  # the same records, another order: other batches
    return refusal(cli("run", recipe, "--only", "sft"), names=("sft.data file instruct.json",))


probes(
    "stale",
    p_run_model_rewritten_at_same_path,
    p_sft_data_records_reordered,
    p_cpt_finished_then_new_input,
    ("cpt_finished_then_changed_lr", resumed(cpt={"lr": 0.01}), "lr",
     lambda d, res: "skipping" not in res.err and metrics(d / "cpt")[-1]["train/lr"] == 0.01),
    p_eval_finished_then_other_input,
)


# ------------------------------------------------------------------------------------------------- concurrency

def pair(args_a: list, args_b: list, delay: float, timeout: float, ok: Callable[[], bool]) -> tuple[str, str]:
    """Two runs started ``delay`` seconds apart on one output: the second may wait or refuse saying the output is
    in use; the result must be consistent either way."""
    def spawn(args):
        return subprocess.Popen([sys.executable, "-m", "healer", *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace")
    procs = [spawn(args_a)]
    time.sleep(delay)
    procs.append(spawn(args_b))
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
            results.append(Result(p.returncode, out, err, 0))
        except subprocess.TimeoutExpired:
            p.kill()
            results.append(Result(None, *p.communicate(), 0))
    if any(r.rc is None for r in results):
        return "hang", "a run did not finish"
    if any(TRACEBACK in r.err for r in results):
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
        return ("correct", "both finished, result consistent") if good else \
            ("silently-wrong", "both exit 0, result inconsistent")
    return "silently-wrong", "both failed: " + last_line(results[0].err)[:160]


def p_two_prunes_one_output(d):
    def ok():
        report = json.loads((d / "out" / "prune_report.json").read_text())
        removed = report.get("removed_blocks") or report.get("blocks") or report.get("removed") or []
        return layers(d / "out") == 4 - (len(removed) if isinstance(removed, list) else int(removed))

    def args(blocks: str, run_dir: str) -> list:
        return ["prune", "--model", FX.model, "--criterion", "magnitude", "--num-blocks", blocks, "--output",
                d / "out", "--run-dir", d / run_dir]
    return pair(args("1", "r1"), args("2", "r2"), 1.0, 300, ok)


def p_two_cpt_one_stage(d):
    recipe = FX.cpt_recipe(d, d / "cpt", cpt={"max_steps": 3})
    return pair(["cpt", "--config", recipe], ["cpt", "--config", recipe], 2.0, 500,
                ok=lambda: steps(d / "cpt") == [1, 2, 3])


def p_two_evals_one_output(d):
    recipe = FX.recipe(d, f"eval: {{perplexity_files: [{FX.heldout}], context_lengths: [32], max_tokens: 512}}\n")
    args = ["eval", recipe, "--input", FX.model, "--output", d / "ev"]
    return pair(args, args, 0.5, 300, ok=lambda: json.loads((d / "ev" / "eval.json").read_text()) is not None)


probes("concurrency", p_two_prunes_one_output, p_two_cpt_one_stage, p_two_evals_one_output)


# ----------------------------------------------------------------------------------------------------- release

SECRET, WANDB = "hf_ProbeSecretValue0123456789abcdef", "wandbsecret0123456789"


def release(extra: str = "", *args, output: str = "rel") -> Callable[[Path], Result]:
    return lambda d: cli("release", FX.recipe(d, f"release: {{input: {FX.model}, output: {d / output}}}\n" + extra),
                         *args)


def no_secret(out: Path, *secrets: str) -> bool:
    return not any(f.is_file() and s.encode() in f.read_bytes() for f in out.rglob("*") for s in secrets)


def loads(d: Path, _) -> bool:
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(d / "rel")
    return (d / "rel" / "README.md").is_file()


def p_release_output_is_file(d):
    put(d, "relfile", "precious")
    return kept(d / "relfile", refusal(release(output="relfile")(d), names=("relfile",)))


probes(
    "release",
    ("secret_env_in_release", release(f"launch: {{env: {{HF_TOKEN: {SECRET}, WANDB_API_KEY: {WANDB}}}}}\n"), (),
     lambda d, res: no_secret(d / "rel", SECRET, WANDB) and SECRET not in res.out + res.err),
    ("secret_override_in_release", release("", "--launch.env", json.dumps({"HF_TOKEN": SECRET})), (),
     lambda d, res: no_secret(d / "rel", SECRET) and SECRET not in res.out + res.err),
    # a token pasted where it does not belong (a tag) still must not be published
    ("token_looking_value_in_release", release("", "--release.tags", json.dumps([SECRET])), (),
     lambda d, _: no_secret(d / "rel", SECRET)),
    ("release_output_is_input", lambda d: cli("release", FX.recipe(
        d, "release: {{input: {m}, output: {m}}}\n".format(m=model_copy(d)))), lambda d: str(d / "m")),
    p_release_output_is_file,
    ("release_input_missing", lambda d: cli("release", FX.recipe(
        d, f"release: {{input: {d / 'gone'}, output: {d / 'rel'}}}\n")), "gone"),
    ("release_loads", release(), (), loads),
)


# ------------------------------------------------------------------------------------ results that must be true

def alias_bomb(d: Path) -> Path:
    """Nine levels of nine YAML aliases: 400 bytes that stand for 9**9 values."""
    lines = ["model: {source: x}", "a: &a [" + ", ".join(["x"] * 9) + "]"]
    lines += [f"{b}: &{b} [" + ", ".join([f"*{a}"] * 9) + "]" for a, b in zip("abcdefgh", "bcdefghi")]
    return put(d, "bomb.yaml", "\n".join(lines) + "\n")


ALIAS_BOMB_OVERRIDE = ("prune.blocks={a: &a [1,1,1,1,1,1,1,1,1,1], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
                       "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
                       "e: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]}")


def finished(d: Path, stage: str) -> Path:
    """A directory a finished ``stage`` claims (its manifest), as another stage's output."""
    from healer.core.manifest import write_stage_manifest

    write_stage_manifest(d / "run" / stage, stage, None, {"steps": 1})
    return d / "run" / stage


def bad_task_file(d: Path) -> Path:
    return put(d, "arc.jsonl", jsonl([{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                                       "answerKey": "C"}]))


def p_release_keeps_a_users_partial_dir(d):
    mine = put(d, "rel.partial/notes.txt", "mine")
    res = cli("release", FX.recipe(d), f"release.input={FX.model}", f"release.output={d / 'rel'}")
    return refusal(res, ok=lambda: mine.read_text() == "mine" and (d / "rel" / "manifest.json").exists())


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
    res = resume(d, stage, corpus, cpt={"max_steps": 3})
    return unless_ran(marker, refusal(res, names=("refused to load",)), "the planted pickle ran")


probes(
    "numbers",
    ("lr_inf", lambda d: cli("cpt", FX.recipe(d), "--cpt.lr", "inf"), "cpt.lr"),
    ("lr_nan_in_yaml", lambda d: cli("cpt", FX.recipe(d, "cpt: {lr: .nan}\n")), "cpt.lr"),
    ("betas_nan", lambda d: cli("cpt", FX.recipe(d), "cpt.betas=[nan,0.95]"), "cpt.betas"),
    ("beta_one", lambda d: cli("cpt", FX.recipe(d), "cpt.betas=[0.9,1.5]"), "cpt.betas"),
    ("kd_temperature_inf", lambda d: cli("cpt", FX.recipe(d), "cpt.kd.temperature=inf"), "cpt.kd.temperature"),
    ("sft_epochs_inf", lambda d: cli("sft", FX.recipe(d), "sft.epochs=inf"), "sft.epochs"),
    ("weight_inf", lambda d: cli("cpt", FX.recipe(d), "data.sources=[{path: x, weight: .inf}]"),
     "data.sources.0.weight"),
)

probes(
    "input",
    ("yaml_alias_bomb", lambda d: cli("prune", alias_bomb(d), timeout=30), "aliases"),
    ("yaml_alias_bomb_override", lambda d: cli("prune", FX.recipe(d), ALIAS_BOMB_OVERRIDE, timeout=30), "aliases"),
    ("run_dir_self_reference", lambda d: cli("prune", FX.recipe(d), "--run-dir", "${run_dir}/x"), "run_dir"),
    ("unknown_task_before_perplexity", lambda d: cli("eval", FX.recipe(d), f"eval.tasks={{arcc_easy: {d}/a}}"),
     "arcc_easy"),
    ("task_record_bad_answer",
     lambda d: cli("eval", FX.recipe(d), f"eval.perplexity_files=[{FX.heldout}]", "eval.context_lengths=[16]",
                   f"eval.tasks={{arc_easy: {bad_task_file(d)}}}"), "arc.jsonl record 1"),
    ("only_cpt_on_a_fresh_run_dir", lambda d: cli("run", FX.recipe(
        d, "prune: {num_blocks: 1, criterion: magnitude}\ncpt: {max_steps: 1}\n"), "--only", "cpt"),
     "prune has not written"),
    ("model_name_newline", lambda d: cli("release", FX.recipe(d), 'release.model_name="x\nlicense: mit"'),
     "release.model_name"),
    ("repo_id_quote", lambda d: cli("release", FX.recipe(d), 'release.repo_id=a/b"); import os #'), "release.repo_id"),
)

probes(
    "ownership",
    ("sft_into_a_cpt_dir", lambda d: cli("sft", FX.recipe(d), f"sft.output={finished(d, 'cpt')}"), "sft.output"),
    ("eval_into_a_release", lambda d: cli("eval", FX.recipe(d), f"eval.output={finished(d, 'release')}"),
     "eval.output"),
    p_release_keeps_a_users_partial_dir,
)

probes(
    "numbers",
    # exit 0 would mean it trained on NaN
    ("lr_that_diverges_stops_at_its_step",
     lambda d: cli("cpt", "--config", FX.cpt_recipe(d, d / "cpt", cpt={"lr": 1e30, "max_steps": 6}), timeout=400),
     ("training loss is nan", "last good checkpoint"), lambda d, _: False),
)

probes("trust", p_planted_pickle_never_runs)


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
