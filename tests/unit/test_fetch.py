"""`imgserve fetch`: every file's sha256 is checked, mismatches are deleted, pickles and paths that
leave the model directory are refused.

The hub cannot be reached from this machine, so its three calls are replaced by a local "hub"
directory (the one mock here, named as such: `fake_hub`); hashing, checking, deleting and the
manifest round trip are the real code.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from serve_app import cli, fetch
from tests.conftest import REPO

COMMIT = "a" * 40


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """MOCK of the Hugging Face hub (no network here): files served from a local directory."""
    hub = tmp_path / "hub"
    (hub / "transformer").mkdir(parents=True)
    (hub / "model_index.json").write_text('{"_class_name": "QwenImageEditPlusPipeline"}')
    (hub / "transformer" / "config.json").write_text('{"num_layers": 60}')
    (hub / "transformer" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (hub / "transformer" / "model.bin").write_bytes(b"pickle")

    def download(repo: str, name: str, revision: str, local_dir: Path) -> str:
        target = Path(local_dir) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(hub / name, target)
        return str(target)

    monkeypatch.setattr(fetch, "_download", lambda entry, name: Path(download(entry.repo, name, entry.revision, entry.dest)))
    monkeypatch.setattr(fetch, "_listed", lambda entry: sorted(
        str(p.relative_to(hub)) for p in hub.rglob("*") if p.is_file()
        and any(__import__("fnmatch").fnmatch(str(p.relative_to(hub)), pat) for pat in entry.include)))
    monkeypatch.setattr(fetch, "_pin", lambda entry: COMMIT)
    return hub


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(tmp_path: Path, **model) -> Path:
    entry = {"name": "edit", "repo": "Qwen/Qwen-Image-Edit-2511", "revision": COMMIT,
             "dest": str(tmp_path / "models" / "edit"), **model}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [entry]}))
    return path


def test_lock_pins_the_commit_and_records_hashes_then_fetch_verifies(tmp_path: Path, fake_hub: Path) -> None:
    path = manifest(tmp_path, revision="main", include=["model_index.json", "*/config.json", "*/*.safetensors"])
    assert cli.main(["fetch", str(path), "--lock"]) == 0
    locked = yaml.safe_load(path.read_text())["models"][0]
    assert locked["revision"] == COMMIT
    assert locked["files"] == {name: digest(fake_hub / name) for name in
                               ("model_index.json", "transformer/config.json", "transformer/model.safetensors")}
    shutil.rmtree(tmp_path / "models")
    assert cli.main(["fetch", str(path)]) == 0
    assert (tmp_path / "models" / "edit" / "transformer" / "model.safetensors").read_bytes().startswith(b"\x08")
    assert cli.main(["fetch", str(path), "--verify"]) == 0


def test_a_tampered_file_is_deleted_and_named(tmp_path: Path, fake_hub: Path, capsys) -> None:
    good = digest(fake_hub / "transformer" / "config.json")
    path = manifest(tmp_path, files={"transformer/config.json": good})
    (fake_hub / "transformer" / "config.json").write_text('{"num_layers": 61}')  # the download differs
    assert cli.main(["fetch", str(path)]) == 2
    err = capsys.readouterr().err
    assert "transformer/config.json has sha256" in err and good in err and "(deleted)" in err
    assert not (tmp_path / "models" / "edit" / "transformer" / "config.json").exists()


def test_verify_is_offline_and_reports_missing_or_changed_files(tmp_path: Path, fake_hub: Path, capsys) -> None:
    path = manifest(tmp_path, files={"model_index.json": digest(fake_hub / "model_index.json")})
    assert cli.main(["fetch", str(path), "--verify"]) == 2
    assert "missing" in capsys.readouterr().err
    assert cli.main(["fetch", str(path)]) == 0
    (tmp_path / "models" / "edit" / "model_index.json").write_text("{}")
    assert cli.main(["fetch", str(path), "--verify"]) == 2
    assert (tmp_path / "models" / "edit" / "model_index.json").exists()  # --verify never deletes


@pytest.mark.parametrize("bad, message", [
    ({"files": {"transformer/model.bin": "0" * 64}}, "pickle format"),
    ({"files": {"../../etc/passwd": "0" * 64}}, "leaves the model directory"),
    ({"files": {"/etc/passwd": "0" * 64}}, "leaves the model directory"),
    ({"files": {"model_index.json": None}}, "has no sha256"),
    ({"revision": "main", "files": {"model_index.json": "0" * 64}}, "pinned 40-hex commit"),
    ({"repo": None}, "`repo` is required"),
])
def test_bad_manifests_are_refused_before_anything_is_written(tmp_path: Path, fake_hub: Path, capsys, bad, message) -> None:
    path = manifest(tmp_path, **{"files": {"model_index.json": "0" * 64}, **bad})
    assert cli.main(["fetch", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").rglob("*.json"))


def test_the_shipped_manifest_loads_and_fetches_only_safe_patterns() -> None:
    entries = fetch.load_manifest(REPO / "models.yaml")
    assert {entry.repo for entry in entries} == {"Qwen/Qwen-Image-Edit-2511", "Qwen/Qwen-Image-Layered"}
    for entry in entries:
        assert not any(pattern.endswith(fetch.PICKLE_SUFFIXES) for pattern in entry.include)
