"""Shared fixtures: sample photos, a tiny-model cache built once per session, the demo config."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO.parent / "shared" / "samples"


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 180.0, interval: float = 0.05) -> Any:
    """Poll until `condition()` is truthy and return that value: a deadline against hangs, never a
    timing assertion (a busy 2-core machine may take long)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def run_fresh(code: str) -> str:
    """Run `code` (dedented) in a new interpreter in the repository and return its stripped stdout:
    for what is process-wide (Pillow's settings, which modules were imported)."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def demo_args() -> dict[str, Any]:
    """The `args:` of configs/demo.yaml, as a fresh dict a test may change."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    return copy.deepcopy(config["applications"][0]["args"])


def sample_path(name: str) -> Path:
    """The shared sample photo `name` (../shared/samples); skips the test when it is not there."""
    path = SAMPLES / name
    if not path.is_file():
        pytest.skip("sample photos (../shared/samples) are not present")
    return path


@pytest.fixture(scope="session")
def sample_photo() -> bytes:
    return sample_path("photo_1.jpg").read_bytes()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache directory per test session: tiny models are generated into it once."""
    return tmp_path_factory.mktemp("imgserve-cache")
