"""Shared fixtures (tiny tokenizer, calibration text, the shared data folder); helpers live in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "HEALER_CACHE" not in os.environ:  # file digests of the tests' throw-away models stay out of ~/.cache
    import tempfile

    os.environ["HEALER_CACHE"] = tempfile.mkdtemp(prefix="healer-test-cache-")

from helpers import SHARED_DATA, tiny_tokenizer  # noqa: E402  (the environment above must be set first)


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def calibration_file(tmp_path) -> Path:
    from helpers import write_calibration

    return write_calibration(tmp_path / "calib.jsonl")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA

