"""The hostile-input corpus (tests/hostile.py) against the demo service on real Ray Serve.

Every broken request gets its documented 4xx in the one JSON error shape, every odd-but-valid one
is served, and afterwards every replica of every deployment is still the same process and a normal
request succeeds: nothing in the corpus may kill, restart or wedge a replica.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import pytest
import ray
from PIL import Image

from tests.conftest import Service, demo_args
from tests.hostile import FAST, FAST_LAYERS, Case, build_corpus, encode, picture
from tests.serve.conftest import assert_error

ARGS = demo_args()
CORPUS = build_corpus(max_bytes=ARGS["preprocess"].get("max_bytes", 20 * 1024 * 1024))


@pytest.fixture(scope="module")
def service(demo_service) -> Iterator[Service]:
    yield from demo_service()


def replica_pids() -> dict[str, list[int]]:
    """Every live actor of the imgserve app (its replicas) and Serve's own, by class → sorted pids."""
    pids: dict[str, list[int]] = {}
    for actor in ray._private.state.actors().values():  # the GCS's view: no dashboard needed
        name = actor.get("ActorClassName", "")
        if actor.get("State") == "ALIVE" and ("imgserve" in name or name.startswith("ServeController")
                                                or "Proxy" in name):
            pids.setdefault(name, []).append(actor["Pid"])
    return {name: sorted(values) for name, values in pids.items()}


@pytest.fixture(scope="module")
def pids_before(service: Service) -> dict[str, list[int]]:
    # one normal request per task first, so every replica has loaded its model
    for task, fields, media_type in (("real", FAST, "image/png"), ("anime", {}, "image/png"),
                                     ("layers", FAST_LAYERS, "application/zip")):
        response = service.post_image(encode(picture(48, 32), "PNG"), fields, task=task, content_type="image/png")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == media_type
    pids = replica_pids()
    deployments = {name.rsplit(":", 1)[-1] for name in pids}
    assert {"Ingress", "Preprocess", "RealModel", "AnimeModel", "LayersModel", "Postprocess", "JobRunner"} <= deployments, pids
    return pids


def check(case: Case, response: httpx.Response) -> None:
    if case.ok:
        assert response.status_code == case.status, f"{case.name}: {response.status_code} {response.text[:300]}"
        if case.media_type:
            assert response.headers["content-type"] == case.media_type
        for name, value in case.headers.items():
            assert response.headers.get(name) == value, (name, dict(response.headers))
        if case.media_type and case.media_type.startswith("image/"):
            Image.open(io.BytesIO(response.content)).load()  # a whole, decodable image
    else:
        error = assert_error(response, case.status, case.code, case.field)
        assert response.headers["content-type"] == "application/json"
        assert set(error) <= {"code", "message", "field", "type", "param"} and isinstance(error["message"], str), error
        # OpenAI's names for the same facts: an OpenAI client reads this body as its own error
        assert error["param"] == error.get("field") and error["type"] == (
            "server_error" if case.status >= 500 else "invalid_request_error"), error
    for name in case.absent_headers:
        assert name not in response.headers


def test_corpus_is_large_and_mixed() -> None:
    assert len(CORPUS) >= 40
    categories = {case.category for case in CORPUS}
    assert {"broken-image", "unsupported-format", "too-large", "animation", "exif", "mode", "numbers", "names",
            "multipart", "text"} <= categories
    assert sum(case.ok for case in CORPUS) >= 20 and sum(not case.ok for case in CORPUS) >= 40


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_hostile_request(service: Service, pids_before, case: Case) -> None:
    check(case, service.http.request(**case.request))


def test_every_replica_is_the_same_process_and_normal_requests_succeed(service: Service, pids_before) -> None:
    for task, fields, media_type in (("real", {**FAST, "format": "webp"}, "image/webp"), ("anime", {}, "image/png"),
                                     ("layers", {**FAST_LAYERS, "format": "psd"}, "image/vnd.adobe.photoshop")):
        response = service.post_image(encode(picture(64, 48), "JPEG"), fields, task=task, content_type="image/jpeg")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == media_type
    assert service.http.get("/healthz").json()["status"] == "ok"
    assert replica_pids() == pids_before
    stats = service.model_stats()
    assert stats["loads"] == 1 and stats["pid"] in pids_before["ServeReplica:imgserve:RealModel"]
