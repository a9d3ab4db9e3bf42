"""The text encoder stage without Ray: the same bytes as inline, shared only for the same files.

The model classes are constructed directly (tiny random components, CPU): an inline replica, a
stage replica (no text encoder) and the `TextEncoder` that encodes for it must give byte-identical
results for fixed seeds; the encoder loads one text encoder for tasks whose files are the same
bytes, and the builder gives tasks with different files a deployment each.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from deployments import metrics
from deployments.checkpoints import EncoderElsewhere
from deployments.errors import InvalidParameter, ModelFailure
from deployments.identity import text_encoder_identity
from deployments.layers import LayersModel, LayersParams
from deployments.real import RealModel
from deployments.real_config import RealParams
from deployments.records import Prepared, PreparedImage
from deployments.tasks import TASKS
from deployments.text_encoder import TextEncoder
from serve_app.config import load_config
from tests.conftest import demo_args, merged

SIZE = 64


def configs(cache: Path, **text_encoder):
    base = merged(demo_args(), {"cache_dir": str(cache)})
    inline = load_config(merged(base, {"text_encoder": {"mode": "inline"}}))
    staged = load_config(merged(base, {"text_encoder": {"mode": "stage", **text_encoder}}))
    return inline, staged


def prepared(channels: int, seed: int = 0) -> Prepared:
    array = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, channels), dtype=np.uint8)
    info = PreparedImage((SIZE, SIZE), (SIZE, SIZE), (SIZE, SIZE), 1.0, "PNG", "RGBA" if channels == 4 else "RGB")
    return Prepared(array, info)


@pytest.fixture(scope="module")
def models(model_cache):
    inline, staged = configs(model_cache)
    encoder = TextEncoder(staged.text_encoder, {"real": (RealModel, staged.section("real")),
                                                "layers": (LayersModel, staged.section("layers"))}, staged.cache_dir)
    encoder.load()
    loaded = {}
    for name, cls in (("real", RealModel), ("layers", LayersModel)):
        loaded[name] = (cls(inline.section(name), inline.cache_dir), cls(staged.section(name), staged.cache_dir))
        for model in loaded[name]:
            model.load()
    return inline, encoder, loaded


REQUESTS = [
    {"steps": 3, "seed": 5, "prompt": "a cat on a sofa"},  # CFG on: the negative prompt is encoded too
    {"steps": 2, "seed": 7, "cfg": 1.0, "prompt": "a dog"},  # no CFG: no negative embeddings
    {"steps": 2, "seed": 11},  # real: the default prompt; layers: the model captions the image
]


@pytest.mark.parametrize("fields", REQUESTS)
@pytest.mark.parametrize("task", ["real", "layers"])
def test_stage_and_inline_give_the_same_bytes(models, task, fields) -> None:
    inline_config, encoder, loaded = models
    inline, staged = loaded[task]
    catalog = (inline.catalog(),) if task == "real" else ()
    params = inline_config.section(task).resolve((RealParams if task == "real" else LayersParams)(**fields), *catalog)
    image = prepared(3 if task == "real" else 4)
    alone = inline.generate(image, params)
    conditioning = encoder.encode_now(task, image, params)
    together = staged.generate(image, params, None, conditioning)
    assert together.array.tobytes() == alone.array.tobytes()
    assert together.params == alone.params  # the prompt used (a caption included) is the same
    assert (conditioning.negative_embeds is None) == (params.cfg <= 1)
    assert together.served["encoder"] == encoder.replica


def test_stage_replicas_load_no_text_encoder_and_refuse_requests_without_embeddings(models) -> None:
    _, _, loaded = models
    for task, params in (("real", RealParams(steps=2, seed=1)), ("layers", LayersParams(steps=2, seed=1))):
        staged = loaded[task][1]
        assert isinstance(staged.pipe.text_encoder, EncoderElsewhere)  # a dtype, no weights
        with pytest.raises(ModelFailure, match="TextEncoder stage"):
            staged.generate(prepared(3 if task == "real" else 4), params)


def test_one_encoder_serves_both_tasks_whose_files_are_the_same_bytes(models) -> None:
    _, encoder, _ = models
    stats = encoder.stats()
    assert stats["encoders"] == 1
    assert stats["tasks"]["real"] == stats["tasks"]["layers"] is not None
    assert encoder.models["real"].pipe.text_encoder is encoder.models["layers"].pipe.text_encoder


def test_the_encoder_records_its_stages_where_it_works(models) -> None:
    _, encoder, _ = models
    with metrics.capture() as records:
        encoder.encode_now("layers", prepared(4), LayersParams(steps=2, seed=3, prompt="", resolution=640,
                                                                layers=2, cfg=4.0, negative_prompt=" ",
                                                                cfg_normalize=True))
    stages = {tags["stage"] for name, _, tags in records if name == "imgserve_stage_seconds"
              and tags["task"] == "layers"}
    assert stages == {"caption", "encode_prompt"}


def test_the_encoder_refuses_what_the_model_would_refuse(models) -> None:
    _, encoder, _ = models
    narrow = Prepared(np.zeros((16, 4096, 3), np.uint8), PreparedImage((4096, 16), (4096, 16), (4096, 16), 1.0,
                                                                     "PNG", "RGB"))
    with pytest.raises(InvalidParameter, match="too extreme") as caught:
        encoder.encode_now("real", narrow, RealParams(steps=2, seed=1, prompt="x", negative_prompt=" ", cfg=4.0))
    assert caught.value.field == "image"


def copy_with_other_encoder(source: Path, target: Path) -> Path:
    """`source` copied, with one weight of its text encoder changed (same names, same shapes)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = target / "text_encoder" / "model.safetensors"
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1
    save_file(tensors, weights, metadata={"format": "pt"})
    return target


def test_identity_is_the_bytes_not_the_names(model_cache, tmp_path) -> None:
    from deployments.tiny import ensure_tiny

    edit, layered = ensure_tiny("edit", model_cache), ensure_tiny("layered", model_cache)
    same = text_encoder_identity(edit, tmp_path)
    assert same is not None and text_encoder_identity(layered, tmp_path) == same  # built with the same weights
    renamed = tmp_path / "some-other-name"
    shutil.copytree(edit, renamed)
    assert text_encoder_identity(renamed, tmp_path) == same
    other = copy_with_other_encoder(edit, tmp_path / "tiny-qwen-edit-v1")  # the same name, other weights
    assert text_encoder_identity(other, tmp_path) != same
    assert text_encoder_identity(tmp_path / "absent", tmp_path) is None


def test_the_builder_shares_one_deployment_only_for_the_same_bytes(model_cache, tmp_path) -> None:
    from deployments.tiny import ensure_tiny
    from serve_app.app import text_encoders

    _, staged = configs(model_cache)
    shared = text_encoders(staged, TASKS)
    assert set(shared) == {"real", "layers"} and shared["real"] is shared["layers"]
    assert shared["real"]._bound_deployment.name == "TextEncoder"

    other = copy_with_other_encoder(ensure_tiny("layered", model_cache), tmp_path / "layered")
    _, staged = configs(model_cache)
    staged = load_config(merged(staged.model_dump(mode="json"), {"layers": {"source": str(other), "tiny_edge": None}}))
    separate = text_encoders(staged, TASKS)
    names = {task: app._bound_deployment.name for task, app in separate.items()}
    assert names == {"real": "TextEncoder_real", "layers": "TextEncoder_layers"}

    inline, _ = configs(model_cache)
    assert text_encoders(inline, TASKS) == {}


def test_an_encoder_with_different_files_loads_one_per_task(model_cache, tmp_path) -> None:
    from deployments.tiny import ensure_tiny

    other = copy_with_other_encoder(ensure_tiny("layered", model_cache), tmp_path / "layered")
    _, staged = configs(model_cache)
    layers = staged.section("layers").model_copy(update={"source": str(other), "tiny_edge": None})
    encoder = TextEncoder(staged.text_encoder, {"real": (RealModel, staged.section("real")),
                                                "layers": (LayersModel, layers)}, staged.cache_dir)
    encoder.load()
    assert encoder.stats()["encoders"] == 2
    assert encoder.models["real"].pipe.text_encoder is not encoder.models["layers"].pipe.text_encoder


def test_stage_mode_reaches_every_diffusion_section_and_the_placement_is_checked(model_cache) -> None:
    inline, staged = configs(model_cache)
    assert staged.staged() == ("real", "layers") and inline.staged() == ()
    assert staged.section("real").text_encoder == "stage" and inline.section("real").text_encoder == "inline"
    with pytest.raises(ValueError, match="text_encoder.placement.gpus must be 1"):
        configs(model_cache, placement={"gpus": 2})
