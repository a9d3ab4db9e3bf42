"""Shared fixtures: sample photos, a tiny-model cache built once per session, the demo config."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO.parent / "shared" / "samples"


def demo_args() -> dict[str, Any]:
    """The `args:` of configs/demo.yaml, as a fresh dict a test may change."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    return copy.deepcopy(config["applications"][0]["args"])


@pytest.fixture(scope="session")
def sample_photo() -> bytes:
    path = SAMPLES / "photo_1.jpg"
    if not path.is_file():
        pytest.skip("sample photos (../shared/samples) are not present")
    return path.read_bytes()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache directory per test session: tiny models are generated into it once."""
    return tmp_path_factory.mktemp("imgserve-cache")
