"""Kill every stage verb before each of its filesystem steps, for real, and run it again after each kill.

The tiny five-stage pipeline of ``tests/crashpoints.py`` is run once; then each verb is killed (``os._exit`` in a
forked child: no cleanup runs, as with SIGKILL) before its 1st, 2nd, ... last step that changes a file --
re-run over its own finished result with changed inputs, and as a first run -- and what each kill leaves is
judged: the previous result byte for byte under its manifest, the whole new result under the new one, or no
finished manifest. The verb is then run again on that state and must exit 0 with the result of a run that was
never killed. The test suite (``tests/test_kill_anywhere.py``) judges every step the same way and kills at a
few; this kills at all of them.

    python bench/kill_anywhere.py              # every step of every stage (about 10 minutes on 2 cores)
    python bench/kill_anywhere.py --kills 5    # five kills per case, spread over its steps
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> int:
    from crashpoints import RERUNS, run_plan, tiny_pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=None, help="real kills per case (default: before every step)")
    parser.add_argument("--out", type=Path, default=None, help="write the verdict JSON here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="healer-kill-anywhere-"))
    recipe = tiny_pipeline(work)
    base = ["--config", str(recipe)]
    cases = [{"stage": stage, "argv": [stage, *base, *flags], "kills": args.kills} for stage, flags in RERUNS.items()]
    cases += [{"stage": stage, "argv": [stage, *base], "kills": args.kills, "fresh": True} for stage in RERUNS]
    started = time.perf_counter()
    results = run_plan(work, {"run_dir": str(work / "run"), "template": str(work / "finished"),
                              "setup": [[stage, *base] for stage in RERUNS], "cases": cases}, timeout=3600)
    rows = [("stage", "case", "steps", "states judged", "killed", "recovered", "wrong")]
    for r in results:
        if "error" in r:
            rows.append((r["stage"], "first run" if r["fresh"] else "re-run", "-", "-", "-", "-", r["error"]))
            continue
        rows.append((r["stage"], "first run" if r["fresh"] else "re-run", str(r["steps"]),
                     str(r["checked"] + r["killed"]), str(r["killed"]), str(r["recovered"]), str(len(r["bad"]))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows))
    kills = sum(r.get("killed", 0) for r in results)
    wrong = sum(len(r.get("bad", [])) + ("error" in r) for r in results)
    print(f"\n{kills} kills, {sum(r.get('recovered', 0) for r in results)} recovered to the uninterrupted result, "
          f"{wrong} wrong; {time.perf_counter() - started:.0f} s")
    for r in results:
        for bad in r.get("bad", [])[:5]:
            print(f"  {r['stage']} step {bad['step']} ({bad['what']}, {bad['how']}): {bad['problem']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
