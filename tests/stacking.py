"""What stacked adapters must give, computed independently of the service: each adapter's low-rank
update merged by hand into a copy of the tiny transformer's weights, W + Σ wᵢ·Bᵢ·Aᵢ (the tiny files
carry no alpha, so each scale is 1), then the plain pipeline run with no adapter at all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from deployments import checkpoints, tiny
from deployments.real_config import DEFAULT_PROMPT


def merged_output(cache_dir: Path, adapters: list[tuple[Path, float]], array: np.ndarray, *, steps: int,
                  cfg: float, seed: int, prompt: str = DEFAULT_PROMPT, condition_area: int = 4096) -> np.ndarray:
    """The uint8 image the tiny edit pipeline makes from `array` with `adapters` (file, weight) merged
    (with the demo's condition area, which the served model sets for its whole process too)."""
    tiny.set_condition_areas(condition_area, condition_area)
    pipe = checkpoints.load_pipeline("edit", tiny.ensure_tiny("edit", cache_dir))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for path, weight in adapters:
            tensors = load_file(str(path))
            for key, down in tensors.items():
                if key.endswith(".lora_A.weight"):
                    module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                    up = tensors[key.replace("lora_A", "lora_B")]
                    pipe.transformer.get_submodule(module).weight += weight * (up @ down)
    height, width = array.shape[:2]
    output = pipe(image=[Image.fromarray(array)], prompt=prompt, negative_prompt=" " if cfg > 1 else None,
                  true_cfg_scale=cfg, num_inference_steps=steps, height=height, width=width,
                  generator=torch.Generator(device="cpu").manual_seed(seed), output_type="np")
    return (np.clip(np.asarray(output.images[0]), 0.0, 1.0) * 255.0).round().astype(np.uint8)
