"""Check the import layers (the import-linter contracts in pyproject.toml).

prune/, train/, launch/ and configs/ install as healer.prune, healer.train, healer.launch and healer.configs
(pyproject's package-dir), so the source tree is not the package import-linter reads. This builds that
package as symlinks in a temporary directory and runs ``lint-imports`` on it; it exits as lint-imports does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MOUNTED = ("prune", "train", "launch", "configs")  # top-level folders that are subpackages of healer


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="healer-layers-") as tmp:
        package = Path(tmp) / "healer"
        package.mkdir()
        for entry in (ROOT / "healer").iterdir():
            if entry.name != "__pycache__":
                (package / entry.name).symlink_to(entry)
        for folder in MOUNTED:
            (package / folder).symlink_to(ROOT / folder)
        env = {**os.environ, "PYTHONPATH": tmp}
        # Run from the temporary directory, so `healer` resolves there and not to the editable install.
        lint = Path(sys.executable).parent / "lint-imports"  # installed with the dev extras
        if not lint.is_file():
            print(f"{lint} is missing: pip install -e '.[dev]'", file=sys.stderr)
            return 2
        return subprocess.run([str(lint), "--no-cache", str(ROOT / "pyproject.toml")], cwd=tmp, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
