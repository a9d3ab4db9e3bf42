"""AnimeModel and the AnimeGANv2 generator used directly, without Ray: architecture, weights files,
sizes, determinism, mixed batches, styles."""

from __future__ import annotations

import asyncio
import threading
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import save_file

from deployments.anime import AnimeModel, AnimeModelConfig, AnimeParams
from deployments.styles import TINY_STYLES, PickledStyles, ensure_tiny_styles, refuse_pickled_styles, style_files
from deployments.stylize import Workspace, padding_for
from deployments.animegan import (
    PARAMETER_COUNT,
    Generator,
    WeightsMismatch,
    load_generator,
    random_generator,
)
from deployments.errors import InvalidParameter
from deployments.task import Catalog
from deployments.preprocess import Preprocess, PreprocessConfig
from deployments.records import Prepared, PreparedImage


@pytest.fixture(scope="module")
def model(model_cache) -> AnimeModel:
    anime = AnimeModel(AnimeModelConfig(), model_cache)
    assert anime.nets == {} and anime.loads == 0  # construction only stores config
    anime.load()
    return anime


def prepared(width: int, height: int, seed: int = 0) -> Prepared:
    """A photo-like RGB array (smooth gradients plus noise) as preprocess would hand it over."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / max(width, 1) * 255, y / max(height, 1) * 255, 128 + 60 * np.sin((x + y) / 9)], axis=-1)
    array = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    info = PreparedImage((width, height), (width, height), (width, height), 1.0, "PNG", "RGB")
    return Prepared(array=array, info=info)


def reference(net: Generator, array: np.ndarray) -> np.ndarray:
    """The plain published recipe: [-1, 1] input, the module's own forward in fp32 NCHW, uint8 out;
    plus the model's reflect padding to multiples of 32 and the crop back."""
    h, w = array.shape[:2]
    left, right, top, bottom = padding_for(h, w)
    x = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).float() / 127.5 - 1.0
    with torch.no_grad():
        out = net(F.pad(x, (left, right, top, bottom), mode="reflect"))[0, :, top : top + h, left : left + w]
    return ((out + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# -- architecture and weights files ----------------------------------------------------------------
def test_parameter_count_and_published_key_layout() -> None:
    net = Generator()
    state = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == PARAMETER_COUNT == 2_143_552
    assert len(state) == 77
    expected_shapes = {
        "block_a.0.1.weight": (32, 3, 7, 7),
        "block_a.0.2.weight": (32,),
        "block_a.1.1.weight": (64, 32, 3, 3),
        "block_b.0.1.weight": (128, 64, 3, 3),
        "block_c.1.layers.0.1.weight": (256, 128, 1, 1),
        "block_c.1.layers.1.1.weight": (256, 1, 3, 3),  # depthwise
        "block_c.1.layers.1.1.bias": (256,),
        "block_c.1.layers.2.weight": (256, 256, 1, 1),
        "block_c.4.layers.3.bias": (256,),
        "block_c.5.1.weight": (128, 256, 3, 3),
        "block_e.2.1.weight": (32, 64, 7, 7),
        "out_layer.0.weight": (3, 32, 1, 1),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert list(state)[0] == "block_a.0.1.weight" and list(state)[-1] == "out_layer.0.weight"


def test_state_dict_files_in_published_layout_load_strictly(tmp_path: Path) -> None:
    source = random_generator(7)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "style.safetensors"))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(load_generator(tmp_path / "style.safetensors")(x), source(x))


def test_a_pickled_style_is_refused_unopened_naming_the_file_and_the_converter(tmp_path: Path) -> None:
    # Bytes that are not even a pickle: the refusal comes from the name alone, nothing reads them.
    (tmp_path / "paprika.pt").write_bytes(b"a pickle would run code here")
    with pytest.raises(WeightsMismatch) as error:
        load_generator(tmp_path / "paprika.pt")
    message = str(error.value)
    assert str(tmp_path / "paprika.pt") in message
    assert ".safetensors only" in message and f"imgserve convert-styles THAT_DIR {tmp_path}" in message


def test_a_styles_directory_lists_safetensors_only_and_names_unconverted_pickles(tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in random_generator(1).state_dict().items()}
    save_file(state, str(tmp_path / "paprika.safetensors"))
    (tmp_path / "paprika.pt").write_bytes(b"converted already: its safetensors twin is the style")
    (tmp_path / "hayao.pth").write_bytes(b"not converted")
    (tmp_path / "shinkai.pt").write_bytes(b"not converted")
    assert style_files(tmp_path) == {"paprika": tmp_path / "paprika.safetensors"}
    with pytest.raises(PickledStyles) as error:
        refuse_pickled_styles(tmp_path)
    message = str(error.value)
    assert f"{tmp_path / 'hayao.pth'}, {tmp_path / 'shinkai.pt'}:" in message and "paprika.pt" not in message
    assert "imgserve convert-styles" in message
    (tmp_path / "hayao.pth").unlink()
    (tmp_path / "shinkai.pt").unlink()
    refuse_pickled_styles(tmp_path)  # nothing left to convert


def test_lean_forward_equals_the_published_forward() -> None:
    net = random_generator(3)
    workspace = Workspace()
    # the workspace is reused across calls and sizes: a stale or aliased block would show here
    for shape, align_corners in [((2, 3, 40, 72), True), ((1, 3, 64, 96), False), ((2, 3, 40, 72), True)]:
        x = torch.rand(*shape) * 2 - 1
        with torch.inference_mode():
            plain = net(x, align_corners)
            lean = net.forward_lean(x.contiguous(memory_format=torch.channels_last), align_corners)
            kept = net.forward_lean(x.contiguous(memory_format=torch.channels_last), align_corners, workspace)
            workspace.trim()
        assert (lean - plain).abs().max().item() < 1e-4
        assert (kept - plain).abs().max().item() < 1e-4
    assert 0 < workspace.kept_bytes <= workspace.max_bytes


def test_wrong_keys_or_shapes_are_named(tmp_path: Path) -> None:
    state = {k: v.clone() for k, v in Generator().state_dict().items()}
    del state["block_b.1.2.bias"]
    state["block_z.0.weight"] = torch.zeros(3)
    state["block_a.0.1.weight"] = torch.zeros(32, 3, 3, 3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsMismatch) as error:
        load_generator(tmp_path / "bad.safetensors")
    message = str(error.value)
    assert "bad.safetensors" in message
    assert "missing keys ['block_b.1.2.bias']" in message
    assert "unexpected keys ['block_z.0.weight']" in message
    assert "block_a.0.1.weight (32, 3, 3, 3) (expected (32, 3, 7, 7))" in message


def test_an_unreadable_safetensors_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(WeightsMismatch, match=r"truncated\.safetensors: not a readable \.safetensors file"):
        load_generator(tmp_path / "truncated.safetensors")


def test_load_names_the_bad_style_file(tmp_path: Path, model_cache: Path) -> None:
    styles = tmp_path / "styles"
    styles.mkdir()
    save_file({k: v.contiguous() for k, v in random_generator(1).state_dict().items()}, str(styles / "good.safetensors"))
    save_file({"block_a.0.1.weight": torch.zeros(1)}, str(styles / "broken.safetensors"))
    model = AnimeModel(AnimeModelConfig(styles_dir=str(styles), default_style="good"), model_cache)
    with pytest.raises(WeightsMismatch, match="broken.safetensors"):
        model.load()


# -- outputs ---------------------------------------------------------------------------------------
def test_odd_exif_rotated_upload_keeps_size_and_aspect(model: AnimeModel) -> None:
    rng = np.random.default_rng(5)
    photo = Image.fromarray(rng.integers(0, 256, (867, 1279, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    buffer = BytesIO()
    photo.save(buffer, "JPEG", quality=85, exif=exif.tobytes())
    ready = Preprocess(PreprocessConfig(max_long_edge=160)).prepare(buffer.getvalue(), AnimeModel.input_spec)
    assert ready.info.original_size == (867, 1279)
    assert ready.info.size == ready.info.model_size == (108, 160)  # not aligned: the model pads
    result = model.generate(ready, AnimeParams())
    assert result.array.shape == (160, 108, 3) and result.array.dtype == np.uint8
    assert result.array.std() > 5  # not a constant image
    assert result.params == {"task": "anime", "style": "face_paint_512_v2"}
    assert result.info is ready.info
    assert model.stats()["loads"] == 1 and model.stats()["device"] == "cpu"


@pytest.mark.parametrize("size", [(70, 45), (200, 170)])  # plain forward below ~160², lean above
def test_output_matches_the_published_module_and_is_deterministic(model: AnimeModel, size) -> None:
    image = prepared(*size, seed=1)
    first = model.generate(image, AnimeParams(style="paprika")).array
    again = model.generate(image, AnimeParams(style="paprika")).array
    other = model.generate(image, AnimeParams(style="celeba_distill")).array
    assert first.shape == image.array.shape
    assert np.array_equal(first, again)
    assert max_diff(first, other) > 10  # styles are different weights
    net = load_generator(model.styles_path / "paprika.safetensors")
    assert max_diff(first, reference(net, image.array)) <= 1


def test_tiny_images_are_served(model: AnimeModel) -> None:
    for width, height in ((1, 1), (9, 5), (33, 16)):
        result = model.generate(prepared(width, height), AnimeParams())
        assert result.array.shape == (height, width, 3)


def test_mixed_batch_gives_each_caller_its_own_result(model_cache: Path) -> None:
    # max_batch_pixels forces the two same-size paprika requests into separate chunks as well
    model = AnimeModel(AnimeModelConfig(max_batch_size=4, max_batch_pixels=64 * 64), model_cache)
    model.load()
    assert model._batched is None  # outside a Serve replica: the handler is called directly
    requests = [
        (prepared(64, 48, seed=1), AnimeParams(style="paprika")),
        (prepared(40, 72, seed=2), AnimeParams(style="face_paint_512_v1")),
        (prepared(64, 48, seed=3), AnimeParams(style="paprika")),
        (prepared(50, 40, seed=4), AnimeParams(style="no_such_style")),
        (prepared(60, 40, seed=5), AnimeParams()),  # pads to 64x64 like the first: same group size
    ]
    alone = [model.generate(image, params).array if params.style != "no_such_style" else None for image, params in requests]

    async def run() -> tuple[list, list]:
        batched = await model.handle_batch([r[0] for r in requests], [r[1] for r in requests])
        calls = await asyncio.gather(*(model(image, params) for image, params in requests), return_exceptions=True)
        return batched, calls

    batched, calls = asyncio.run(run())
    for i, (image, params) in enumerate(requests):
        for result in (batched[i], calls[i]):
            if alone[i] is None:
                assert isinstance(result, InvalidParameter) and result.field == "style"
                continue
            assert result.array.shape == image.array.shape
            assert max_diff(result.array, alone[i]) <= 1
            assert result.params["style"] == (params.style or "face_paint_512_v2")
            assert result.info is image.info
    assert model.stats()["largest_batch"] == len(requests)


# -- styles ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["no_such_style", "../paprika", "sub/paprika", "paprika/..", ".hidden", "a\\b"])
def test_unknown_or_path_like_style_is_refused(model: AnimeModel, style: str) -> None:
    with pytest.raises(InvalidParameter) as error:
        model.config.resolve(AnimeParams(style=style), model.catalog())  # the catalog the replica reports
    assert error.value.field == "style"
    with pytest.raises(InvalidParameter) as error:
        model.generate(prepared(32, 32), AnimeParams(style=style))
    assert error.value.field == "style"


def test_resolve_fills_the_default_style_and_lists_the_styles() -> None:
    config = AnimeModelConfig(default_style="paprika")
    assert config.resolve(AnimeParams()).style == "paprika"
    assert config.resolve(AnimeParams(style="celeba_distill")).style == "celeba_distill"
    assert config.styles() == sorted(TINY_STYLES)
    with pytest.raises(InvalidParameter, match="available: celeba_distill, face_paint_512_v1"):
        config.resolve(AnimeParams(style="hayao"), Catalog(tuple(config.styles()), "paprika"))


def test_resolve_where_the_styles_directory_is_not_visible_checks_only_the_name(tmp_path: Path) -> None:
    config = AnimeModelConfig(styles_dir=str(tmp_path / "on-the-gpu-nodes-only"), default_style="hayao")
    assert config.resolve(AnimeParams()).style == "hayao"  # the replica checks that it exists
    with pytest.raises(InvalidParameter) as error:
        config.resolve(AnimeParams(style="../etc/passwd"))
    assert error.value.field == "style"
    with pytest.raises(FileNotFoundError):
        AnimeModel(config, tmp_path).load()  # a replica cannot start without it


def test_a_style_file_dropped_into_the_directory_is_listed_and_served(tmp_path: Path, model_cache: Path) -> None:
    styles = tmp_path / "styles"
    styles.mkdir()
    save_file({k: v.contiguous() for k, v in random_generator(1).state_dict().items()}, str(styles / "base.safetensors"))
    (styles / "notes.txt").write_text("not a style")
    config = AnimeModelConfig(styles_dir=str(styles), default_style="base")
    model = AnimeModel(config, model_cache)
    model.load()
    assert config.styles() == model.styles() == ["base"]
    hayao = {k: v.contiguous() for k, v in random_generator(2).state_dict().items()}
    save_file(hayao, str(styles / "hayao.safetensors"))  # dropped in while serving
    assert config.styles() == model.styles() == ["base", "hayao"]
    assert config.resolve(AnimeParams(style="hayao")).style == "hayao"
    result = model.generate(prepared(32, 24), AnimeParams(style="hayao"))
    assert result.params["style"] == "hayao" and model.stats()["styles"] == ["base", "hayao"]


def test_tiny_styles_are_generated_once_even_when_replicas_race(tmp_path: Path) -> None:
    found: list[Path] = []
    threads = [threading.Thread(target=lambda: found.append(ensure_tiny_styles(tmp_path))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(found) == 2 and found[0] == found[1] == tmp_path / "anime-styles-v1"
    assert sorted(p.name for p in found[0].iterdir()) == sorted(f"{s}.safetensors" for s in TINY_STYLES)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    weights = {s: load_generator(found[0] / f"{s}.safetensors").state_dict()["block_a.0.1.weight"] for s in TINY_STYLES}
    assert not torch.equal(weights["paprika"], weights["celeba_distill"])  # seeded per name


def test_check_health_fails_before_load(model_cache: Path) -> None:
    with pytest.raises(RuntimeError, match="not loaded"):
        AnimeModel(AnimeModelConfig(), model_cache).check_health()


@pytest.mark.parametrize(
    "fields,name",
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_pixels": 0}, "max_batch_pixels"),
        ({"batch_wait_timeout_s": -1.0}, "batch_wait_timeout_s"),
        ({"default_style": "hayao"}, "default_style"),  # not a tiny style
        ({"default_style": "../x", "styles_dir": "/srv/styles"}, "default_style"),
        ({"num_threads": 0}, "num_threads"),
        ({"workspace_mb": -1}, "workspace_mb"),
    ],
)
def test_bad_config_values_name_the_field(fields: dict, name: str) -> None:
    with pytest.raises(ValidationError, match=name):
        AnimeModelConfig(**fields)
