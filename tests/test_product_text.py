"""The product speaks of itself in the present: no README, doc, code, test, bench, config or script narrates
where a behaviour came from (a tracker number, "the issue", a sitting, a machine it was once measured on)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("healer", "prune", "train", "launch", "configs", "bench", "scripts", "tests", ".ci", "docs")
HISTORY = re.compile(
    r"\bissues? ?#?\d+|\bISSUE_|\bthe issue\b|\bas the issue\b|earlier,? (?:busier )?machine|busier machine"
    r"|\bdev box\b|\bcontract \d\b|\bsittings?\b|\bon an? (?:earlier|older|previous) (?:machine|box|run)\b",
    re.IGNORECASE,
)


def _product_files():
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in {".py", ".yaml", ".json", ".sh", ".md", ".toml", ""} \
                    and path.resolve() != Path(__file__).resolve() and "__pycache__" not in path.parts:
                yield path
    yield ROOT / "pyproject.toml"
    yield ROOT / "README.md"


def test_no_file_narrates_its_history():
    hits = []
    for path in _product_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if HISTORY.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not hits, "text that narrates history instead of stating what is true:\n" + "\n".join(hits)


def test_the_pattern_catches_what_it_is_for():
    # Made-up lines of each kind the pattern refuses, and lines it must let through.
    for line in ("x (issue 99)", "ISSUE_ROWS = [1]", "as the issue says", "earlier machine",
                 "the dev box", "(contract 9)", "over several sittings", "on an earlier machine"):
        assert HISTORY.search(line), line
    for line in ("start_new_session=True", "an issue tracker", "issues a warning"):
        assert not HISTORY.search(line), line
