"""The tiny `real` pipeline through Serve in the number formats a card computes in: a replica with a
placement on fake GPU resources applies the plan's formats (fp8 transformer storage computed in
bf16, bf16 text encoder, the locked float32 VAE) and runs a speed preset stacked with a version.
Its result stays close to the float32 one: the formats change rounding, not what is made."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from deployments.lora import TINY_VERSIONS, ensure_tiny_loras, ensure_tiny_speed_adapter
from tests.conftest import Service
from tests.hostile import encode
from tests.stacking import merged_output


@pytest.fixture(scope="module")
def service(demo_service) -> Iterator[Service]:
    real = {"placement": {"gpus": 1, "gpu_memory_gb": 24}, "serve": {"ray_actor_options": {"num_cpus": 0.5}}}
    yield from demo_service({"real": real})


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / max(np.mean((a.astype(float) - b) ** 2), 1e-12)))


def test_a_card_s_number_formats_give_the_float32_result_within_rounding(service: Service, model_cache) -> None:
    array = np.random.default_rng(5).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    version = TINY_VERSIONS[0]
    fields = {"preset": "fast", "lora": version, "lora_scale": 0.5, "seed": 3}
    response = service.post_image(encode(Image.fromarray(array), "PNG"), fields, content_type="image/png")
    assert response.status_code == 200, response.text
    assert response.headers["x-imgserve-adapters"] == f"fast:1,{version}:0.5"
    stats = service.model_stats()
    assert stats["plan"]["transformer"]["dtype"] == "float8_e4m3fn" and stats["plan"]["vae"]["dtype"] == "float32"
    assert stats["locked"] == {"vae_dtype": "float32", "scheduler": "FlowMatchEulerDiscreteScheduler", "batch_size": 1}
    served = np.asarray(Image.open(io.BytesIO(response.content)))
    adapters = [(ensure_tiny_speed_adapter(model_cache), 1.0),
                (ensure_tiny_loras(model_cache) / f"{version}.safetensors", 0.5)]
    float32 = merged_output(model_cache, adapters, array, steps=4, cfg=1.0, seed=3)
    other_seed = merged_output(model_cache, adapters, array, steps=4, cfg=1.0, seed=4)
    assert not np.array_equal(served, float32)  # it did compute in other formats
    assert psnr(served, float32) > 35.0  # measured 49.5 dB on the demo's tiny model
    assert psnr(served, other_seed) < 25.0  # what a different result looks like
