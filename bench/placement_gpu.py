"""GPU check of the placement planner: predicted vs measured peak GPU memory per phase.

Where CUDA is available: builds the real-size Qwen-Image-Edit-2511 pipeline from the stored configs
(deployments/model_configs/, no download; parameters on the meta device, then random bf16 on CPU one
at a time), applies `plan("real", PlacementConfig(--gpus))` with `place_pipeline`, caps every used
card to the plan's memory (`torch.cuda.set_per_process_memory_fraction`), runs --resolution² (random
input image) for --steps steps with true CFG, and reads/resets `max_memory_allocated` at every phase
boundary: text encoder forward = encode_prompt, `vae.encode` = encode_image, transformer forward =
denoise, `vae.decode` until the pipeline returns = decode, the rest = between. A phase's peak so
includes the weights resident then, like the planner's. Tokenizer and processor are the tiny offline
ones (deployments/tiny.py; byte-level, ids < 270, below the real vocab of 152,064); the text
encoder's image/vision token ids are set to theirs, and both prompts are padded to --text-tokens
text-encoder tokens (default: the planner's TEXT_TOKENS budget). Writes
bench/results/placement_gpu.json (or --out): plan, predicted vs measured per phase and GPU, checks
(within 10 % of the plan's peak, at most its usable memory), step times, and bench.common's report
header (command, machine with the GPUs, versions, git state, environment);
exit 1 on out-of-memory (still written). Needs ~60 GB of host RAM, torch, diffusers (carried as a
wheel to the GPU host), transformers, accelerate; no Ray.

--tiny: the same code path on CPU with the tiny pipeline, the plan's GPUs mapped to "cpu", 64²
images; no memory numbers, writes only with --out. Without CUDA or --tiny: says so, exits 0.

    .venv/bin/python bench/placement_gpu.py [--gpus 1x24] [--steps 4] [--out PATH] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

# bench.common imports only the standard library at module level: no Ray, no httpx needed here
from bench.common import report_header  # noqa: E402
from deployments import placement, tiny  # noqa: E402
from deployments.placement import FP8, GB, PlacementConfig  # noqa: E402

MODEL = placement.MODEL_CONFIGS / placement.TASK_MODELS["real"]
PROMPT = "transform the image to realistic photograph, high quality, 4k, natural skin texture"
TOKEN_IDS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
             "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
PHASES = ("encode_prompt", "encode_image", "denoise", "decode")


def say(*parts) -> None:
    print(*parts, flush=True)


def materialise(module: torch.nn.Module) -> torch.nn.Module:
    """Meta parameters → random bf16 CPU parameters, one at a time (no fp32 copy of the model)."""
    for _, sub in module.named_modules():
        for name, param in [(n, p) for n, p in sub._parameters.items() if p is not None and p.is_meta]:
            data = torch.empty(param.shape, dtype=torch.bfloat16 if param.is_floating_point() else param.dtype)
            if data.is_floating_point():  # biases 0, norm scales 1, matrices N(0, 0.02)
                data.zero_() if name == "bias" else data.fill_(1.0) if data.ndim == 1 else data.normal_(0.0, 0.02)
            sub._parameters[name] = torch.nn.Parameter(data, requires_grad=False)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{type(module).__name__} still has meta tensors: {left[:5]}")
    return module.to(torch.bfloat16).eval()


def build_real(tokenizer, processor):
    """The real-size QwenImageEditPlusPipeline from the stored configs, random bf16 weights on CPU."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline,
                           QwenImageTransformer2DModel)

    transformers.utils.logging.set_verbosity_error()  # rope_parameters warnings of the older config layout
    te_config = transformers.AutoConfig.from_pretrained(MODEL / "text_encoder", local_files_only=True)
    for key, token in TOKEN_IDS.items():
        setattr(te_config, key, tokenizer.convert_tokens_to_ids(token))
    with init_empty_weights(include_buffers=False):
        parts = {
            "transformer": QwenImageTransformer2DModel.from_config(
                QwenImageTransformer2DModel.load_config(MODEL / "transformer")),
            "vae": AutoencoderKLQwenImage.from_config(AutoencoderKLQwenImage.load_config(MODEL / "vae")),
            "text_encoder": transformers.Qwen2_5_VLForConditionalGeneration._from_config(te_config),
        }
    for name, module in parts.items():
        start = time.perf_counter()
        materialise(module)
        say(f"  {name}: {sum(p.numel() for p in module.parameters()):,} params, {time.perf_counter() - start:.0f} s")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        FlowMatchEulerDiscreteScheduler.load_config(MODEL / "scheduler"))
    return QwenImageEditPlusPipeline(scheduler=scheduler, tokenizer=tokenizer, processor=processor, **parts)


def predicted_gb(plan, config, sizes) -> dict[str, list[float]]:
    """Per phase, each used GPU's predicted peak: resident weights + that phase's transient where it
    runs, with the extras the planner's layout (`placement.search`) adds (streamed leaf / fp8 upcast copy / streamed block)."""
    n = plan.gpus_used
    resident = [0.0] * n
    for part in plan.components.values():
        for gpu, weights in zip(part.gpus, part.weights_gb):
            resident[gpu] += weights
    act = placement.phase_transients(plan.task, config, sizes, plan.vae_tiling)
    t, te, tp, tep = sizes["transformer"], sizes["text_encoder"], plan.transformer, plan.text_encoder
    te_extra = te.largest_layer_bytes if (tep.offload == "group" or tep.dtype == FP8) else 0
    t_extra = (t.largest_layer_bytes if tp.dtype == FP8 else 0) + (t.block_bytes(tp.dtype) if tp.streamed_blocks else 0)
    where = {"encode_prompt": (tep.gpus, te_extra), "encode_image": (plan.vae.gpus, 0),
             "denoise": (tp.gpus, t_extra), "decode": (plan.vae.gpus, 0)}
    out = {"resident": [round(r, 3) for r in resident]}
    for phase, (gpus, extra) in where.items():
        out[phase] = [round(resident[g] + ((act[phase] + extra) / GB if g in gpus else 0.0), 3) for g in range(n)]
    return out


class Phases:
    """Splits a run at phase boundaries: time and (on CUDA) the allocator's peak of every device."""

    def __init__(self, devices: list[torch.device], cuda: bool):
        self.devices, self.cuda = devices, cuda
        self.peaks: dict[str, list[float]] = {}
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.current, self.since = "between", time.perf_counter()
        for device in devices if cuda else ():
            torch.cuda.reset_peak_memory_stats(device)  # placement's own peak is not part of the run

    def now(self) -> float:
        for device in self.devices if self.cuda else ():
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def switch(self, phase: str) -> None:
        now = self.now()
        self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.since
        if self.cuda:
            peaks = self.peaks.setdefault(self.current, [0.0] * len(self.devices))
            for i, device in enumerate(self.devices):
                peaks[i] = max(peaks[i], torch.cuda.max_memory_allocated(device) / GB)
                torch.cuda.reset_peak_memory_stats(device)
        self.current, self.since = phase, now
        self.calls[phase] = self.calls.get(phase, 0) + 1

    def hook(self, pipe) -> None:
        for module, phase in ((pipe.text_encoder, "encode_prompt"), (pipe.transformer, "denoise")):
            module.register_forward_pre_hook(lambda *_, phase=phase: self.switch(phase))
            module.register_forward_hook(lambda *_: self.switch("between"))
        # vae.encode/decode are methods, not forward; decode lasts until the pipeline returns
        # (denormalising included), encode ends with the method
        for method, phase, after in (("encode", "encode_image", "between"), ("decode", "decode", None)):
            def wrapped(*a, _fn=getattr(pipe.vae, method), _phase=phase, _after=after, **k):
                self.switch(_phase)
                out = _fn(*a, **k)
                if _after:
                    self.switch(_after)
                return out
            setattr(pipe.vae, method, wrapped)


def padded(pipe, prompt: str, image: Image.Image, target: int) -> tuple[str, int]:
    """`prompt` extended so the text encoder sees `target` tokens (byte-level tokenizer: 1 char = 1 token)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit

    w, h = edit.calculate_dimensions(edit.CONDITION_IMAGE_SIZE, image.width / image.height)
    condition = pipe.image_processor.resize(image, h, w)

    def count(text: str) -> int:
        full = pipe.prompt_template_encode.format("Picture 1: <|vision_start|><|image_pad|><|vision_end|>" + text)
        return int(pipe.processor(text=[full], images=[condition], return_tensors="pt")["input_ids"].shape[1])

    text = prompt + "x" * max(0, target - count(prompt))
    return text, count(text)


def run(pipe, tracker: Phases, size: int, steps: int, cfg: float, text_tokens: int) -> dict:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    prompt, n_prompt = padded(pipe, PROMPT, image, text_tokens)
    negative, n_negative = padded(pipe, " ", image, text_tokens)
    say(f"text encoder tokens: prompt {n_prompt}, negative {n_negative}")
    marks: list[float] = []
    first: list[float] = []

    def on_step(_pipe, index, _t, tensors):
        marks.append(tracker.now())
        say(f"  step {index + 1}/{steps}: {marks[-1] - (marks[-2] if len(marks) > 1 else first[0]):.2f} s")
        return tensors

    pre = pipe.transformer.register_forward_pre_hook(lambda *_: None if first else first.append(tracker.now()))
    tracker.switch("between")
    start = time.perf_counter()
    with torch.inference_mode():
        out = pipe(image=[image], prompt=prompt, negative_prompt=negative, true_cfg_scale=cfg,
                   num_inference_steps=steps, height=size, width=size, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=on_step)
    tracker.switch("done")
    pre.remove()
    step_s = [b - a for a, b in zip(first + marks, marks)]
    return {"output_shape": list(np.asarray(out.images).shape), "text_tokens": [n_prompt, n_negative],
            "step_s": [round(s, 3) for s in step_s], "total_s": round(time.perf_counter() - start, 2),
            "step_s_median_after_first": round(statistics.median(step_s[1:] or step_s), 3)}


def header(cuda: bool) -> dict:
    """bench.common's report header; memory_gb in GB of 1e9 bytes like every figure here (the
    header's is in GiB), and on CUDA the GPUs and the NVIDIA driver under machine."""
    import accelerate
    import diffusers
    import transformers
    from torch.utils import collect_env

    out = report_header("placement_gpu", torch=torch.__version__, cuda=torch.version.cuda,
                        cudnn=torch.backends.cudnn.version() if cuda else None, diffusers=diffusers.__version__,
                        transformers=transformers.__version__, accelerate=accelerate.__version__)
    out["machine"]["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1)
    if cuda:
        out["machine"]["gpus"] = [{"name": torch.cuda.get_device_name(i),
                                   "total_memory_gb": round(torch.cuda.get_device_properties(i).total_memory / GB, 2)}
                                  for i in range(torch.cuda.device_count())]
        out["machine"]["driver"] = collect_env.get_nvidia_driver_version(collect_env.run)
    return out


def load(args, plan, memory: float) -> tuple:
    """(pipeline placed by `plan`, image size, devices); on CUDA each used card capped to `memory` GB."""
    if args.tiny:
        tiny.set_condition_areas(64 * 64, 64 * 64)  # tiny weights only: small condition images
        pipe, size, devices = tiny.build_tiny_edit_pipeline(), 64, [torch.device("cpu")] * plan.gpus_used
    else:
        if torch.cuda.device_count() < plan.gpus_used:
            raise SystemExit(f"the plan uses {plan.gpus_used} GPUs, this machine has {torch.cuda.device_count()}")
        devices = [torch.device(f"cuda:{i}") for i in range(plan.gpus_used)]
        for device in devices:
            total = torch.cuda.get_device_properties(device).total_memory
            if total < memory * GB:
                raise SystemExit(f"{device} has {total / GB:.1f} GB, less than the {memory:g} GB to emulate")
            torch.cuda.set_per_process_memory_fraction(memory * GB / total, device)
        say("building the real-size pipeline with random bf16 weights on CPU ...")
        small = tiny.build_tiny_edit_pipeline()
        pipe, size = build_real(small.tokenizer, small.processor), args.resolution
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    placement.place_pipeline(pipe, plan, [str(d) for d in devices])
    say(f"placed in {time.perf_counter() - start:.0f} s")
    return pipe, size, devices


def checks(plan, measured: dict, devices: list, error: str | None) -> dict:
    rows, passed = [], {}
    for g, (peak, phase) in enumerate(zip(plan.peak_gb, plan.peak_phase)):
        got = max((values[g] for values in measured.values()), default=0.0)
        rows.append({"gpu": g, "predicted_peak_gb": peak, "predicted_phase": phase, "measured_peak_gb": got,
                     "measured_phase": max(measured, key=lambda p: measured[p][g]) if measured else None,
                     "ratio": round(got / peak, 4), "within_10pct": abs(got / peak - 1) <= 0.10 and not error,
                     "under_usable_gb": got <= plan.usable_gb and not error,
                     "reserved_peak_gb": round(torch.cuda.max_memory_reserved(devices[g]) / GB, 3)})
        passed[f"gpu{g}_within_10pct"] = rows[-1]["within_10pct"]
        passed[f"gpu{g}_peak<={plan.usable_gb:g}GB"] = rows[-1]["under_usable_gb"]
    say(f"per GPU: {rows}\nchecks: {passed}")
    return {"per_gpu": rows, "goal": {"within_pct": 10, "peak_gb<=": plan.usable_gb}, "checks": passed,
            "pass": all(passed.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="1x24", help="COUNTxGB the plan is made for (default 1x24)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--cfg", type=float, default=4.0, help="true_cfg_scale (> 1; a negative prompt is given)")
    parser.add_argument("--text-tokens", type=int, default=placement.TEXT_TOKENS)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, help="default on CUDA: bench/results/placement_gpu.json")
    args = parser.parse_args()
    try:
        count, memory = placement.parse_gpus(args.gpus)
        config = PlacementConfig(gpus=count, gpu_memory_gb=memory, resolution=args.resolution)
    except ValueError as exc:
        parser.error(str(exc))
    if args.steps < 1 or args.cfg <= 1:
        parser.error("--steps must be >= 1 and --cfg > 1")
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        say("CUDA is not available on this machine: the placement GPU check needs a GPU "
            "(--tiny exercises the wiring on CPU). Nothing written.")
        return 0
    sizes = placement.component_sizes(placement.TASK_MODELS["real"])
    try:
        plan = placement.plan("real", config, sizes)
    except placement.DoesNotFit as exc:
        raise SystemExit(f"no plan: {exc.reason}") from None
    predicted = predicted_gb(plan, config, sizes)
    consistent = all(abs(max(predicted[p][g] for p in PHASES) - peak) < 0.01 for g, peak in enumerate(plan.peak_gb))
    say(f"{plan.describe()}\npredicted GB per phase and GPU: {predicted} (matches the plan: {consistent})")
    started = time.perf_counter()
    pipe, size, devices = load(args, plan, memory)
    load_s = time.perf_counter() - started
    resident = [round(torch.cuda.memory_allocated(d) / GB, 3) for d in devices] if cuda else None
    place_peak = [round(torch.cuda.max_memory_allocated(d) / GB, 3) for d in devices] if cuda else None
    tracker = Phases(devices, cuda)
    tracker.hook(pipe)
    error, result = None, {}
    try:
        result = run(pipe, tracker, size, args.steps, args.cfg, args.text_tokens)
    except torch.cuda.OutOfMemoryError as exc:
        error = f"out of memory in phase {tracker.current}: {str(exc)[:400]}"
        tracker.switch("done")
        say(error)
    measured = {p: [round(v, 3) for v in tracker.peaks[p]] for p in (*PHASES, "between") if p in tracker.peaks}
    report = {**header(cuda), "mode": "cuda" if cuda else "tiny (CPU, no memory numbers)",
              "plan": plan.to_dict(), "predicted_gb": predicted, "prediction_matches_plan": consistent,
              "measured_gb": measured or None, "measured_resident_gb": resident, "placement_peak_gb": place_peak,
              "phase_ratio": {p: [round(m / predicted[p][g], 4) for g, m in enumerate(v)]
                              for p, v in measured.items() if p in predicted} or None,
              "phase_calls": tracker.calls, "phase_s": {k: round(v, 2) for k, v in tracker.seconds.items()},
              "load_s": round(load_s, 1), **result, "error": error,
              **(checks(plan, measured, devices, error) if cuda else {})}
    report["notes"] = [
        "Random weights (bf16 N(0,0.02), norm scales 1, biases 0): memory does not depend on the values.",
        "reserved_peak_gb is the caching allocator's reservation (what the cap limits); the CUDA context "
        "(~0.5 GB) is in neither figure: the planner's margin is for it."]
    out = args.out or (None if args.tiny else ROOT / "bench" / "results" / "placement_gpu.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        say(f"wrote {out}")
    say(f"phases: calls {tracker.calls}, seconds {report['phase_s']}; run {result.get('total_s')} s")
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
