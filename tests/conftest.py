"""Shared fixtures: the real data samples that live beside the checkout, and an earlier run."""

from pathlib import Path

import pytest
from main_cli import run

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` (real CIFAR-100 and VOC samples); the test is skipped without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def earlier(tmp_path_factory) -> Path:
    """A folder holding a finished earlier run (TorchAlexNet on tiny Shapes, with its log), for
    the catalogue rows to prove they leave it untouched. Copy it (``main_cli.run_case``) before
    running anything in it."""
    root = tmp_path_factory.mktemp("earlier")
    result = run("-ne", "1", "--shapes-train", "16", "--shapes-test", "8", "--batch-size", "16", "-l", cwd=root)
    assert result.returncode == 0, result.stderr
    return root
