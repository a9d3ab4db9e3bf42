"""The OpenAI-compatible edit route without Ray: the form (`image` or `image[]`, one file), what the
OpenAI fields become in the service's terms (model ids, n, output formats, the prompt), the seeds of
n results, the model list, and reading layer PNGs back from a layers ZIP."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from starlette.requests import Request

from deployments import packaging
from deployments.diffusion_config import MAX_SEED
from deployments.errors import BadImage, ImgserveError, InvalidParameter, UnsupportedFormat
from serve_app.uploads import read_upload
from serve_app.openai_api import IMAGE_FIELDS, OpenAIRoutes, parse_edit
from serve_app.orchestrator import Orchestrator
from tests.conftest import LORA_VERSIONS, resolving_orchestrator
from tests.hostile import encode

VERSIONS = LORA_VERSIONS
MAX_IMAGES = 4


@pytest.fixture(scope="module")
def orchestrator(tmp_path_factory: pytest.TempPathFactory) -> Orchestrator:
    return resolving_orchestrator(tmp_path_factory.mktemp("openai"))


def edit(orchestrator: Orchestrator, **fields: str):
    return parse_edit(fields, orchestrator, MAX_IMAGES)


def refused(orchestrator: Orchestrator, code: str, **fields: str) -> ImgserveError:
    with pytest.raises(ImgserveError) as error:
        edit(orchestrator, **fields)
    assert error.value.code == code and error.value.message
    return error.value


# -- model ids ------------------------------------------------------------------------------------------
def test_models_list_every_task_and_each_choice_next_to_the_task_document(orchestrator: Orchestrator) -> None:
    info = orchestrator.models_info()
    styles = orchestrator.sections["anime"].styles()
    ids = ["real", *(f"real:{v}" for v in VERSIONS), "anime", *(f"anime:{s}" for s in styles), "layers"]
    assert [model["id"] for model in info["data"]] == ids
    assert info["object"] == "list"
    assert all(model["object"] == "model" and model["owned_by"] == "imgserve" and isinstance(model["created"], int)
               for model in info["data"])
    assert set(info["tasks"]) == {"real", "anime", "layers"} and info["max_long_edge"] == 1024  # today's document


def test_model_names_a_task_and_its_choice(orchestrator: Orchestrator) -> None:
    assert edit(orchestrator).task == "real"  # no model: the registry's first task
    assert edit(orchestrator, model="real:v2511-0715").fields["lora"] == "v2511-0715"
    assert edit(orchestrator, model="anime:paprika").fields["style"] == "paprika"
    assert edit(orchestrator, model="real:v2511-0715", lora="v2511-0715").fields["lora"] == "v2511-0715"
    conflict = refused(orchestrator, "invalid_parameter", model="real:v2511-0715", lora="v2511-0801")
    assert conflict.field == "lora"
    for model in ("dall-e-2", "gpt-image-1", "real:v9", "real:", "anime:hayao", "layers:x", "jobs"):
        assert refused(orchestrator, "not_found", model=model).field == "model", model


# -- fields ---------------------------------------------------------------------------------------------
def test_openai_fields_become_the_tasks_fields(orchestrator: Orchestrator) -> None:
    real = edit(orchestrator, model="real", prompt="a portrait", n="3", output_format="webp", steps="2",
                size="256x256", user="u-1", quality="high")
    assert real.fields == {"prompt": "a portrait", "steps": "2", "size": "256x256", "format": "webp"}
    assert (real.n, real.response_format, real.output_format, real.layered) == (3, "b64_json", "webp", False)
    anime = edit(orchestrator, model="anime", prompt="ignored: anime has no prompt", response_format="url")
    assert anime.fields == {"format": "png"} and anime.prompt == "ignored: anime has no prompt"
    assert anime.response_format == "url"
    layers = edit(orchestrator, model="layers", prompt="a poster", layers="3")
    assert layers.layered and layers.fields == {"prompt": "a poster", "layers": "3", "format": "zip"}
    assert layers.output_format == "png"
    assert edit(orchestrator, model="layers", output_format="png").fields["format"] == "zip"


@pytest.mark.parametrize(("fields", "field"), [
    ({"n": "0"}, "n"), ({"n": str(MAX_IMAGES + 1)}, "n"), ({"n": "two"}, "n"), ({"n": "-1"}, "n"),
    ({"response_format": "b64"}, "response_format"),
    ({"output_format": "gif"}, "output_format"), ({"output_format": "zip"}, "output_format"),
    ({"model": "layers", "output_format": "webp"}, "output_format"),
    ({"model": "layers", "output_format": "jpeg"}, "output_format"),
    ({"format": "png"}, "format"), ({"stream": "true"}, "stream"),
])
def test_bad_openai_fields_are_refused_naming_them(orchestrator: Orchestrator, fields: dict[str, str], field: str) -> None:
    assert refused(orchestrator, "invalid_parameter", **fields).field == field


def test_task_fields_are_checked_by_the_same_resolve(orchestrator: Orchestrator) -> None:
    for fields, field in (({"steps": "1"}, "steps"), ({"style": "paprika"}, "style"), ({"size": "8x8"}, "size")):
        with pytest.raises(InvalidParameter) as error:
            orchestrator.resolve("real", edit(orchestrator, **fields).fields)
        assert error.value.field == field


# -- n results --------------------------------------------------------------------------------------------
def runs(orchestrator: Orchestrator, **fields: str) -> list[dict[str, Any]]:
    routes = OpenAIRoutes()
    routes.orchestrator = orchestrator
    return asyncio.run(routes._runs(edit(orchestrator, **fields)))


def test_n_results_have_consecutive_seeds_from_one_resolve(orchestrator: Orchestrator) -> None:
    given = runs(orchestrator, n="3", seed="41", steps="2")
    assert [fields["seed"] for fields in given] == [41, 42, 43]
    assert all(fields["steps"] == 2 and fields["lora"] == VERSIONS[-1] for fields in given)  # resolved once
    drawn = [fields["seed"] for fields in runs(orchestrator, n="4")]
    assert drawn == list(range(drawn[0], drawn[0] + 4)) and 0 <= drawn[0] and drawn[-1] <= MAX_SEED
    assert runs(orchestrator, seed="7") == [{"seed": "7", "format": "png"}]  # n=1: the request as sent
    assert runs(orchestrator, model="anime", n="2") == [{"style": "face_paint_512_v2", "format": "png"}] * 2  # no seed


def test_a_given_seed_whose_last_result_would_leave_the_range_is_refused(orchestrator: Orchestrator) -> None:
    with pytest.raises(InvalidParameter) as error:
        runs(orchestrator, n="2", seed=str(MAX_SEED))
    assert error.value.field == "seed"


# -- the form ---------------------------------------------------------------------------------------------
def request_of(files: list[tuple[str, tuple[str, bytes, str]]] | None, data: dict[str, str] | None = None,
               content: bytes | None = None, content_type: str | None = None) -> Request:
    """A Starlette request carrying the body httpx makes for these parts (what the openai client sends)."""
    built = httpx.Request("POST", "http://test/v1/images/edits", files=files, data=data, content=content,
                          headers={"content-type": content_type} if content_type else None)
    body = built.read()
    chunks = [body[i:i + 1000] for i in range(0, len(body), 1000)] or [b""]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)} if chunks else \
            {"type": "http.disconnect"}

    headers = [(key.lower().encode(), value.encode()) for key, value in built.headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/v1/images/edits", "headers": headers,
                    "query_string": b""}, receive)


def form(request: Request) -> tuple[bytes, dict[str, str]]:
    return asyncio.run(read_upload(request, 1 << 20, 30.0, 0.0, image_fields=IMAGE_FIELDS))


def png() -> bytes:
    return encode(Image.new("RGB", (32, 24), (10, 200, 30)), "PNG")


def test_the_image_comes_as_image_or_image_list_with_the_text_fields() -> None:
    for name in ("image", "image[]"):
        image, fields = form(request_of([(name, ("a.png", png(), "image/png"))], {"prompt": "p", "n": "2"}))
        assert image == png() and fields == {"prompt": "p", "n": "2"}


FILE = ("a.png", b"1", "image/png")


@pytest.mark.parametrize(("files", "field", "error"), [
    ([("image[]", FILE), ("image[]", FILE)], "image[]", BadImage),  # the openai client's list of two: 400
    ([("image", FILE), ("image[]", FILE)], "image[]", BadImage),
    ([("image", FILE), ("image", FILE)], "image", BadImage),
    ([("image", FILE), ("mask", FILE)], "mask", InvalidParameter),  # OpenAI's mask: not supported (422)
    ([("other", FILE)], "other", InvalidParameter),
])
def test_one_image_file_and_no_other_file(files: list, field: str, error: type) -> None:
    with pytest.raises(error) as raised:
        form(request_of(files, {"prompt": "p"}))
    assert type(raised.value) is error and raised.value.field == field


def test_no_image_file_the_image_as_text_or_a_body_that_is_no_form_is_refused() -> None:
    with pytest.raises(BadImage) as raised:
        form(request_of([("image[]", FILE)], {"image": "not a file"}))
    assert raised.value.field == "image"
    with pytest.raises(UnsupportedFormat):
        form(request_of(None, content=b'{"prompt": "p"}', content_type="application/json"))
    with pytest.raises(UnsupportedFormat):
        form(request_of(None, {"prompt": "p"}))  # url-encoded: no file at all
    assert form(request_of(None, content=png(), content_type="image/png")) == (png(), {})  # a raw body, as elsewhere


# -- layers ---------------------------------------------------------------------------------------------
def test_the_layer_pngs_of_a_layers_zip_come_back_bottom_first_as_stored() -> None:
    rng = np.random.default_rng(3)
    layers = rng.integers(0, 255, (3, 8, 12, 4), dtype=np.uint8)
    pngs = packaging.zip_layer_pngs(packaging.zip_layers(layers, {"seed": 1}))
    assert len(pngs) == 3
    for index, data in enumerate(pngs):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), layers[index])
    with pytest.raises(ValueError, match="not a ZIP of layers"):
        packaging.zip_layer_pngs(png())
