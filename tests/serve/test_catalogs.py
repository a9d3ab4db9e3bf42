"""The catalog comes from where the models are: the model replicas report their LoRA versions and
styles, the ingress lists and checks what they report; only complete files are versions; the
default version is fixed when a replica starts and reported, not replaced, when its file goes bad."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from deployments.lora import TINY_VERSIONS, ensure_tiny_loras
from deployments.styles import TINY_STYLES
from tests.conftest import Service, wait_until
from tests.serve.conftest import small_png

OLD, NEW = TINY_VERSIONS[0], TINY_VERSIONS[1]
LATER = "v2511-0900"


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    directory = tmp_path_factory.mktemp("catalog-loras")
    source = ensure_tiny_loras(model_cache)
    for version in (OLD, NEW):
        shutil.copy(source / f"{version}.safetensors", directory)
    return directory


@pytest.fixture(scope="module")
def service(demo_service, loras: Path):
    real = {"lora_dir": str(loras), "lora_rescan_s": 0.3, "lora_settle_s": 0.2}
    yield from demo_service({"real": real, "ingress": {"catalog_ttl_s": 0.3}})


def models(service: Service) -> dict:
    response = service.http.get("/v1/models")
    assert response.status_code == 200, response.text
    return response.json()


def status(service: Service) -> dict:
    response = service.http.get("/v1/status")
    assert response.status_code == 200, response.text
    return response.json()


def run(service: Service, **fields) -> tuple[int, str | None, str]:
    response = service.post_image(small_png(), {"steps": 2, "seed": 1, **fields}, content_type="image/png")
    return response.status_code, response.headers.get("x-imgserve-lora"), response.text


def test_status_reports_each_task_its_replicas_and_what_they_serve(service: Service) -> None:
    view = status(service)
    assert view["ready"] is True
    assert set(view["tasks"]) == {"real", "anime", "layers"}
    real = view["tasks"]["real"]
    assert real["deployment"] == "RealModel" and real["replicas"]["running"] >= 1
    assert real["catalog"]["names"] == [OLD, NEW] and real["catalog"]["default"] == NEW
    assert real["catalog"]["default_problem"] is None
    assert real["reports"] and all(report["age_s"] < 30 for report in real["reports"])
    assert view["tasks"]["anime"]["catalog"]["names"] == sorted(TINY_STYLES)
    assert "catalog" not in view["tasks"]["layers"]  # nothing to choose by name
    assert models(service)["tasks"]["real"]["lora"] == {"versions": ["none", OLD, NEW], "default": NEW, "reported": True}


def test_a_file_being_copied_is_never_a_version_and_is_listed_once_complete(service: Service, loras: Path) -> None:
    complete = (ensure_tiny_loras(loras.parent / "source") / f"{TINY_VERSIONS[2]}.safetensors").read_bytes()
    target = loras / f"{LATER}.safetensors"
    with target.open("wb") as partial:
        partial.write(complete[: len(complete) // 2])
        partial.flush()
        # while it is half written: reported as a problem, never listed, refused naming why
        problems = wait_until(lambda: status(service)["tasks"]["real"]["catalog"]["problems"].get(LATER),
                              "the replica to see the partial file")
        assert LATER not in models(service)["tasks"]["real"]["lora"]["versions"]
        code, _, text = run(service, lora=LATER)
        assert code == 422 and LATER in text, text
        assert problems
        # requests without a version are untouched by it: the default is the one fixed at start
        code, lora, text = run(service)
        assert (code, lora) == (200, NEW), text
        partial.write(complete[len(complete) // 2:])
    wait_until(lambda: LATER in models(service)["tasks"]["real"]["lora"]["versions"], "the complete file to be listed")
    code, lora, text = run(service, lora=LATER)
    assert (code, lora) == (200, LATER), text
    # newer than the default, yet not the default: that was fixed when the replica started
    assert models(service)["tasks"]["real"]["lora"]["default"] == NEW
    code, lora, text = run(service)
    assert (code, lora) == (200, NEW), text


def test_a_default_whose_file_goes_bad_is_reported_and_still_served_from_memory(service: Service, loras: Path) -> None:
    code, lora, text = run(service)  # the default resident on the replica
    assert (code, lora) == (200, NEW), text
    saved = (loras / f"{NEW}.safetensors").read_bytes()
    (loras / f"{NEW}.safetensors").unlink()
    try:
        catalog = wait_until(lambda: (c := status(service)["tasks"]["real"]["catalog"])["default_problem"] and c,
                             "the replica to report its default unusable")
        assert catalog["default"] == NEW and "no such file" in catalog["default_problem"]
        code, lora, text = run(service)
        assert (code, lora) == (200, NEW), text  # served from the resident copy, not failed
    finally:
        (loras / f"{NEW}.safetensors").write_bytes(saved)
    wait_until(lambda: status(service)["tasks"]["real"]["catalog"]["default_problem"] is None,
               "the default to be usable again")
