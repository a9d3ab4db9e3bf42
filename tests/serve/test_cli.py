"""The `imgserve` command against real Ray Serve (the demo graph, tiny models): the task commands
generated from the registry (`anime`, `layers`, `real --lora ... --job`) write decodable results,
and `imgserve jobs list|show|wait|cancel` follow real jobs; exit statuses say what happened."""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from PIL import Image

from serve_app import cli
from serve_app.client import Client, embedded_metadata
from tests.conftest import Service, wait_until
from tests.serve.conftest import small_png, wait_state
from tests.serve.gate import GatedRealModel

VERSION = "v2511-0801"


@pytest.fixture(scope="module")
def service(demo_service, gate) -> Iterator[Service]:
    gate.open.remote()
    # one job at a time: a second job stays queued while the first waits at the gate
    yield from demo_service({"jobs": {"concurrency": 1}}, models={"real": GatedRealModel})


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    path.write_bytes(small_png())
    return path


def imgserve(service: Service, *argv: str) -> int:
    return cli.main(["--url", service.url, *argv])


def decoded(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image


def test_anime_and_layers_commands_write_their_results(service: Service, source: Path, tmp_path: Path,
                                                      capsys) -> None:
    anime = tmp_path / "anime.png"
    assert imgserve(service, "anime", str(source), "-o", str(anime), "--style", "paprika") == 0
    assert decoded(anime).size == (96, 64) and embedded_metadata(anime.read_bytes())["style"] == "paprika"
    assert "style=paprika" in capsys.readouterr().out

    layers = tmp_path / "layers.zip"
    assert imgserve(service, "layers", str(source), "-o", str(layers), "--layers", "2", "--steps", "2",
                    "--seed", "1", "--prompt", "a poster", "--resolution", "640", "--no-cfg-normalize") == 0
    archive = zipfile.ZipFile(layers)
    names = sorted(n for n in archive.namelist() if n.startswith("layer_"))
    assert names == ["layer_00.png", "layer_01.png"]
    assert all(Image.open(io.BytesIO(archive.read(n))).mode == "RGBA" for n in names)
    assert json.loads(archive.read("manifest.json"))["cfg_normalize"] is False

    assert imgserve(service, "anime", str(source), "-o", str(tmp_path / "x.png"), "--style", "no-such-style") == 1
    assert "style" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_real_as_a_job_with_a_version_and_the_jobs_commands(service: Service, source: Path, tmp_path: Path,
                                                           capsys) -> None:
    job_out, sync_out, waited = tmp_path / "job.png", tmp_path / "sync.png", tmp_path / "waited.png"
    fields = ["--lora", VERSION, "--lora-scale", "0.5", "--steps", "2", "--seed", "4"]
    assert imgserve(service, "real", str(source), "-o", str(job_out), *fields, "--job", "--priority", "high") == 0
    err = capsys.readouterr().err
    job_id = re.search(r"job ([0-9a-f]{32})", err).group(1)
    assert "succeeded" in err  # the progress bar's last line
    assert embedded_metadata(job_out.read_bytes())["lora"] == VERSION and decoded(job_out).size == (96, 64)
    assert imgserve(service, "real", str(source), "-o", str(sync_out), *fields) == 0
    assert sync_out.read_bytes() == job_out.read_bytes()  # the same request, as a job or not

    capsys.readouterr()
    assert imgserve(service, "jobs", "show", job_id) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["id"], shown["task"], shown["state"], shown["priority"]) == (job_id, "real", "succeeded", "high")
    assert imgserve(service, "jobs", "list", "--task", "real", "--state", "succeeded") == 0
    assert job_id in capsys.readouterr().out
    assert imgserve(service, "jobs", "list", "--task", "anime") == 0
    assert job_id not in capsys.readouterr().out
    assert imgserve(service, "jobs", "wait", job_id, "-o", str(waited)) == 0  # already done: saved at once
    assert waited.read_bytes() == job_out.read_bytes()
    assert imgserve(service, "jobs", "show", "0123456789abcdef0123456789abcdef") == 1
    assert "404" in capsys.readouterr().err


def test_jobs_cancel_then_wait(service: Service, gate, tmp_path: Path, capsys) -> None:
    ray.get(gate.close.remote())
    try:
        with Client(service.url) as client:
            held = client.submit("real", small_png(), steps=2, seed=1)
            wait_until(lambda: ray.get(gate.count.remote()) >= 1, "the first job to reach the model")
            queued = client.submit("real", small_png(), steps=2, seed=2)
        wait_state(service, queued.id, "queued")
        capsys.readouterr()
        assert imgserve(service, "jobs", "cancel", queued.id) == 0
        assert f"job {queued.id}: cancelled" in capsys.readouterr().out
        never = tmp_path / "never.png"
        assert imgserve(service, "jobs", "wait", queued.id, "-o", str(never)) == 1
        assert f"job {queued.id} cancelled" in capsys.readouterr().err and not never.exists()
        assert imgserve(service, "jobs", "list", "--state", "cancelled") == 0
        assert queued.id in capsys.readouterr().out
    finally:
        gate.open.remote()
    done = tmp_path / "done.png"
    assert imgserve(service, "jobs", "wait", held.id, "-o", str(done)) == 0
    assert decoded(done).format == "PNG"


def test_a_job_submitted_twice_with_one_idempotency_key_is_one_job(service: Service, source: Path,
                                                                    tmp_path: Path, capsys) -> None:
    argv = ["anime", str(source), "--style", "celeba_distill", "--job", "--idempotency-key", "cli-test-1"]
    assert imgserve(service, *argv, "-o", str(tmp_path / "first.png")) == 0
    first = capsys.readouterr().err
    assert imgserve(service, *argv, "-o", str(tmp_path / "again.png")) == 0
    again = capsys.readouterr().err
    job_id = re.search(r"job ([0-9a-f]{32})", first).group(1)
    assert f"job {job_id} (replayed" in again and "replayed" not in first
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "first.png").read_bytes()
