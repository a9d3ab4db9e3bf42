"""LayersModel used directly, without Ray, on the tiny layered pipeline: layers, sizes, alpha,
determinism, captioning, parameter validation."""

from __future__ import annotations

import asyncio
import math
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from deployments.errors import Cancelled, InvalidParameter
from deployments.layers import LayersModel, LayersModelConfig, LayersParams
from deployments.preprocess import Preprocess
from deployments.records import Prepared

TINY_EDGE = 64


@pytest.fixture(scope="module")
def model(model_cache) -> LayersModel:
    layers = LayersModel(
        LayersModelConfig(source="tiny", tiny_edge=TINY_EDGE, caption_max_new_tokens=8, num_threads=1), model_cache
    )
    assert layers.pipe is None and layers.loads == 0  # construction only stores config
    layers.load()
    return layers


def upload(size=(96, 64), mode="RGBA", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    array[: size[1] // 2, :, 3] = 0  # a transparent half
    buffer = BytesIO()
    Image.fromarray(array, "RGBA").convert(mode).save(buffer, "PNG")
    return buffer.getvalue()


def prepared(size=(96, 64), mode="RGBA", seed=0) -> Prepared:
    return Preprocess().prepare(upload(size, mode, seed), LayersModel.input_spec)


def fast(**kw) -> LayersParams:
    return LayersParams(**{"steps": 2, "seed": 1, "prompt": "a red ball on a table", **kw})


def test_check_health_fails_before_load(model_cache) -> None:
    with pytest.raises(RuntimeError, match="not loaded"):
        LayersModel(LayersModelConfig(), model_cache).check_health()


@pytest.mark.parametrize("count", [1, 3])
def test_layers_are_n_rgba_uint8_arrays_of_the_bucket_size(model: LayersModel, count: int) -> None:
    image = prepared((96, 64))
    result = model.generate(image, fast(layers=count))
    with model.sizes():
        width, height = model.bucket_size(96, 64, 640)
    assert result.array.shape == (count, height, width, 4) and result.array.dtype == np.uint8
    assert result.params["layer_size"] == f"{width}x{height}"
    assert result.info.size == (96, 64)  # the input's size is kept apart from the layers' size
    assert result.params["layers"] == count and result.params["task"] == "layers"
    assert result.array.std() > 0 and result.array[..., 3].std() > 0  # real pixels, real alpha
    assert model.stats()["loads"] == 1 and model.stats()["device"] == "cpu"


def test_rgb_and_rgba_uploads_both_reach_the_model_as_rgba_and_alpha_matters(model: LayersModel) -> None:
    rgba = prepared(mode="RGBA")
    rgb = prepared(mode="RGB")
    assert rgba.array.shape[2] == 4 and rgb.array.shape[2] == 4
    assert rgba.info.source_mode == "RGBA" and not rgba.array[:32, :, 3].any()  # alpha preserved
    assert (rgb.array[..., 3] == 255).all()  # RGB became opaque RGBA
    assert np.array_equal(rgba.array[32:, :, :3], rgb.array[32:, :, :3])
    from_rgba = model.generate(rgba, fast(layers=2)).array
    from_rgb = model.generate(rgb, fast(layers=2)).array
    assert from_rgba.shape == from_rgb.shape == (2, *from_rgba.shape[1:3], 4)
    assert not np.array_equal(from_rgba, from_rgb)  # the transparent half changed the input


def test_a_handle_callers_rgb_array_is_made_opaque_rgba(model: LayersModel) -> None:
    opaque = prepared(mode="RGB")
    rgb_only = Prepared(array=np.ascontiguousarray(opaque.array[..., :3]), info=opaque.info)
    assert np.array_equal(model.generate(rgb_only, fast()).array, model.generate(opaque, fast()).array)


def test_same_seed_same_layers_different_seed_different_layers(model: LayersModel) -> None:
    image = prepared(seed=3)
    first = model.generate(image, fast(seed=9)).array
    again = model.generate(image, fast(seed=9)).array
    other = model.generate(image, fast(seed=10)).array
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_resolution_1024_gives_a_larger_bucket_than_640(model: LayersModel) -> None:
    image = prepared((96, 64))
    small = model.generate(image, fast(resolution=640, layers=2))
    large = model.generate(image, fast(resolution=1024, layers=2))
    (_, h640, w640, _), (_, h1024, w1024, _) = small.array.shape, large.array.shape
    assert w1024 * h1024 > w640 * h640
    assert w1024 > h1024  # the input's landscape aspect is kept
    assert large.params["resolution"] == 1024 and large.params["layer_size"] == f"{w1024}x{h1024}"


def test_empty_prompt_is_captioned_like_the_pipeline_does_and_recorded(model: LayersModel) -> None:
    import torch

    from deployments.tiny import small_layered_sizes

    image = prepared(seed=5)
    result = model.generate(image, LayersParams(prompt="  ", steps=2, seed=4, layers=2))
    assert result.params["prompt_source"] == "caption"
    caption = result.params["prompt"]
    assert isinstance(caption, str) and caption.strip()

    # The recorded caption is the prompt that was used: giving it back reproduces the layers.
    replay = model.generate(image, LayersParams(prompt=caption, steps=2, seed=4, layers=2))
    assert replay.params["prompt_source"] == "request"
    assert np.array_equal(replay.array, result.array)

    # And the explicit captioning is diffusers' own: the pipeline captioning by itself (empty prompt,
    # English template) gives the same layers once its caption length is the configured one. (The
    # tiny encoder's caption barely depends on the pixels, so this pins the template, processor and
    # decoding; the image handed to the captioner is the pipeline's own resize by construction.)
    pipe = model.pipe
    original_generate = pipe.text_encoder.generate

    def capped(*args, **kwargs):
        kwargs["max_new_tokens"] = model.config.caption_max_new_tokens
        return original_generate(*args, **kwargs)

    pipe.text_encoder.generate = capped
    try:
        with small_layered_sizes(TINY_EDGE), torch.inference_mode():
            output = pipe(
                image=Image.fromarray(image.array, "RGBA"), prompt="", negative_prompt=" ", true_cfg_scale=4.0,
                layers=2, num_inference_steps=2, resolution=640, cfg_normalize=True, use_en_prompt=True,
                generator=torch.Generator().manual_seed(4), output_type="np",
            )
    finally:
        del pipe.text_encoder.generate
    expected = (np.clip(output.images[0], 0, 1) * 255).round().astype(np.uint8)
    assert np.array_equal(result.array, expected)


def test_stage_timings_are_reported_outside_the_params(model: LayersModel) -> None:
    result = model.generate(prepared(), fast(layers=2))
    timings = result.served["timings_s"]
    assert set(timings) == {"caption", "encode_prompt", "encode_image", "denoise", "decode", "total"}
    assert timings["caption"] == 0.0  # the request had a prompt
    assert all(timings[stage] > 0 for stage in ("encode_prompt", "encode_image", "denoise", "decode"))
    assert timings["total"] >= sum(v for k, v in timings.items() if k != "total")
    assert "timings_s" not in result.params and "replica" in result.served
    # the wrappers are gone after the call
    assert "encode_prompt" not in vars(model.pipe) and "decode" not in vars(model.pipe.vae)


class Recorder:
    """A `Progress` that records what it hears and asks to stop after `stop_after` steps."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.events: list[tuple] = []
        self.stop_after = stop_after

    def stage(self, name: str) -> None:
        self.events.append(("stage", name))

    def step(self, step: int, total: int) -> bool:
        self.events.append(("step", step, total))
        return self.stop_after is not None and step >= self.stop_after


def test_progress_hears_stages_and_steps_and_can_cancel_between_steps(model: LayersModel) -> None:
    recorder = Recorder()
    model.generate(prepared(), fast(steps=3, layers=2), recorder)
    assert recorder.events == [("stage", "encode_prompt"), ("step", 1, 3), ("step", 2, 3),
                               ("step", 3, 3), ("stage", "decode")]
    stopper = Recorder(stop_after=1)
    with pytest.raises(Cancelled):
        model.generate(prepared(), fast(steps=3, layers=2), stopper)
    assert stopper.events[-1] == ("step", 1, 3)
    assert "encode_prompt" not in vars(model.pipe)  # wrappers removed; the model keeps serving
    assert model.generate(prepared(), fast(layers=2)).array.shape[0] == 2


def test_async_call_runs_on_the_model_thread(model: LayersModel) -> None:
    result = asyncio.run(model(prepared(), fast(layers=2)))
    assert result.array.shape[0] == 2


@pytest.mark.parametrize(
    "params,field,words",
    [
        (LayersParams(resolution=800), "resolution", ["640", "1024", "800"]),
        (LayersParams(layers=0), "layers", ["1", "10"]),
        (LayersParams(layers=11), "layers", ["10", "11"]),
        (LayersParams(steps=0), "steps", ["100"]),
        (LayersParams(steps=101), "steps", ["100"]),
        (LayersParams(cfg=math.nan), "cfg", ["nan"]),
        (LayersParams(cfg=0.5), "cfg", ["0.5"]),
        (LayersParams(seed=2**32), "seed", []),
        (LayersParams(prompt="a" * 2001), "prompt", ["2000"]),
        (LayersParams(negative_prompt="a" * 2001), "negative_prompt", ["2000"]),
    ],
)
def test_out_of_range_parameters_name_the_field(model: LayersModel, params, field, words) -> None:
    with pytest.raises(InvalidParameter) as error:
        LayersModelConfig().resolve(params)
    assert error.value.field == field
    assert all(word in error.value.message for word in words), error.value.message
    with pytest.raises(InvalidParameter) as error:  # the model checks again (handle callers)
        model.generate(prepared(), params)
    assert error.value.field == field


def test_resolve_fills_defaults_and_a_seed() -> None:
    resolved = LayersModelConfig().resolve(LayersParams())
    assert (resolved.layers, resolved.resolution, resolved.steps, resolved.cfg) == (4, 640, 50, 4.0)
    assert resolved.cfg_normalize is True and resolved.negative_prompt == " " and resolved.prompt == ""
    assert 0 <= resolved.seed < 2**32
    assert LayersModelConfig(resolutions=[640]).resolve(LayersParams(cfg_normalize=False)).cfg_normalize is False
    with pytest.raises(InvalidParameter, match="must be 640, got 1024"):
        LayersModelConfig(resolutions=[640]).resolve(LayersParams(resolution=1024))


def test_bad_arrays_are_refused_naming_the_image(model: LayersModel) -> None:
    image = prepared()
    for array in (image.array[..., :2], image.array.astype(np.float32), image.array[0]):
        with pytest.raises(InvalidParameter) as error:
            model.generate(Prepared(array=array, info=image.info), fast())
        assert error.value.field == "image"


@pytest.mark.parametrize(
    "fields,name",
    [
        ({"resolutions": [640, 800]}, "resolutions"),
        ({"resolutions": []}, "resolutions"),
        ({"resolutions": [640], "default_resolution": 1024}, "default_resolution"),
        ({"default_layers": 5, "max_layers": 4}, "default_layers"),
        ({"max_layers": 0}, "max_layers"),
        ({"default_cfg": math.nan}, "default_cfg"),
        ({"tiny_edge": 0}, "tiny_edge"),
        ({"caption_language": "de"}, "caption_language"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_config_is_refused_naming_the_field(fields, name) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=name):
        LayersModelConfig(**fields)


def test_describe_lists_resolutions_and_the_layer_limit() -> None:
    described = LayersModelConfig(max_layers=6, resolutions=[1024, 640]).describe()
    assert described["resolutions"] == [640, 1024] and described["max_layers"] == 6
    assert described["default_layers"] == 4 and described["default_resolution"] == 640
