"""The `real` task: 2.5D / anime / cartoon art → photoreal person with Qwen-Image-Edit-2511.

`RealModel` receives a `Prepared` array and resolved `RealParams`, runs diffusers'
`QwenImageEditPlusPipeline` with the request's adapters stacked — its preset's speed adapter (a
step-distilled LoRA: few steps, CFG off; none for `full`) and its LoRA version at `lora_scale` —
and returns a `Generated` array at the model size. Versions are hot-swapped on the loaded base: a
replica keeps `max_adapters_per_replica` of them resident (LRU), and Serve routes a request to a
replica that holds its version (`TASK.route`); speed adapters are read once when the replica
starts (`deployments.adapters`). Its settings and request fields are `deployments.real_config`.
Knows nothing about HTTP, jobs or encoding.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from deployments import metrics
from deployments.adapters import Adapters, stack_text
from deployments.diffusion import DiffusionModel, step_callback, to_uint8
from deployments.errors import InvalidParameter, Unavailable
from deployments.lora import NONE, LoraStore, version_key
from deployments.real_config import RealModelConfig, RealParams
from deployments.records import Conditioning, Generated, ImageSpec, Prepared, Progress
from deployments.task import Catalog, Task

log = logging.getLogger("imgserve")


class RealModel(DiffusionModel):
    """Qwen-Image-Edit-2511 (`QwenImageEditPlusPipeline`): Prepared → Generated."""

    input_spec = ImageSpec(multiple=16, alpha=False)
    task = "real"
    kind = "edit"
    config_class = RealModelConfig

    def __init__(self, config: RealModelConfig | None = None, cache_dir: Path | str = "~/.cache/imgserve") -> None:
        super().__init__(config, cache_dir)
        self.store: LoraStore | None = None
        self.adapters: Adapters | None = None
        """Speed adapters and resident versions of this replica's transformer (after `load`)."""
        self.prefetched: set[str] = set()
        """Versions loaded by `prefetch` that no request has used yet."""
        self._default_problem: str | None = None
        self.default_lora: str = NONE
        """The version of a request that names none, fixed when the replica loads (`load_model`)."""

    def condition_areas(self) -> None:
        """The demo's smaller condition images (process-wide), where the config asks for them."""
        from deployments import tiny

        if self.config.condition_area:
            tiny.set_condition_areas(self.config.condition_area, self.config.condition_area)

    def load_text(self, text_encoder: Any = None) -> None:
        self.condition_areas()
        super().load_text(text_encoder)

    def load_model(self) -> None:
        # Several named adapters on one transformer is exactly what hot swapping means here.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        self.condition_areas()
        super().load_model()
        if self.config.compile:
            # before any adapter: every one is sized for the largest rank, so swapping keeps the graph
            self.pipe.enable_lora_hotswap(target_rank=self.config.compile_max_rank)
        rank = self.config.compile_max_rank if self.config.compile else None
        self.adapters = Adapters(self.pipe, None, self.config.max_adapters_per_replica, rank)
        # only complete files that fit this base (and a compiled replica's rank) are versions
        self.store = self.adapters.store = self.config.lora_store(self.cache_dir, self.adapters.problems)
        for name in self.config.speed_adapters:
            self.adapters.pin_speed(name, self.config.speed_adapter_file(name, self.cache_dir))
        if self.config.compile:
            self.pipe.transformer.compile()
        self.fix_default()

    def fix_default(self) -> None:
        """Fix the default version for this replica's life: `default_lora`, else the newest complete
        version now; logged, and reported unusable (not silently replaced) if its file goes bad."""
        configured = self.config.default_lora
        versions = self.store.settle() if self.store is not None else []
        self.default_lora = configured or (versions[-1] if versions else NONE)
        source = "real.default_lora" if configured else "the newest complete version"
        where = f" in {self.store.directory}" if self.store is not None else " (no LoRA directory)"
        log.info("real: default LoRA version %r (%s%s)", self.default_lora, source, where)
        self.default_problem()

    def default_problem(self) -> str | None:
        """Why the default version cannot be read from disk now (None: it can); a change is logged and
        the gauge `imgserve_lora_default_usable` follows it. While it is unusable the replica keeps a
        resident copy of it from being evicted, so default requests still run there."""
        default = self.default_lora
        problem = None if default == NONE or self.store is None else self.store.usable(default)
        if problem != self._default_problem:
            if problem is None:
                log.info("real: default LoRA version %r is usable again", default)
            else:
                log.warning("real: default LoRA version %r is not usable: %s", default, problem)
        self._default_problem = problem
        if self.adapters is not None:
            self.adapters.keep = default if problem is not None else None
        metrics.lora_default_usable.set(0 if problem else 1, tags={"version": default})
        return problem

    @property
    def catalog_every_s(self) -> float:
        """How often the catalog is worth reporting: a directory rescan's interval."""
        return self.config.lora_rescan_s

    def catalog(self) -> Catalog:
        """What this replica serves (`Model.catalog`): the complete versions and those it holds in
        memory, the default, why other files are not versions, and whether the default is usable."""
        problem = self.default_problem()
        names = set(self.store.versions()) if self.store is not None else set()
        names.update(self.adapters.versions if self.adapters is not None else ())
        problems = {**self.store.pending, **self.store.problems} if self.store is not None else {}
        return Catalog(tuple(sorted(names, key=version_key)), self.default_lora, problems, problem)

    def extra_stats(self) -> dict[str, Any]:
        return {**super().extra_stats(), **(self.adapters.stats() if self.adapters is not None else {})}

    # -- LoRA ------------------------------------------------------------------------------------
    def ensure_adapter(self, version: str) -> str:
        """Make `version` resident (LRU beyond `max_adapters_per_replica`); the base is never reloaded.
        The default version, when its file is unusable and it is not resident, is 503 `unavailable`."""
        self.check_health()
        if version == self.default_lora and version not in self.adapters.versions:
            problem = self.default_problem()
            if problem is not None:
                raise Unavailable(f"the default LoRA version {version!r} cannot be loaded ({problem}); name "
                                  f"another version in `lora`, or `none`", "lora")
        self.adapters.ensure_version(version)
        return version

    async def adapter(self, version: str) -> str:
        """Serve path: make `version` resident on the model thread. The app builder wraps this with
        `serve.multiplexed`, which tells the router which replica holds which version."""
        return await self.on_model_thread(self.ensure_adapter, version)

    async def prefetch(self, version: str) -> str:
        """Make `version` resident ahead of a request that will use it (while its prompt is being
        encoded elsewhere); that request then reports the load as its own (`lora_load: cold`)."""
        loads_before = self.adapters.version_loads() if self.adapters is not None else 0
        await self.adapter(version)
        if self.adapters is not None and self.adapters.version_loads() > loads_before:
            self.prefetched.add(version)
        return version

    # -- serving ---------------------------------------------------------------------------------
    async def __call__(self, prepared: Prepared, params: RealParams, progress: Progress | None = None,
                       conditioning: Conditioning | None = None) -> Generated:
        """Serve entry point: the version made resident, then `generate` on the model thread."""
        loads_before = self.adapters.version_loads() if self.adapters is not None else 0
        if params.lora is None:  # the ingress had no report yet: this replica's default
            params = params.model_copy(update={"lora": self.default_lora})
        if params.lora != NONE:
            await self.adapter(params.lora)
        generated = await self.serve_generate(prepared, params, progress, conditioning)
        if params.lora != NONE:
            prefetched = params.lora in self.prefetched
            self.prefetched.discard(params.lora)
            cold = prefetched or self.adapters.version_loads() > loads_before
            generated.served["lora_load"] = "cold" if cold else "warm"
            if generated.served["lora_load"] == "warm":  # loads are counted where they happen
                metrics.lora_events.inc(tags={"event": "hit", "version": params.lora})
        return generated

    def checked(self, prepared: Prepared) -> np.ndarray:
        """The request's image, refused (InvalidParameter) where the pipeline cannot take it."""
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus

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
        return array

    def encode_text(self, prepared: Prepared, params: RealParams) -> Conditioning:
        """The prompt (and negative prompt, with CFG) encoded with the condition image, sized as
        the pipeline sizes it."""
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus
        from PIL import Image

        image = Image.fromarray(self.checked(prepared))
        width, height = image.size
        condition_width, condition_height = edit_plus.calculate_dimensions(edit_plus.CONDITION_IMAGE_SIZE,
                                                                           width / height)
        condition = self.pipe.image_processor.resize(image, condition_height, condition_width)
        return self.encoded(params.prompt, params.negative_prompt if params.cfg > 1 else None, image=[condition])

    def generate(self, prepared: Prepared, params: RealParams, progress: Progress | None = None,
                 conditioning: Conditioning | None = None) -> Generated:
        import torch
        from PIL import Image

        # 1. validate (against this replica's catalog; a request that names no version gets its default)
        params = self.config.resolve(params, self.catalog())
        array = self.checked(prepared)
        height, width = array.shape[:2]
        self.check_health()
        self.needs_conditioning(conditioning)
        # 2. the request's adapters: its preset's speed adapter, then its version
        loads_before = self.adapters.version_loads()
        speed = self.config.speed_adapters.get(params.preset)
        stack = self.adapters.stack(params.preset, params.lora, params.lora_scale, speed.weight if speed else 0.0)
        self.adapters.activate(stack)
        # 3. run: the prompt encoded here unless the text encoder stage did it
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
        if progress is not None and conditioning is None:
            progress.stage("encode_prompt")
        with self.guarded(f"{width}x{height}, {params.steps} steps", conditioning):
            encoded = conditioning or self.encode_text(prepared, params)
            output = self.pipe(
                image=[Image.fromarray(array)],
                **self.conditioned(encoded),
                true_cfg_scale=params.cfg,
                num_inference_steps=params.steps,
                height=height,
                width=width,
                generator=generator,
                output_type="np",
                callback_on_step_end=step_callback(progress, params.steps),
            )
        # 4. package
        served: dict[str, Any] = {"replica": self.replica, **(conditioning.served if conditioning else {})}
        if params.lora != NONE:
            served["lora_load"] = "cold" if self.adapters.version_loads() > loads_before else "warm"
        return Generated(array=to_uint8(output.images[0]), info=prepared.info,
                         params={"task": self.task, **params.model_dump(), "adapters": stack_text(stack)},
                         served=served)


def _route(params: RealParams) -> str | None:
    """Requests for one version go to a replica that holds it (the base alone needs no routing)."""
    return params.lora if params.lora and params.lora != NONE else None


def _prepare(params: RealParams, spec: ImageSpec) -> ImageSpec:
    return replace(spec, depth_compensation=bool(params.depth_compensation))


TASK = Task(name="real", summary="art → photoreal person", model=RealModel, params=RealParams,
            section=RealModelConfig, headers=("steps", "cfg", "seed", "lora", "preset", "adapters"), route=_route,
            prepare=_prepare)
