"""Stage directory locks: one writer at a time, the holder named, a dead holder's lock taken over."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import save_tiny

from healer.cli import main
from healer.core.errors import HealerError
from healer.core.lock import DirectoryLock, lock_path


def _hold(directory) -> subprocess.Popen:
    """Another process that holds ``directory``'s lock until killed."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from healer.core.lock import DirectoryLock
        with DirectoryLock({str(directory)!r}, "healer prune"):
            print("held", flush=True)
            time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "stage"
    holder = _hold(out)
    try:
        with pytest.raises(HealerError, match=rf"{out} is in use by pid {holder.pid} on .*\(healer prune\)"):
            DirectoryLock(out).acquire()
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's lock: the directory is free again, with a message.
    with DirectoryLock(out):
        assert json.loads(lock_path(out).read_text())["pid"] != holder.pid


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_message(tmp_path, capsys):
    out = tmp_path / "stage"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path(out).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                          "started": time.time() - 5, "command": "healer cpt"}))
    with DirectoryLock(out, "healer cpt"):
        pass
    err = capsys.readouterr().err
    assert f"taking over the stale lock on {out} left by pid {dead.pid}" in err
    assert not lock_path(out).exists()  # released


def test_lock_recorded_by_another_host_is_not_taken(tmp_path):
    out = tmp_path / "stage"
    lock_path(out).write_text(json.dumps({"host": "node-17", "pid": 4242, "started": time.time()}))
    with pytest.raises(HealerError, match=rf"locked by pid 4242 on node-17.*delete {lock_path(out)}"):
        DirectoryLock(out).acquire()


def test_released_on_an_exception_and_refuses_a_file(tmp_path):
    out = tmp_path / "stage"
    with pytest.raises(RuntimeError):
        with DirectoryLock(out):
            raise RuntimeError("boom")
    assert not lock_path(out).exists()
    DirectoryLock(out).acquire().release()
    (tmp_path / "file").write_text("x")
    with pytest.raises(HealerError, match="is a file"):
        DirectoryLock(tmp_path / "file").acquire()


def test_prune_into_a_locked_directory_is_refused_and_writes_nothing(tmp_path, capsys):
    src = save_tiny(tmp_path, layers=4)
    out = tmp_path / "pruned"
    holder = _hold(out)
    try:
        code = main(["prune", "--model", str(src), "--blocks", "[1]", "--output", str(out)])
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    assert f"in use by pid {holder.pid}" in capsys.readouterr().err
    assert not out.exists()


def test_two_concurrent_prunes_into_one_output(tmp_path, calibration_file):
    """Started together: one refuses, and the output is the other's, consistent with its report."""
    src = save_tiny(tmp_path, layers=6)
    out = tmp_path / "pruned"

    def start(blocks):
        return subprocess.Popen(
            [sys.executable, "-m", "healer", "prune", "--model", str(src), "--method", "depth",
             "--criterion", "block_influence", "--num-blocks", str(len(blocks)), "--calibration",
             str(calibration_file), "--num-samples", "8", "--seq-len", "64", "--output", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [start([1]), start([1, 2])]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "is in use by pid" in refused
    report = json.loads((out / "prune_report.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 - len(report["removed"])
    assert json.loads((out / "manifest.json").read_text())["outputs"]["params_after"] == report["params_after"]
