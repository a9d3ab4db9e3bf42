"""`imgserve fetch`: every file's sha256 is checked, mismatches are deleted, pickles and paths that
leave the model directory are refused; pickled styles are converted in quarantine, never landing in
a model directory.

The hub and GitHub cannot be reached from this machine, so the download and the two hub queries are
replaced by a local "hub" directory (the one mock here, named as such: `fake_hub`); hashing,
checking, deleting, converting (real child processes, real torch pickles of the real generator) and
the manifest round trip are the real code.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from collections import OrderedDict
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
import yaml

from deployments.animegan import load_generator, random_generator
from serve_app import cli, fetch
from tests.conftest import REPO

COMMIT = "a" * 40
STYLES_URL = "https://raw.githubusercontent.com/bryandlee/animegan2-pytorch/{revision}/weights/"


@pytest.fixture
def downloads() -> list[tuple[str, Path]]:
    """(name, directory) of every download `fake_hub` serves."""
    return []


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, downloads: list[tuple[str, Path]]) -> Path:
    """MOCK of the Hugging Face hub and of GitHub (no network here): files served from a local
    directory, each download recorded in `downloads`."""
    hub = tmp_path / "hub"
    (hub / "transformer").mkdir(parents=True)
    (hub / "model_index.json").write_text('{"_class_name": "QwenImageEditPlusPipeline"}')
    (hub / "transformer" / "config.json").write_text('{"num_layers": 60}')
    (hub / "transformer" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (hub / "transformer" / "model.bin").write_bytes(b"pickle")

    def download(entry: fetch.ModelEntry, name: str, directory: Path) -> Path:
        target = Path(directory) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(hub / name, target)
        downloads.append((name, Path(directory)))
        return target

    monkeypatch.setattr(fetch, "_download", download)
    monkeypatch.setattr(fetch, "_listed", lambda entry: sorted(
        str(p.relative_to(hub)) for p in hub.rglob("*") if p.is_file()
        and any(fnmatch(str(p.relative_to(hub)), pat) for pat in entry.include)))
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


def styles_manifest(tmp_path: Path, **model) -> Path:
    return manifest(tmp_path, **{"name": "styles", "repo": None, "url": STYLES_URL, "dest": str(tmp_path / "models" / "styles"),
                                 "convert": "animegan", **model})


def publish_style(hub: Path, name: str, seed: int) -> OrderedDict[str, torch.Tensor]:
    """A style pickled the way the published port's `weights/*.pt` are: an OrderedDict of tensors."""
    state = OrderedDict((k, v.clone()) for k, v in random_generator(seed).state_dict().items())
    torch.save(state, hub / name)
    return state


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


def test_lock_checks_a_hash_the_manifest_already_records(tmp_path: Path, fake_hub: Path, capsys) -> None:
    """A hash the publisher shows (e.g. the hub's LFS sha256) is checked on --lock, not trusted anew."""
    good = digest(fake_hub / "transformer" / "model.safetensors")
    path = manifest(tmp_path, revision="main", files={"transformer/model.safetensors": good})
    assert cli.main(["fetch", str(path), "--lock"]) == 0
    assert yaml.safe_load(path.read_text())["models"][0]["files"] == {"transformer/model.safetensors": good}
    path = manifest(tmp_path, revision="main", files={"transformer/model.safetensors": "f" * 64})
    assert cli.main(["fetch", str(path), "--lock"]) == 2
    assert f"has sha256 {good}, the manifest says {'f' * 64} (deleted)" in capsys.readouterr().err
    assert not (tmp_path / "models" / "edit" / "transformer" / "model.safetensors").exists()
    assert yaml.safe_load(path.read_text())["models"][0]["revision"] == "main"  # nothing written back


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
    ({"files": None, "include": ["*.json"]}, "no files listed yet, only `include` patterns (run with --lock once)"),
    ({"revision": "main", "files": {"model_index.json": "0" * 64}}, "pinned 40-hex commit"),
    ({"repo": None}, "give exactly one source"),
    ({"url": STYLES_URL}, "give exactly one source"),
    ({"repo": None, "url": "http://example.com/{revision}/"}, "must be an https URL containing {revision}"),
    ({"repo": None, "url": "https://example.com/weights/"}, "must be an https URL containing {revision}"),
    ({"repo": None, "url": STYLES_URL, "include": ["*.pt"]}, "cannot be listed"),
    ({"convert": "onnx"}, "unknown converter 'onnx'"),
    ({"convert": "animegan"}, "model_index.json is not .pt/.pth"),
    ({"convert": "animegan", "files": {"paprika.ckpt": "0" * 64}}, "the converter reads .pt, .pth"),
    ({"convert": "animegan", "files": {"a/paprika.pt": "0" * 64, "b/paprika.pt": "0" * 64}},
     "two files convert to the same output name"),
    ({"convert": "animegan", "files": {"paprika.pt": "0" * 64}}, "paprika.safetensors has no sha256"),
    ({"convert": "animegan", "files": {"paprika.pt": "0" * 64}, "outputs": {"hayao.safetensors": "0" * 64}},
     "outputs hayao.safetensors come from no listed file"),
    ({"outputs": {"model_index.safetensors": "0" * 64}}, "`outputs` belong to an entry with `convert`"),
])
def test_bad_manifests_are_refused_before_anything_is_written(tmp_path: Path, fake_hub: Path, downloads, capsys,
                                                              bad, message) -> None:
    path = manifest(tmp_path, **{"files": {"model_index.json": "0" * 64}, **bad})
    assert cli.main(["fetch", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").rglob("*.json"))
    assert downloads == []


def test_pickled_styles_are_converted_in_quarantine_recorded_on_lock_and_verified(
        tmp_path: Path, fake_hub: Path, downloads, capsys) -> None:
    published = publish_style(fake_hub, "paprika.pt", seed=5)
    path = styles_manifest(tmp_path, files={"paprika.pt": None})
    models, styles = tmp_path / "models", tmp_path / "models" / "styles"
    stale = models / ".styles.quarantine-old"  # left by an interrupted run
    stale.mkdir(parents=True)
    (stale / "paprika.pt").write_bytes(b"half a download")

    assert cli.main(["fetch", str(path), "--lock"]) == 0
    locked = yaml.safe_load(path.read_text())["models"][0]
    assert locked["revision"] == COMMIT and locked["url"] == STYLES_URL
    assert locked["files"] == {"paprika.pt": digest(fake_hub / "paprika.pt")}  # the published pickle
    out_sha = digest(styles / "paprika.safetensors")
    assert locked["outputs"] == {"paprika.safetensors": out_sha}
    assert f"paprika.pt → {styles / 'paprika.safetensors'} sha256 {out_sha}" in capsys.readouterr().out
    # The pickle was downloaded beside the styles directory, never into it, and is gone.
    [(name, quarantine)] = downloads
    assert name == "paprika.pt" and quarantine.parent == models and quarantine.name.startswith(".styles.quarantine-")
    assert [p.name for p in models.rglob("*") if p.is_file()] == ["paprika.safetensors"]
    net = load_generator(styles / "paprika.safetensors").state_dict()
    assert all(torch.equal(net[k], v) for k, v in published.items())

    shutil.rmtree(styles)
    assert cli.main(["fetch", str(path)]) == 0  # converts again: the same bytes as recorded
    assert digest(styles / "paprika.safetensors") == out_sha
    assert cli.main(["fetch", str(path)]) == 0  # already there and verified: nothing downloaded
    assert len(downloads) == 2
    assert cli.main(["fetch", str(path), "--verify"]) == 0
    (styles / "paprika.safetensors").write_bytes(b"not weights")
    assert cli.main(["fetch", str(path), "--verify"]) == 2
    assert "paprika.safetensors has sha256" in capsys.readouterr().err


def test_a_style_pickle_that_is_not_the_generator_never_reaches_the_styles_directory(
        tmp_path: Path, fake_hub: Path, capsys) -> None:
    state = publish_style(fake_hub, "celeba_distill.pt", seed=1)
    state["block_a.0.1.weights"] = state.pop("block_a.0.1.weight")
    torch.save(state, fake_hub / "celeba_distill.pt")  # what the lock run will download: wrong keys
    path = styles_manifest(tmp_path, files={"celeba_distill.pt": None})
    assert cli.main(["fetch", str(path), "--lock"]) == 2
    err = capsys.readouterr().err
    assert "celeba_distill.pt not converted" in err and "missing keys ['block_a.0.1.weight']" in err
    assert not any(p.is_file() for p in (tmp_path / "models").rglob("*"))  # no pickle, no output, no quarantine
    assert not list((tmp_path / "models").iterdir())

    # A pickle whose sha256 differs from the manifest's is deleted before anything reads it.
    path = styles_manifest(tmp_path, files={"celeba_distill.pt": "0" * 64}, outputs={"celeba_distill.safetensors": "1" * 64})
    assert cli.main(["fetch", str(path)]) == 2
    assert "celeba_distill.pt has sha256" in capsys.readouterr().err
    assert not list((tmp_path / "models").iterdir())


def test_a_url_source_names_the_commit_and_downloads_through_a_partial_file(tmp_path: Path, monkeypatch) -> None:
    entry = fetch.load_manifest(styles_manifest(tmp_path, files={"face paint.pt": None}))[0]
    assert fetch._source_url(entry, "face paint.pt") == \
        f"https://raw.githubusercontent.com/bryandlee/animegan2-pytorch/{COMMIT}/weights/face%20paint.pt"
    seen = []

    def urlopen(url: str, timeout: float) -> io.BytesIO:  # MOCK of the network: bytes for any URL
        seen.append(url)
        return io.BytesIO(b"weights")

    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    target = fetch._download(entry, "face paint.pt", tmp_path / "quarantine")
    assert target.read_bytes() == b"weights" and seen == [fetch._source_url(entry, "face paint.pt")]
    assert sorted(p.name for p in target.parent.iterdir()) == ["face paint.pt"]
    entry.revision = "main"
    with pytest.raises(fetch.FetchError, match="pinned 40-hex commit \\(the commit its URL names\\)"):
        fetch._lock(entry)


def test_the_shipped_manifest_names_every_file_the_gpu_configs_use() -> None:
    entries = {entry.dest: entry for entry in fetch.load_manifest(REPO / "models.yaml")}
    assert set(entries) == {Path("/models/Qwen-Image-Edit-2511"), Path("/models/Qwen-Image-Layered"),
                            Path("/models/loras/real"), Path("/models/loras/speed"), Path("/models/anime-styles")}
    assert entries[Path("/models/Qwen-Image-Edit-2511")].repo == "Qwen/Qwen-Image-Edit-2511"
    assert entries[Path("/models/Qwen-Image-Layered")].repo == "Qwen/Qwen-Image-Layered"
    real = entries[Path("/models/loras/real")]
    assert real.repo == "WarmBloodAban/Anything_to_Real_Characters_2511"
    assert all(pattern.endswith(".safetensors") and "/" not in pattern for pattern in real.include)
    speed = entries[Path("/models/loras/speed")]
    assert speed.repo == "lightx2v/Qwen-Image-Edit-2511-Lightning"
    assert sorted(speed.files) == ["Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors",
                                   "Qwen-Image-Edit-2511-Lightning-8steps-V1.0-bf16.safetensors"]
    assert all(len(value or "") == 64 for value in speed.files.values())  # the hub's published hashes
    styles = entries[Path("/models/anime-styles")]
    assert styles.convert == "animegan" and fetch.COMMIT.fullmatch(styles.revision)
    assert sorted(styles.files) == [f"{name}.pt" for name in
                                    ("celeba_distill", "face_paint_512_v1", "face_paint_512_v2", "paprika")]
    assert sorted(styles.outputs) == [name.replace(".pt", ".safetensors") for name in sorted(styles.files)]
    for entry in entries.values():  # pickles only where they are converted
        assert entry.convert or not any(p.endswith(fetch.PICKLE_SUFFIXES) for p in [*entry.include, *entry.files])
