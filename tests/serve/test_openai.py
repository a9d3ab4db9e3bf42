"""The OpenAI-compatible route through real Ray Serve, driven by the official `openai` client:
`client.models.list()`, `client.images.edit(...)` for each task with b64_json and url, n results
with consecutive seeds, extra task fields, errors as the client's own exception classes, API keys,
and jobs that outlive a timeout with an Idempotency-Key (a gate, not sleeps, holds the model)."""

from __future__ import annotations

import base64
import io
import secrets
import socket
from collections.abc import Iterator

import httpx
import openai
import pytest
import ray
from PIL import Image

from serve_app.client import embedded_metadata
from serve_app.keys import hash_key
from tests.conftest import Service, wait_until
from tests.serve.conftest import small_png
from tests.serve.gate import GatedRealModel

KEY = f"isk_openai_{secrets.token_urlsafe(24)}"
OTHER_KEY = f"isk_other_{secrets.token_urlsafe(24)}"
VERSIONS = ["v2511-0715", "v2511-0801", "v2511-0823"]
STYLES = ["celeba_distill", "face_paint_512_v1", "face_paint_512_v2", "paprika"]
TIMEOUT_S = 15
STEPS = {"steps": 2}


@pytest.fixture(scope="module")
def service(demo_service, gate) -> Iterator[Service]:
    gate.open.remote()
    overrides = {"ingress": {"api_keys_sha256": [hash_key(KEY), hash_key(OTHER_KEY)], "request_timeout_s": TIMEOUT_S},
                 "preprocess": {"max_long_edge": 256}, "jobs": {"concurrency": 1}}
    for running in demo_service(overrides, models={"real": GatedRealModel}):
        yield running
        ray.get(gate.open.remote())  # a held request would hold the app's deletion


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[openai.OpenAI]:
    # no retries: each test sees the first answer (the client retries 408, 409, 429 and 5xx by default)
    with openai.OpenAI(base_url=f"{service.url}/v1", api_key=KEY, max_retries=0, timeout=300) as made:
        yield made


def image() -> tuple[str, bytes, str]:
    return ("a.png", small_png(), "image/png")


def decoded(item) -> bytes:
    return base64.b64decode(item.b64_json)


def download(url: str, key: str = KEY) -> httpx.Response:
    return httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


# -- the model list --------------------------------------------------------------------------------------
def test_models_list_names_each_task_and_each_choice(service: Service, client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert ids == ["real", *(f"real:{v}" for v in VERSIONS), "anime", *(f"anime:{s}" for s in STYLES), "layers"]
    document = httpx.get(f"{service.url}/v1/models", headers={"X-API-Key": KEY}).json()
    assert document["object"] == "list" and set(document["tasks"]) == {"real", "anime", "layers"}  # both kinds


# -- b64_json --------------------------------------------------------------------------------------------
def test_real_b64_json_is_the_same_image_as_the_tasks_own_route(service: Service, client: openai.OpenAI) -> None:
    fields = {**STEPS, "seed": 7}
    result = client.images.edit(image=image(), prompt="a portrait", model="real", extra_body=fields)
    assert isinstance(result.created, int) and len(result.data) == 1
    png = decoded(result.data[0])
    assert embedded_metadata(png)["seed"] == 7 and embedded_metadata(png)["prompt"] == "a portrait"
    assert result.data[0].revised_prompt is None  # made with the prompt sent
    own = service.http.post("/v1/real", files={"image": image()}, data={"prompt": "a portrait", "steps": "2", "seed": "7"},
                            headers={"Authorization": f"Bearer {KEY}"})
    assert own.status_code == 200 and own.content == png  # one code path: the same bytes


def test_a_version_of_real_and_a_size(client: openai.OpenAI) -> None:
    result = client.images.edit(image=image(), prompt="p", model=f"real:{VERSIONS[0]}", size="48x48",
                                extra_body=STEPS)
    png = decoded(result.data[0])
    assert embedded_metadata(png)["lora"] == VERSIONS[0]
    assert Image.open(io.BytesIO(png)).size == (48, 32)  # 96x64 fitted inside 48x48, aspect kept
    assert result.output_format == "png"


def test_n_results_have_consecutive_seeds(client: openai.OpenAI) -> None:
    result = client.images.edit(image=image(), prompt="p", model="real", n=2, extra_body=STEPS)
    pngs = [decoded(item) for item in result.data]
    seeds = [embedded_metadata(png)["seed"] for png in pngs]
    assert len(pngs) == 2 and seeds[1] == seeds[0] + 1 and pngs[0] != pngs[1]


def test_anime_takes_its_style_from_the_model_and_ignores_the_prompt(client: openai.OpenAI) -> None:
    result = client.images.edit(image=image(), prompt="ignored", model="anime:paprika")
    assert embedded_metadata(decoded(result.data[0]))["style"] == "paprika"
    assert result.data[0].revised_prompt is None
    webp = client.images.edit(image=image(), prompt="ignored", model="anime", output_format="webp")
    assert Image.open(io.BytesIO(decoded(webp.data[0]))).format == "WEBP" and webp.output_format == "webp"


def test_layers_answer_one_png_per_layer_with_the_caption_as_revised_prompt(client: openai.OpenAI) -> None:
    result = client.images.edit(image=image(), prompt="", model="layers", extra_body={**STEPS, "layers": 2})
    layers = [Image.open(io.BytesIO(decoded(item))) for item in result.data]
    assert len(layers) == 2 and all(layer.format == "PNG" and layer.mode == "RGBA" for layer in layers)
    assert layers[0].size == layers[1].size
    assert result.data[0].revised_prompt  # the model captioned the image itself


# -- url -------------------------------------------------------------------------------------------------
def test_real_urls_are_job_results_the_same_key_can_read(service: Service, client: openai.OpenAI) -> None:
    result = client.images.edit(image=image(), prompt="p", model="real", n=2, response_format="url",
                                extra_body={**STEPS, "seed": 40})
    urls = [item.url for item in result.data]
    assert all(url.startswith(f"{service.url}/v1/jobs/") and url.endswith("/result") for url in urls)
    answers = [download(url) for url in urls]
    assert [answer.headers["x-imgserve-seed"] for answer in answers] == ["40", "41"]
    assert all(answer.headers["content-type"] == "image/png" for answer in answers)
    assert download(urls[0], OTHER_KEY).status_code == 404  # another key's job does not exist for it
    assert download(urls[0], "isk_wrong").status_code == 401


def test_layers_urls_point_at_each_layer(client: openai.OpenAI) -> None:
    result = client.images.edit(image=image(), prompt="a poster", model="layers", response_format="url",
                                extra_body={**STEPS, "layers": 3})
    urls = [item.url for item in result.data]
    assert [url.rsplit("?", 1)[1] for url in urls] == ["layer=0", "layer=1", "layer=2"]
    layers = [download(url) for url in urls]
    assert all(answer.status_code == 200 and answer.headers["content-type"] == "image/png" for answer in layers)
    assert Image.open(io.BytesIO(layers[2].content)).mode == "RGBA"
    beyond = download(urls[0].replace("layer=0", "layer=3"))
    assert beyond.status_code == 422 and beyond.json()["error"]["field"] == "layer"


def test_anime_by_url(client: openai.OpenAI) -> None:
    result = client.images.edit(image=image(), prompt="p", model="anime:celeba_distill", response_format="url")
    answer = download(result.data[0].url)
    assert answer.status_code == 200 and answer.headers["x-imgserve-style"] == "celeba_distill"


# -- errors ----------------------------------------------------------------------------------------------
def test_errors_are_the_clients_own_exceptions_with_code_type_and_param(service: Service, client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        client.images.edit(image=image(), prompt="p", model="real", extra_body={"steps": 1})
    assert bad.value.status_code == 422
    assert bad.value.body["code"] == "invalid_parameter" and bad.value.body["param"] == "steps"
    assert bad.value.body["type"] == "invalid_request_error" and bad.value.param == "steps"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.images.edit(image=image(), prompt="p", model="dall-e-2")
    assert unknown.value.body["param"] == "model" and unknown.value.body["code"] == "not_found"
    with pytest.raises(openai.BadRequestError) as two:
        client.images.edit(image=[image(), image()], prompt="p", model="real")
    assert two.value.status_code == 400 and two.value.body["param"] == "image[]"
    with pytest.raises(openai.UnprocessableEntityError) as layered:
        client.images.edit(image=image(), prompt="p", model="layers", output_format="webp")
    assert layered.value.body["param"] == "output_format"
    with pytest.raises(openai.UnprocessableEntityError) as key_without_url:
        client.images.edit(image=image(), prompt="p", extra_headers={"Idempotency-Key": "k-b64"})
    assert key_without_url.value.body["param"] == "Idempotency-Key"
    wrong = openai.OpenAI(base_url=f"{service.url}/v1", api_key="isk_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.images.edit(image=image(), prompt="p")
    assert refused.value.status_code == 401 and refused.value.body["type"] == "authentication_error"


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
def test_an_image_that_cannot_be_read_is_a_bad_request_either_way(client: openai.OpenAI, response_format: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:  # url: the job ran and failed; its error is the answer
        client.images.edit(image=("a.png", b"not an image", "image/png"), prompt="p", response_format=response_format)
    assert bad.value.body["code"] == "bad_image" and bad.value.body["param"] == "image"


# -- jobs that outlive the request -----------------------------------------------------------------------
def jobs_of(service: Service, state: str) -> list[dict]:
    answer = service.http.get("/v1/jobs", params={"state": state, "limit": 100}, headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def test_with_an_idempotency_key_jobs_outlive_a_timeout_and_a_retry_gets_them(service: Service, client: openai.OpenAI,
                                                                              gate) -> None:
    ray.get(gate.close.remote())
    request = {"image": image(), "prompt": "kept", "model": "real", "response_format": "url", "n": 2,
               "extra_body": {**STEPS, "seed": 900}, "extra_headers": {"Idempotency-Key": "edit-kept-1"}}
    with pytest.raises(openai.InternalServerError) as late:
        client.images.edit(**request)
    assert late.value.status_code == 504 and late.value.body["code"] == "timeout"
    ray.get(gate.open.remote())
    again = client.images.with_raw_response.edit(**request)
    assert again.headers["idempotent-replayed"] == "true"
    urls = [item.url for item in again.parse().data]
    assert [download(url).headers["x-imgserve-seed"] for url in urls] == ["900", "901"]  # the jobs of the first try
    assert client.images.with_raw_response.edit(**request).parse().data == again.parse().data  # same answer again
    with pytest.raises(openai.UnprocessableEntityError) as conflict:
        client.images.edit(**{**request, "prompt": "another request"})
    assert conflict.value.body["code"] == "idempotency_conflict"


def test_without_a_key_a_caller_that_hangs_up_cancels_its_jobs(service: Service, gate) -> None:
    ray.get(gate.close.remote())
    held = service.post_image(small_png(), {"task": "real", **STEPS}, task="jobs", filename="a.png",
                              content_type="image/png", headers={"Authorization": f"Bearer {KEY}"})
    assert held.status_code == 202, held.text
    wait_until(lambda: ray.get(gate.count.remote()) >= 1, "a job to hold the runner's one slot in the model")
    queued_before = {job["id"] for job in jobs_of(service, "queued")}
    request = httpx.Request("POST", f"{service.url}/v1/images/edits", files={"image": image()},
                            data={"prompt": "left", "response_format": "url", "steps": "2"})
    body = request.read()
    host, port = service.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (f"POST /v1/images/edits HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: {request.headers['content-type']}\r\nContent-Length: {len(body)}\r\n\r\n")
    sock.sendall(head.encode() + body)
    try:
        waiting = wait_until(lambda: {job["id"] for job in jobs_of(service, "queued")} - queued_before,
                             "the edit's job to be queued")
    finally:
        sock.close()  # the caller hangs up while its job waits
    (job_id,) = waiting
    wait_until(lambda: job_id in {job["id"] for job in jobs_of(service, "cancelled")}, "the edit's job to be cancelled")
    ray.get(gate.open.remote())
