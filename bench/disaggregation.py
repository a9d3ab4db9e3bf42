"""The text encoder as its own stage against whole-pipeline replicas, at equal card counts.

Part 1, topologies (the local multi-node cluster of `cluster/local.sh`: a head and 2 workers x 3
fake GPUs on loopback; no GPU is involved anywhere). The models are stand-ins that hold each
request for a fixed time (`time.sleep`) in the published proportions of Qwen-Image-Edit on an
RTX 4090: the transformer ~20 s per request, the text encoder ~10 % of that, the VAE decode ~5 %.
Every time is scaled by one factor, `--transformer` / 20 s (default 1 s: factor 0.05). The rest is
the real graph of configs/rtx4090-cluster.yaml (ingress, preprocess, routing, postprocess; only
the `real` task; replicas get fake GPUs through `serve.ray_actor_options.num_gpus`, no `placement`).
  a  disaggregated: `text_encoder.mode: stage`, 1 TextEncoder replica on 1 card (sleeps T_enc) and
     N transformer replicas on 1 card each (sleep T_transformer + T_decode);
  b  two-card whole pipeline: `mode: inline`, N/2 replicas of 2 cards each, sleeping
     T_enc + T_transformer + T_decode (the encoder's card idles while the transformer works);
  c  one-card whole pipeline: `mode: inline`, N replicas of 1 card, sleeping T_transfer + T_enc +
     T_transformer + T_decode, T_transfer = streaming the 16.6 GB bf16 encoder over PCIe at
     ~25 GB/s (0.664 s at real scale), scaled by the same factor.
Headline at 4 cards (a: 1 encoder + 3 transformers, b: 2 x 2 cards, c: 4 x 1 card), and a with
1 encoder + 4 transformers (5 cards) against the same b and c. Each topology gets a saturating
closed load over HTTP (`POST /v1/real`, 4 clients per model replica, a fixed number of requests per
model replica, after a one-round warm-up) and reports throughput (steady: completions while every
client had a request in flight; overall: all requests over the whole run), p50/p99 latency, and
each model replica's busy fraction: the replica's own `time.perf_counter()` around `generate`,
summed over the common window in which every model replica had started and none had run out of
work (window edges from the replicas' own wall-clock stamps), divided by that window.
Goals: (a, 4 cards) >= 1.5x the throughput of b; each transformer replica of a busy >= 95 %.
The model replicas take the config's `real.serve.max_ongoing_requests` (2: the next request
already waits on the replica's model thread when the card frees up). Then variants, to see where a
transformer's idle time goes (not the shipped config): a4 with the Ingress replica's
`RAY_SERVE_ROUTER_RETRY_MAX_BACKOFF_S` at 0.05 (`a4-fastretry`: Ray Serve's router waits up to
0.5 s before it retries a request that found every replica full, and a freed replica idles
meanwhile); a4 and b4 with `max_ongoing_requests: 1` (`-depth1`: the card waits for the next
request's hop); a4 and b4 with requests for a LoRA version (`-lora`: tiny versions, routed by
version; in stage mode the orchestrator also sends each request's `prefetch` to the model
deployment while the prompt is encoded), and a4 with both (`a4-lora-depth1`).

Part 2, the demo profile (configs/demo.yaml args, `mode: stage`, the real tiny models on this CPU,
classes constructed directly, no Ray): per-stage times (encode_prompt [and caption] at the
TextEncoder, encode_image/denoise/decode at the model, from the models' own stage metrics) and the
bytes of the embeddings crossing the hop (`Conditioning.nbytes`) for `real` with and without CFG
and `layers` with a prompt and captioned.

Run: .venv/bin/python bench/disaggregation.py   (about 9 minutes on 2 cores; writes
bench/results/disaggregation.json + .png; matplotlib from `pip install -e ".[bench]"`)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402
from ray import serve  # noqa: E402

from bench.common import Caller, open_loop, report_header, save_figure, upload  # noqa: E402
from bench.scaling import summary  # noqa: E402
from deployments import real  # noqa: E402
from deployments.real import RealModel  # noqa: E402
from deployments.records import Conditioning, Generated  # noqa: E402
from deployments.task import Tasks  # noqa: E402
from deployments.text_encoder import TextEncoder  # noqa: E402
from serve_app.app import build_graph  # noqa: E402
from tests.cluster.local import cluster_env, cluster_ip, local_cluster  # noqa: E402

# 2 workers x 3 fake GPUs: 5 cards for a with 4 transformers, and the two 2-card replicas of b one
# per node; no dashboard (nothing here uses Ray's state API): fewer processes on a 2-core machine
ENV = {**cluster_env(6394, dashboard_port=8269, worker_gpus=3), "IMGSERVE_DASHBOARD": "0"}
HTTP_PORT = 8126
APP = "imgserve"
FAST_RETRY = {"RAY_SERVE_ROUTER_RETRY_MAX_BACKOFF_S": "0.05"}
"""Ray Serve 2.60's router retries a request that found every replica at max_ongoing_requests
after 25 ms, 50 ms, 100 ms ... up to 0.5 s (RAY_SERVE_ROUTER_RETRY_*), and a replica that frees up
does not wake it: the `fastretry` variant caps the wait at 50 ms in the Ingress replica, which
holds the routers of every hop."""
VARIANTS = {
    "fastretry": ("router retry <= 50 ms", {"ingress_env": FAST_RETRY}),
    "depth1": ("model max_ongoing_requests 1", {"model_ongoing": 1}),
    "lora": ("requests with a LoRA version (routed by it)", {"lora": True}),
    "lora-depth1": ("a LoRA version, model max_ongoing_requests 1", {"lora": True, "model_ongoing": 1}),
}
"""Not the shipped config, to see where a transformer replica's idle time goes: `fastretry` (the
router retries sooner) and `depth1` (each model replica takes one request at a time: the card
idles while the next one crosses the hops)."""

# -- real-scale times (published proportions) and their scaling -----------------------------------------
REAL_TRANSFORMER_S = 20.0
"""Qwen-Image-Edit's transformer per request on an RTX 4090, real scale (the reference everything is scaled from)."""
ENCODER_SHARE = 0.10
"""Text encoder (Qwen2.5-VL 7B, with the condition image) ≈ 10 % of the transformer's time."""
DECODE_SHARE = 0.05
"""VAE decode ≈ 5 % of the transformer's time."""
ENCODER_GB = 16.6
"""The bf16 text encoder's weights."""
PCIE_GB_S = 25.0
"""Effective host → card bandwidth (PCIe 4.0 x16)."""


def stage_times(transformer_s: float) -> dict[str, Any]:
    """The stand-ins' times: the real-scale ones times `transformer_s` / REAL_TRANSFORMER_S."""
    scale = transformer_s / REAL_TRANSFORMER_S
    real_scale = {"transformer": REAL_TRANSFORMER_S, "encoder": ENCODER_SHARE * REAL_TRANSFORMER_S,
                  "decode": DECODE_SHARE * REAL_TRANSFORMER_S, "transfer": ENCODER_GB / PCIE_GB_S}
    return {"scale": scale, "real_scale_s": {k: round(v, 4) for k, v in real_scale.items()},
            "bench_s": {k: round(v * scale, 5) for k, v in real_scale.items()},
            "how": f"real-scale transformer {REAL_TRANSFORMER_S:g} s -> {transformer_s:g} s: every time x {scale:g}; "
                   f"encoder {ENCODER_SHARE:.0%} and decode {DECODE_SHARE:.0%} of the transformer; transfer = "
                   f"{ENCODER_GB} GB / {PCIE_GB_S:g} GB/s = {ENCODER_GB / PCIE_GB_S:.3f} s real scale"}


# -- stand-ins -------------------------------------------------------------------------------------------
class Clocked:
    """What a replica reports about its own time inside the model: (wall-clock start, perf_counter
    duration) of every call, read (and cleared) through `clock` on the deployment's handle."""

    def clocked(self, work: Any, *args: Any) -> Any:
        wall, start = time.time(), time.perf_counter()
        try:
            return work(*args)
        finally:
            self.__dict__.setdefault("intervals", []).append((wall, time.perf_counter() - start))

    async def clock(self, reset: bool = False) -> dict[str, Any]:
        intervals = list(self.__dict__.get("intervals", []))
        if reset:
            self.__dict__["intervals"] = []
        return {"replica": self.replica, "intervals": intervals}


class NoAdapters:
    """What RealModel.__call__ asks of its adapters, with none loaded."""

    versions: dict[str, None] = {}
    keep: str | None = None

    def version_loads(self) -> int:
        return 0

    def stats(self) -> dict[str, Any]:
        return {}


class SleepingRealModel(Clocked, RealModel):
    """The `real` model holding each request `sleep_s` (validation and parameter resolution are the
    real model's; it returns the input array): what the serving system sees of a GPU replica.
    LoRA versions (with `lora_dir`) are checked and routed by, never loaded."""

    sleep_s: ClassVar[float] = 0.0

    def load_model(self) -> None:
        self.store = self.config.lora_store(self.cache_dir)
        self.plan = self.config.plan()
        self.adapters = NoAdapters()
        self.fix_default()

    def ensure_adapter(self, version: str) -> str:
        self.check_health()
        return version

    def loaded(self) -> bool:
        return True

    def generate(self, prepared: Any, params: Any, progress: Any = None, conditioning: Any = None) -> Generated:
        return self.clocked(self._sleep, prepared, params, conditioning)

    def _sleep(self, prepared: Any, params: Any, conditioning: Any) -> Generated:
        params = self.config.resolve(params, self.catalog())
        self.needs_conditioning(conditioning)
        time.sleep(self.sleep_s)
        return Generated(array=prepared.array, info=prepared.info, params={"task": self.task, **params.model_dump()},
                         served={"replica": self.replica, **(conditioning.served if conditioning else {})})


class SleepingTextEncoder(Clocked, TextEncoder):
    """The TextEncoder stage holding each request `sleep_s`; loads nothing, returns a small
    `Conditioning` (8 tokens x 16 values)."""

    sleep_s: ClassVar[float] = 0.0

    def load_model(self) -> None:
        pass

    def loaded(self) -> bool:
        return True

    def encode_now(self, task: str, prepared: Any, params: Any) -> Conditioning:
        return self.clocked(self._sleep, params)

    def _sleep(self, params: Any) -> Conditioning:
        time.sleep(self.sleep_s)
        return Conditioning(embeds=np.zeros((1, 8, 16), np.float32), mask=np.ones((1, 8), np.int64),
                            negative_embeds=None, negative_mask=None, dtype="bfloat16", prompt=params.prompt,
                            seconds={"encode_prompt": self.sleep_s}, served={"encoder": self.replica})


def sleeping(cls: type, seconds: float) -> type:
    """`cls` with its `sleep_s`: a class of its own per topology (pickled by value to the replicas)."""
    return type(cls.__name__, (cls,), {"sleep_s": seconds, "__module__": cls.__module__})


# -- topologies ------------------------------------------------------------------------------------------
def topologies(times: dict[str, float]) -> list[dict[str, Any]]:
    """The four runs, in the order they run: a on 4 cards, b, c, then a on 5 cards."""
    enc, tr, dec, transfer = times["encoder"], times["transformer"], times["decode"], times["transfer"]
    return [
        {"name": "a4", "label": "a: disaggregated, 1 encoder + 3 transformers", "mode": "stage", "replicas": 3,
         "gpus_per_replica": 1, "encoder_gpus": 1, "model_s": tr + dec, "encoder_s": enc},
        {"name": "b4", "label": "b: whole pipeline, 2 replicas x 2 cards", "mode": "inline", "replicas": 2,
         "gpus_per_replica": 2, "encoder_gpus": 0, "model_s": enc + tr + dec},
        {"name": "c4", "label": "c: whole pipeline + encoder transfer, 4 replicas x 1 card", "mode": "inline",
         "replicas": 4, "gpus_per_replica": 1, "encoder_gpus": 0, "model_s": transfer + enc + tr + dec},
        {"name": "a5", "label": "a: disaggregated, 1 encoder + 4 transformers (5 cards)", "mode": "stage",
         "replicas": 4, "gpus_per_replica": 1, "encoder_gpus": 1, "model_s": tr + dec, "encoder_s": enc},
    ]


def variants(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """a on 4 cards with each variant, b on 4 cards with `depth1` and `lora` (not the shipped config)."""
    base = {run["name"]: run for run in runs}
    return [{**base[name], "name": f"{name}-{variant}", "label": f"{base[name]['label']}, {VARIANTS[variant][0]}",
             "variant": variant, **VARIANTS[variant][1]}
            for name, variant in (("a4", "fastretry"), ("a4", "depth1"), ("b4", "depth1"), ("a4", "lora"),
                                  ("b4", "lora"), ("a4", "lora-depth1"))]


def bench_args(topology: dict[str, Any], cache_dir: Path) -> dict[str, Any]:
    """configs/rtx4090-cluster.yaml's args for the `real` task alone, with fixed replica counts and
    fake GPUs through `num_gpus` (no `placement`), CPU shares scaled to this machine."""
    args = yaml.safe_load((REPO / "configs" / "rtx4090-cluster.yaml").read_text())["applications"][0]["args"]
    for name in ("anime", "layers"):
        args.pop(name, None)
    args["cache_dir"] = str(cache_dir)
    args["jobs"]["directory"] = str(cache_dir / "jobs")
    args["jobs"]["serve"]["ray_actor_options"]["num_cpus"] = 0.05
    for name in ("ingress", "preprocess", "postprocess"):
        options = args[name]["serve"]
        options["ray_actor_options"]["num_cpus"] = 0.1
        count = 1 if name == "ingress" else 2  # enough CPU replicas never to limit 4 GPU replicas
        options["autoscaling_config"].update(min_replicas=count, max_replicas=count)
    section = args["real"]
    section.update(source="tiny", lora_dir="tiny" if topology.get("lora") else None)
    section.pop("placement", None)
    for adapter in section["speed_adapters"].values():
        adapter["file"] = "tiny"
    section["serve"].update(num_replicas=topology["replicas"], autoscaling_config=None, max_queued_requests=64,
                            max_ongoing_requests=topology.get("model_ongoing", section["serve"]["max_ongoing_requests"]))
    section["serve"]["ray_actor_options"] = {"num_cpus": 0.1, "num_gpus": topology["gpus_per_replica"]}
    if topology.get("ingress_env"):
        args["ingress"]["serve"]["ray_actor_options"]["runtime_env"] = {"env_vars": topology["ingress_env"]}
    args["text_encoder"] = {"mode": topology["mode"]}
    if topology["mode"] == "stage":
        args["text_encoder"]["serve"] = {
            "num_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 64,
            "ray_actor_options": {"num_cpus": 0.1, "num_gpus": topology["encoder_gpus"]}}
    return args


def clocks(deployment: str, expected: int, reset: bool) -> list[dict[str, Any]]:
    """Every replica's `clock` (idle replicas: calls spread over them until each has answered)."""
    handle = serve.get_deployment_handle(deployment, APP)
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(40):
        for response in [handle.clock.remote(reset) for _ in range(2 * expected)]:
            answer = response.result(timeout_s=60)
            seen.setdefault(answer["replica"], answer)
        if len(seen) >= expected:
            return list(seen.values())
    raise RuntimeError(f"only {len(seen)} of {expected} {deployment} replicas answered")


def busy(models: list[dict[str, Any]], encoder: dict[str, Any] | None) -> dict[str, Any]:
    """Busy fractions over the window in which every model replica had work: from the latest first
    start to the earliest last end among the model replicas (replica wall-clock stamps; busy time
    from each replica's perf_counter durations)."""
    spans = {m["replica"]: sorted((start, start + length) for start, length in m["intervals"]) for m in models}
    begin = max(s[0][0] for s in spans.values())
    end = min(s[-1][1] for s in spans.values())
    window = end - begin

    def inside(intervals: list[tuple[float, float]]) -> float:
        return sum(max(0.0, min(b, end) - max(a, begin)) for a, b in intervals)

    rows = []
    for replica, intervals in spans.items():
        within = [(a, b) for a, b in intervals if b > begin and a < end]
        gaps = [later[0] - earlier[1] for earlier, later in itertools.pairwise(within)]
        rows.append({"replica": replica, "requests": len(intervals), "requests_in_window": len(within),
                     "busy_fraction": round(inside(intervals) / window, 4),
                     "mean_generate_s": round(statistics.fmean(b - a for a, b in intervals), 4),
                     "idle_gap_ms": {"median": round(statistics.median(gaps) * 1000, 1) if gaps else None,
                                     "max": round(max(gaps) * 1000, 1) if gaps else None}})
    result: dict[str, Any] = {"window_s": round(window, 2), "replicas": sorted(rows, key=lambda r: r["replica"])}
    if encoder is not None:
        intervals = [(start, start + length) for start, length in encoder["intervals"]]
        result["encoder"] = {"replica": encoder["replica"], "requests": len(intervals),
                             "busy_fraction": round(inside(intervals) / window, 4)}
    return result


def measure(topology: dict[str, Any], body: bytes, per_replica: int, clients_per_replica: int) -> dict[str, Any]:
    """Warm-up round, clocks reset, then `per_replica` x replicas requests from `clients_per_replica`
    x replicas clients (a closed loop of fixed length: a pool of that many threads takes the
    requests one after another)."""
    n = topology["replicas"]
    clients, count = clients_per_replica * n, per_replica * n
    caller = Caller(f"http://127.0.0.1:{HTTP_PORT}", body, timeout_s=300)
    open_loop(caller.one, [0.0] * clients, max_workers=clients)  # warm-up: connections, first calls
    warm_errors = sum(o["status"] != 200 for o in caller.outcomes)
    staged = topology["mode"] == "stage"
    clocks("RealModel", n, reset=True)
    if staged:
        clocks("TextEncoder", 1, reset=True)
    caller.outcomes, done = [], []

    def call(offset: float) -> None:
        caller.one(offset)
        done.append(time.monotonic())

    begin = time.monotonic()
    open_loop(call, [0.0] * count, max_workers=clients)
    elapsed = time.monotonic() - begin
    ok = [o for o in caller.outcomes if o["status"] == 200]
    # completion k frees a client that sends request clients + k: until completion count - clients
    # every client has a request in flight; from completion n on the first round is through
    done.sort()
    first, last = n, count - clients
    steady = (last - first) / (done[last - 1] - done[first - 1]) if last > first else None
    models = clocks("RealModel", n, reset=False)
    encoder = clocks("TextEncoder", 1, reset=False)[0] if staged else None
    return {"clients": clients, "requests": count, "completed": len(ok), "errors": len(caller.outcomes) - len(ok),
            "warmup_errors": warm_errors,
            "statuses": sorted({str(o["status"]) for o in caller.outcomes}),
            "throughput_rps": round(steady, 3) if steady else None,
            "overall_rps": round(len(ok) / elapsed, 3), "elapsed_s": round(elapsed, 2),
            "latency_ms": summary([o["latency_s"] for o in ok]), "busy": busy(models, encoder)}


def ideal(topology: dict[str, Any]) -> float:
    """Requests per second if every model replica were busy all the time (and the encoder never limited)."""
    rate = topology["replicas"] / topology["model_s"]
    if topology.get("encoder_s"):
        rate = min(rate, 1.0 / topology["encoder_s"])
    return rate


def run_topologies(options: argparse.Namespace, cache: Path, times: dict[str, float]) -> list[dict[str, Any]]:
    body = upload(options.edge)
    rows = []
    with local_cluster(ENV, HTTP_PORT):
        runs = topologies(times)
        for topology in runs + (variants(runs) if options.variants else []):
            if options.only and topology["name"] not in options.only.split(","):
                continue
            started = time.monotonic()
            row = {**topology, "cards": topology["replicas"] * topology["gpus_per_replica"] + topology["encoder_gpus"],
                   "ideal_rps": round(ideal(topology), 3)}
            try:
                models = {"real": sleeping(SleepingRealModel, topology["model_s"])}
                encoder = sleeping(SleepingTextEncoder, topology.get("encoder_s", 0.0))
                serve.run(build_graph(bench_args(topology, cache), tasks=Tasks(real.TASK), models=models,
                                      encoder=encoder), name=APP, route_prefix="/")
                row.update(measure(topology, body, options.per_replica, options.clients_per_replica))
                row["of_ideal"] = round(row["throughput_rps"] / row["ideal_rps"], 3) if row["throughput_rps"] else None
                fractions = [r["busy_fraction"] for r in row["busy"]["replicas"]]
                print(f"{row['name']} ({row['cards']} cards): {row['throughput_rps']} req/s steady "
                      f"({row['overall_rps']} overall, ideal {row['ideal_rps']}), p50 {row['latency_ms'].get('p50')} ms, "
                      f"p99 {row['latency_ms'].get('p99')} ms, busy {fractions}, errors {row['errors']}", flush=True)
            except Exception as exc:  # noqa: BLE001 - a topology that fails is reported, the others still run
                row["error"] = f"{type(exc).__name__}: {exc}"
                print(f"{row['name']}: {row['error']}", flush=True)
            finally:
                with contextlib.suppress(Exception):  # nothing deployed
                    serve.delete(APP)
            row["wall_s"] = round(time.monotonic() - started, 1)
            rows.append(row)
    return rows


# -- the demo profile ------------------------------------------------------------------------------------
def demo_profile(cache: Path, repeats: int, edge: int) -> dict[str, Any]:
    """Per-stage times and embedding bytes on the demo's tiny models (CPU, no Ray)."""
    from deployments import metrics
    from deployments.layers import TASK as LAYERS
    from deployments.layers import LayersModel, LayersParams
    from deployments.preprocess import Preprocess
    from deployments.real_config import RealParams
    from serve_app.config import load_config

    args = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["applications"][0]["args"]
    args["cache_dir"] = str(cache)
    config = load_config(args)
    assert config.text_encoder.mode == "stage", "configs/demo.yaml no longer runs the TextEncoder stage"
    encoder = TextEncoder(config.text_encoder, {"real": (RealModel, config.section("real")),
                                                "layers": (LayersModel, config.section("layers"))}, config.cache_dir)
    started = time.perf_counter()
    encoder.load()
    models = {"real": RealModel(config.section("real"), config.cache_dir),
              "layers": LayersModel(config.section("layers"), config.cache_dir)}
    for model in models.values():
        model.load()
    load_s = time.perf_counter() - started
    preprocess = Preprocess(config.preprocess)
    photo = upload(edge)
    cases = [
        ("real, CFG (demo default: preset full, cfg 7)", "real", real.TASK, RealParams(seed=1)),
        ("real, no CFG (cfg 1)", "real", real.TASK, RealParams(seed=1, cfg=1.0)),
        ("layers, prompt (cfg 4)", "layers", LAYERS, LayersParams(seed=1, prompt="a cat on a sofa by a window")),
        ("layers, captioned (no prompt, cfg 4)", "layers", LAYERS, LayersParams(seed=1)),
    ]
    results = []
    for label, task, spec, fields in cases:
        model = models[task]
        catalog = (model.catalog(),) if task == "real" else ()
        params = config.section(task).resolve(fields, *catalog)
        prepared = preprocess.prepare(photo, spec.spec_for(params), task=task)
        runs = []
        for attempt in range(repeats + 1):  # the first is a warm-up
            with metrics.capture() as records:
                t0 = time.perf_counter()
                conditioning = encoder.encode_now(task, prepared, params)
                t1 = time.perf_counter()
                model.generate(prepared, params, None, conditioning)
                t2 = time.perf_counter()
            stages = {tags["stage"]: value for name, value, tags in records if name == "imgserve_stage_seconds"}
            if attempt:
                runs.append({**stages, "encode_now": t1 - t0, "generate": t2 - t1})
        median = {key: round(statistics.median(run.get(key, 0.0) for run in runs) * 1000, 2)
                  for key in ("caption", "encode_prompt", "encode_now", "encode_image", "denoise", "decode", "generate")}
        arrays = {"embeds": conditioning.embeds, "mask": conditioning.mask,
                  "negative_embeds": conditioning.negative_embeds, "negative_mask": conditioning.negative_mask}
        hidden = published_hidden(task)
        at_hidden = sum(v.nbytes * (hidden // v.shape[-1] if k.endswith("embeds") else 1)
                        for k, v in arrays.items() if v is not None)
        results.append({
            "case": label, "task": task, "steps": params.steps, "cfg": params.cfg,
            "prompt_source": conditioning.prompt_source, "median_ms": median,
            "encoder_share_of_model": round(median["encode_now"] / median["generate"], 3),
            "conditioning_nbytes": conditioning.nbytes,
            "nbytes_same_tokens_at_published_hidden": {"hidden": hidden, "nbytes": at_hidden},
            "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items() if v is not None},
        })
        print(f"demo {label}: encode {median['encode_now']} ms, generate {median['generate']} ms, "
              f"{conditioning.nbytes} B across the hop", flush=True)
    return {"config": "configs/demo.yaml args (text_encoder.mode: stage), cache_dir replaced; classes constructed "
                      "directly on this CPU, no Ray",
            "upload": f"sample photo scaled to {edge} px long edge, JPEG, through Preprocess",
            "repeats": repeats, "load_s": round(load_s, 2), "text_encoders_loaded": encoder.encoders,
            "nbytes": "conditioning_nbytes: Conditioning.nbytes (the tiny encoder's hidden size 16); "
                      "nbytes_same_tokens_at_published_hidden: the same token counts at the real Qwen2.5-VL hidden "
                      "size (float32 on the wire; the real condition image gives other token counts)",
            "times": "median over the repeats after one warm-up; caption/encode_prompt/encode_image/denoise/decode "
                     "from the models' own stage metrics (ray_imgserve_stage_seconds, captured in process), "
                     "encode_now/generate timed around TextEncoder.encode_now and the model's generate",
            "cases": results}


def published_hidden(task: str) -> int:
    """The real text encoder's hidden size (the published config the package stores)."""
    name = {"real": "qwen-image-edit-2511", "layers": "qwen-image-layered"}[task]
    config = json.loads((REPO / "deployments" / "model_configs" / name / "text_encoder" / "config.json").read_text())
    return int(config["hidden_size"])


# -- report ----------------------------------------------------------------------------------------------
def goals(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    a, b = rows["a4"], rows["b4"]
    ratio = a["throughput_rps"] / b["throughput_rps"] if a.get("throughput_rps") and b.get("throughput_rps") else None
    result: dict[str, Any] = {
        "throughput_a_over_b_4_cards": round(ratio, 3) if ratio else None, "throughput_limit": 1.5,
        "throughput_pass": bool(ratio and ratio >= 1.5), "busy_limit": 0.95,
    }
    for name in ("a4", "a5"):
        fractions = [r["busy_fraction"] for r in rows[name].get("busy", {}).get("replicas", [])]
        result[f"busy_{name}"] = fractions
        result[f"busy_{name}_pass"] = bool(fractions) and min(fractions) >= 0.95
    result["busy_pass"] = result["busy_a4_pass"]
    variant_rows = {name: row for name, row in rows.items() if row.get("variant") and row.get("throughput_rps")}
    if variant_rows:
        result["variants"] = {"note": "the goals above are judged on a4, b4 and a5 (the shipped config, no LoRA)"}
        for name, row in variant_rows.items():
            fractions = [r["busy_fraction"] for r in row["busy"]["replicas"]]
            result["variants"][name] = {"busy": fractions, "busy_pass": min(fractions) >= 0.95,
                                        "throughput_rps": row["throughput_rps"]}
        for suffix in ("depth1", "lora"):
            a, b = variant_rows.get(f"a4-{suffix}"), variant_rows.get(f"b4-{suffix}")
            if a and b:
                result["variants"][f"a4_{suffix}_over_b4_{suffix}"] = round(a["throughput_rps"] / b["throughput_rps"], 3)
    for other in ("b4", "c4"):
        mine, theirs = rows["a4"].get("throughput_rps"), rows[other].get("throughput_rps")
        result[f"a4_over_{other}"] = round(mine / theirs, 3) if mine and theirs else None
        mine = rows["a5"].get("throughput_rps")
        result[f"a5_over_{other}"] = round(mine / theirs, 3) if mine and theirs else None
    return result


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [row for row in rows if row.get("throughput_rps")]
    labels = [f"{row['name'].replace('-', chr(10))}\n{row['cards']} cards" for row in rows]
    colors = ["C0" if row["mode"] == "stage" else "C1" for row in rows]
    hatches = ["//" if row.get("variant") else "" for row in rows]
    x = np.arange(len(rows))
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(24, 5.5))
    left.bar(x, [row["throughput_rps"] for row in rows], color=colors, hatch=hatches)
    left.scatter(x, [row["ideal_rps"] for row in rows], marker="_", s=600, color="black", label="ideal (replicas / hold time)")
    for i, row in enumerate(rows):
        left.text(i, row["throughput_rps"] / 2, f"{row['throughput_rps']:.2f}", ha="center", color="white")
    left.set_xticks(x, labels)
    left.set_ylim(0, 1.2 * max(row["ideal_rps"] for row in rows))
    left.set_ylabel("requests / s (steady)")
    left.set_title("throughput (a: disaggregated, b: 2-card, c: 1-card + transfer;\n"
                   "hatched: variants, not the shipped config)", fontsize=10)
    left.legend(loc="upper left")
    width = 0.38
    middle.bar(x - width / 2, [row["latency_ms"]["p50"] / 1000 for row in rows], width, label="p50")
    middle.bar(x + width / 2, [row["latency_ms"]["p99"] / 1000 for row in rows], width, label="p99")
    middle.set_xticks(x, labels)
    middle.set_ylabel("seconds")
    middle.set_title("latency at saturation (4 clients per model replica)")
    middle.legend()
    for i, row in enumerate(rows):
        fractions = [r["busy_fraction"] for r in row["busy"]["replicas"]]
        right.scatter([i] * len(fractions), fractions, color="C0" if row["mode"] == "stage" else "C1")
        if "encoder" in row["busy"]:
            right.scatter([i], [row["busy"]["encoder"]["busy_fraction"]], marker="x", color="C3")
    right.axhline(0.95, color="red", linestyle=":", label="goal 95 % (transformer replicas of a)")
    right.scatter([], [], marker="x", color="C3", label="TextEncoder replica")
    right.set_xticks(x, labels)
    right.set_ylim(0, 1.05)
    right.set_ylabel("busy fraction (time in generate / window)")
    right.set_title("model replicas' busy fraction")
    right.legend(loc="lower left")
    for axes in (left, middle, right):
        axes.tick_params(axis="x", labelsize=8)
    save_figure(fig, path, dpi=100)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--transformer", type=float, default=1.0, help="transformer seconds per request (real: 20)")
    parser.add_argument("--per-replica", type=int, default=20, help="measured requests per model replica")
    parser.add_argument("--clients-per-replica", type=int, default=4, help="concurrent clients per model replica")
    parser.add_argument("--edge", type=int, default=256, help="long edge of the uploaded photo")
    parser.add_argument("--demo-repeats", type=int, default=3, help="demo-profile runs per case (after a warm-up)")
    parser.add_argument("--skip-demo", action="store_true", help="topologies only")
    parser.add_argument("--no-variants", dest="variants", action="store_false",
                        help="the goal runs only (a4, b4, c4, a5), no variants")
    parser.add_argument("--only", help="comma-separated run names (a4,b4,c4,a5,a4-fastretry,a4-depth1,b4-depth1,"
                                       "a4-lora,b4-lora,a4-lora-depth1)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "disaggregation.json"))
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON at --out, run nothing")
    options = parser.parse_args()
    if options.plot_only:
        out = Path(options.out)
        plot(json.loads(out.read_text())["topologies"], out.with_suffix(".png"))
        return
    started = time.monotonic()
    cache = Path(os.environ.get("TMPDIR", "/tmp")) / "imgserve-bench-disaggregation"
    cache.mkdir(parents=True, exist_ok=True)
    loadavg_before = [round(v, 2) for v in os.getloadavg()]
    times = stage_times(options.transformer)
    demo = None if options.skip_demo else demo_profile(cache, options.demo_repeats, 512)
    rows = run_topologies(options, cache, times["bench_s"])
    by_name = {row["name"]: row for row in rows}
    import torch

    header = report_header("disaggregation", ray=ray.__version__, httpx=httpx.__version__, torch=torch.__version__,
                           numpy=np.__version__)
    header["machine"]["loadavg_before"] = loadavg_before
    result = {
        **header,
        "settings": {
            "cluster": "cluster/local.sh: head (1 CPU, no GPU) + 2 workers (1 CPU, 3 fake GPUs each), no dashboard, loopback "
                       f"{cluster_ip(ENV)}; Serve proxy HeadOnly on 127.0.0.1:{HTTP_PORT}; no GPU is used",
            "config": "configs/rtx4090-cluster.yaml args, `real` task only (anime/layers removed), real.source tiny, "
                      "no placement: fake GPUs via serve.ray_actor_options.num_gpus (TextEncoder: "
                      "text_encoder.serve.ray_actor_options.num_gpus 1); real: max_ongoing_requests as configured (2), "
                      "max_queued_requests 64, fixed num_replicas; TextEncoder: 1 replica, max_ongoing_requests 1; "
                      "2 preprocess + 2 postprocess replicas; CPU shares scaled down",
            "models": "stand-ins: SleepingRealModel (sleeps the topology's hold time in generate, returns its input), "
                      "SleepingTextEncoder (sleeps T_enc in encode_now, returns an 8x16 float32 Conditioning)",
            "stage_times": times,
            "load": f"POST /v1/real (steps=2, seed=1, preset fast: no CFG), photo at {options.edge} px; per topology "
                    f"a warm-up round of {options.clients_per_replica} x replicas requests, then "
                    f"{options.per_replica} x replicas requests from {options.clients_per_replica} x replicas "
                    "concurrent clients (closed loop of fixed length)",
            "throughput": "throughput_rps: completions from the n-th (first round through) to the (requests - "
                          "clients)-th (the last request sent), every client in flight, per second; overall_rps: "
                          "all completions over the whole run (ramp-up and drain included)",
            "variants": "a4-fastretry (the Ingress replica's runtime_env env_vars "
                        f"{FAST_RETRY}: Ray Serve's router retries a request that found every replica full every "
                        "<= 50 ms instead of 25 ms doubling up to 0.5 s; not the shipped config); a4-depth1, "
                        "b4-depth1 (real.serve.max_ongoing_requests 1: one request at a time per replica, as "
                        "shipped before this run; not the shipped config); a4-lora, b4-lora (real.lora_dir tiny: every request names "
                        "the newest version, Serve routes by it, and in stage mode the orchestrator sends a prefetch "
                        "of it to the model deployment during the encode; the stand-in loads no adapter); "
                        "a4-lora-depth1 (both)" if options.variants else None,
            "busy": "per model replica: sum of its own perf_counter time inside generate within the window / the "
                    "window; window = latest first generate start .. earliest last generate end over the model "
                    "replicas (their own time.time() stamps; one machine, one clock); idle_gap_ms: between "
                    "consecutive generates of one replica inside the window",
        },
        "topologies": rows,
        "goal": goals(by_name) if {"a4", "b4", "a5"} <= by_name.keys() and "c4" in by_name else None,
        "demo_profile": demo,
        "wall_s": round(time.monotonic() - started, 1),
    }
    result["machine"]["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plotted = plot(rows, out.with_suffix(".png"))
    print(json.dumps(result["goal"]), "plot:" if plotted else "(no matplotlib: no plot)",
          out.with_suffix(".png") if plotted else "")


if __name__ == "__main__":
    main()
