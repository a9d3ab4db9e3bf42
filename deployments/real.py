"""The `real` task: 2.5D / anime / cartoon art → photoreal person with Qwen-Image-Edit-2511.

`RealModel` receives a `Prepared` array and resolved `RealParams`, runs diffusers'
`QwenImageEditPlusPipeline` with the request's LoRA version active, and returns a `Generated` array
at the model size. LoRA versions are hot-swapped on the loaded base: a replica keeps
`max_adapters_per_replica` of them resident (LRU), and Serve routes a request to a replica that
holds its version (`TASK.route`). Knows nothing about HTTP, jobs or encoding.
"""

from __future__ import annotations

import warnings
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import field_validator

from deployments import metrics
from deployments.diffusion import MIN_STEPS, DiffusionConfig, DiffusionModel, DiffusionParams, step_callback, to_uint8
from deployments.errors import InvalidParameter
from deployments.lora import NONE, LoraStore, check_name, diffusers_state_dict, ensure_tiny_loras, inspect_lora, linear_shapes
from deployments.records import Generated, ImageSpec, Prepared, Progress
from deployments.task import Task, choice_schema
from deployments.validation import at_least

DEFAULT_PROMPT = "transform the image to realistic photograph, high quality, 4k, natural skin texture"


class RealParams(DiffusionParams):
    """Per-request choices for `real`; None means "use the configured default"."""

    prompt: str | None = None
    """What the result should show; blank → the default prompt."""
    lora: str | None = None
    """LoRA version (a file stem in the LoRA directory; GET /v1/models lists them) or `none` for the
    base alone; None → the configured default (the newest version unless `default_lora` says otherwise)."""


class RealModelConfig(DiffusionConfig):
    """The `real` section: the RealModel deployment's settings (the shared ones are documented on
    DiffusionConfig) and Serve options."""

    task: ClassVar[Literal["real"]] = "real"
    tiny_only: ClassVar[tuple[str, ...]] = ("condition_area",)

    default_prompt: str = DEFAULT_PROMPT
    """Prompt used when the request gives none."""
    default_steps: int = 30
    """Denoising steps when the request gives none."""
    default_cfg: float = 7.0
    """true_cfg_scale when the request gives none."""
    condition_area: int | None = None
    """Tiny models only: the pixel area diffusers resizes the condition image to (module constants
    VAE_IMAGE_SIZE and CONDITION_IMAGE_SIZE, process-wide). None keeps diffusers' real-model values."""
    lora_dir: str | None = None
    """Directory of LoRA versions (`*.safetensors`, named by their stems); `tiny`: three tiny
    random adapters generated into the cache directory (demo, tests); None: the base model only."""
    default_lora: str | None = None
    """Version used when a request names none; None → the newest; `none` → the base alone."""
    max_adapters_per_replica: int = 2
    """LoRA versions a replica keeps loaded (LRU beyond this); also Serve's multiplexing limit."""
    lora_rescan_s: float = 10.0
    """Seconds a directory listing is trusted; unknown names always trigger a rescan."""

    _real_positive = at_least(1, "max_adapters_per_replica", "condition_area")

    @field_validator("default_lora")
    @classmethod
    def _default_lora(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                check_name(value, "default_lora")
            except InvalidParameter as exc:
                raise ValueError(f"default_lora: {exc.message}") from None
        return value

    def check_input_edge(self, max_long_edge: int) -> None:
        if self.placement is not None and self.placement.resolution < max_long_edge:
            raise ValueError(f"real.placement.resolution ({self.placement.resolution}) must be >= "
                             f"preprocess.max_long_edge ({max_long_edge}): inputs reach the model that large")

    def resident_limit(self) -> int:
        return self.max_adapters_per_replica

    def lora_store(self, cache_dir: Path | str) -> LoraStore | None:
        """The store of LoRA versions this config names (generating the tiny ones if asked)."""
        if self.lora_dir is None:
            return None
        directory = ensure_tiny_loras(cache_dir) if self.lora_dir == "tiny" else Path(self.lora_dir)
        return LoraStore(directory, rescan_s=self.lora_rescan_s)

    catalog = lora_store

    def transformer_dir(self, cache_dir: Path | str) -> Path:
        """The base transformer's directory (what LoRA files are checked against)."""
        if self.source == "tiny":
            from deployments.tiny import ensure_tiny

            return ensure_tiny("edit", Path(cache_dir).expanduser()) / "transformer"
        return Path(self.source).expanduser() / "transformer"

    def resolve(self, params: RealParams, store: LoraStore | None = None) -> RealParams:
        """Fill defaults and check ranges; raises InvalidParameter naming the field."""
        prompt = self.default_prompt if params.prompt is None or not params.prompt.strip() else params.prompt
        common = self.resolve_common(params, prompt)
        lora = params.lora or self.default_lora or (store.newest() if store else None) or NONE
        if lora != NONE:
            if store is None:
                raise InvalidParameter(f"no LoRA directory is configured; only {NONE!r} is available", "lora")
            store.path(lora)  # refuses paths and unknown versions, listing the valid ones
        return RealParams(**common, lora=lora)

    def describe(self, store: LoraStore | None = None) -> dict[str, Any]:
        versions = store.versions() if store else []
        return {
            "defaults": {"prompt": self.default_prompt, "negative_prompt": self.default_negative_prompt,
                         "steps": self.default_steps, "cfg": self.default_cfg},
            "limits": {"steps": [MIN_STEPS, self.max_steps], "cfg": [1.0, self.max_cfg]},
            "lora": {"versions": [NONE, *versions],
                     "default": self.default_lora or (versions[-1] if versions else NONE)},
        }

    def limits(self, store: LoraStore | None = None) -> dict[str, dict[str, Any]]:
        limits = super().limits()
        limits["prompt"]["default"] = self.default_prompt
        lora = self.describe(store)["lora"]
        return {**limits, "lora": {**choice_schema(lora["versions"]), "default": lora["default"]}}


class RealModel(DiffusionModel):
    """Qwen-Image-Edit-2511 (`QwenImageEditPlusPipeline`): Prepared → Generated."""

    input_spec = ImageSpec(multiple=16, alpha=False)
    task = "real"
    kind = "edit"
    config_class = RealModelConfig

    def __init__(self, config: RealModelConfig | None = None, cache_dir: Path | str = "~/.cache/imgserve") -> None:
        super().__init__(config, cache_dir)
        self.store: LoraStore | None = None
        self.adapter_loads: Counter[str] = Counter()
        """LoRA version → how many times it was read from disk into this replica."""
        self._resident: OrderedDict[str, None] = OrderedDict()  # LRU of loaded versions
        self._linear_shapes: dict[str, tuple[int, int]] = {}

    def load_model(self) -> None:
        from deployments import tiny

        # Several named adapters on one transformer is exactly what hot swapping means here.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        self.store = self.config.lora_store(self.cache_dir)
        if self.config.condition_area:
            tiny.set_condition_areas(self.config.condition_area, self.config.condition_area)
        super().load_model()
        self._linear_shapes = linear_shapes(self.pipe.transformer)

    def extra_stats(self) -> dict[str, Any]:
        return {"adapters": list(self._resident), "adapter_loads": dict(self.adapter_loads)}

    # -- LoRA ------------------------------------------------------------------------------------
    def ensure_adapter(self, version: str) -> str:
        """Make `version` resident (LRU beyond `max_adapters_per_replica`); the base is never reloaded.

        The file is checked against the transformer before anything is touched: on any failure
        the model is exactly as before and the request gets InvalidParameter naming the problem.
        """
        if version in self._resident:
            self._resident.move_to_end(version)
            return version
        self.check_health()
        if self.store is None:
            raise InvalidParameter(f"no LoRA directory is configured; only {NONE!r} is available", "lora")
        path = self.store.path(version)
        report = inspect_lora(path, self._linear_shapes)
        if not report.ok:
            raise InvalidParameter(f"LoRA {version!r} does not fit the base model: {'; '.join(report.problems)}", "lora")
        while len(self._resident) >= self.config.max_adapters_per_replica:
            evicted, _ = self._resident.popitem(last=False)
            self.pipe.delete_adapters([evicted])
            metrics.lora_events.inc(tags={"event": "evict", "version": evicted})
        try:
            self.pipe.load_lora_weights(diffusers_state_dict(path, report), adapter_name=version)
            loaded = self.pipe.get_list_adapters().get("transformer", [])
            if version not in loaded:
                raise ValueError("no weights matched the transformer")
        except Exception as exc:
            if version in self.pipe.get_list_adapters().get("transformer", []):
                self.pipe.delete_adapters([version])
            raise InvalidParameter(f"LoRA {version!r} could not be loaded: {exc}"[:500], "lora") from None
        self._resident[version] = None
        self.adapter_loads[version] += 1
        metrics.lora_events.inc(tags={"event": "load", "version": version})
        return version

    async def adapter(self, version: str) -> str:
        """Serve path: make `version` resident on the model thread. The app builder wraps this with
        `serve.multiplexed`, which tells the router which replica holds which version."""
        return await self.on_model_thread(self.ensure_adapter, version)

    def _activate(self, version: str) -> None:
        if version == NONE:
            if self._resident:
                self.pipe.disable_lora()
            return
        self.ensure_adapter(version)
        self.pipe.enable_lora()
        self.pipe.set_adapters([version])

    # -- serving ---------------------------------------------------------------------------------
    async def __call__(self, prepared: Prepared, params: RealParams, progress: Progress | None = None) -> Generated:
        """Serve entry point: the version made resident, then `generate` on the model thread."""
        loads_before = self.adapter_loads.total()
        if params.lora and params.lora != NONE:
            await self.adapter(params.lora)
        generated = await self.on_model_thread(self.generate, prepared, params, progress)
        if params.lora != NONE:
            generated.served["lora_load"] = "cold" if self.adapter_loads.total() > loads_before else "warm"
            if generated.served["lora_load"] == "warm":  # loads are counted where they happen
                metrics.lora_events.inc(tags={"event": "hit", "version": params.lora})
        return generated

    def generate(self, prepared: Prepared, params: RealParams, progress: Progress | None = None) -> Generated:
        import torch
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus
        from PIL import Image

        # 1. validate
        params = self.config.resolve(params, self.store)
        array = prepared.array
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise InvalidParameter(f"expected an RGB uint8 array, got {array.dtype} {array.shape}", "image")
        height, width = array.shape[:2]
        multiple = self.input_spec.multiple
        if height % multiple or width % multiple:
            raise InvalidParameter(f"sides must be multiples of {multiple}, got {width}x{height}", "image")
        # diffusers resizes the input to about CONDITION_IMAGE_SIZE and VAE_IMAGE_SIZE pixels at its
        # aspect, each side rounded to 32: a side rounded to 0 fails inside the pipeline (a 500), so
        # an aspect that extreme (e.g. 1x10000 with the demo's small condition areas) is refused here
        conditions = [edit_plus.calculate_dimensions(area, width / height)
                      for area in (edit_plus.CONDITION_IMAGE_SIZE, edit_plus.VAE_IMAGE_SIZE)]
        if min(min(sides) for sides in conditions) < 32:
            raise InvalidParameter(f"aspect ratio {width}x{height} is too extreme for this model (its condition "
                                   f"images would be {' and '.join(f'{w}x{h}' for w, h in conditions)})", "image")
        self.check_health()
        # 2. the request's adapter
        loads_before = self.adapter_loads.total()
        self._activate(params.lora)
        # 3. run
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
        if progress is not None:
            progress.stage("encode_prompt")
        with self.guarded(f"{width}x{height}, {params.steps} steps"):
            output = self.pipe(
                image=[Image.fromarray(array)],
                prompt=params.prompt,
                negative_prompt=params.negative_prompt,
                true_cfg_scale=params.cfg,
                num_inference_steps=params.steps,
                height=height,
                width=width,
                generator=generator,
                output_type="np",
                callback_on_step_end=step_callback(progress, params.steps),
            )
        # 4. package
        served: dict[str, Any] = {"replica": self.replica}
        if params.lora != NONE:
            served["lora_load"] = "cold" if self.adapter_loads.total() > loads_before else "warm"
        return Generated(array=to_uint8(output.images[0]), info=prepared.info,
                         params={"task": self.task, **params.model_dump()}, served=served)


def _route(params: RealParams) -> str | None:
    """Requests for one version go to a replica that holds it (the base alone needs no routing)."""
    return params.lora if params.lora and params.lora != NONE else None


TASK = Task(name="real", summary="art → photoreal person", model=RealModel, params=RealParams,
            section=RealModelConfig, headers=("steps", "cfg", "seed", "lora"), route=_route)
