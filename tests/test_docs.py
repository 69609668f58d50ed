"""The reference pages say what the code does: docs/recipe.md is `healer schema --markdown`, and every link
between README.md and docs/ leads to a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

from healer.recipe import Recipe
from healer.schema import schema_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_the_recipe_reference_is_the_schema():
    assert (ROOT / "docs" / "recipe.md").read_text() == schema_markdown(Recipe), \
        "docs/recipe.md is stale: healer schema --markdown > docs/recipe.md"


def test_relative_links_lead_to_files():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
