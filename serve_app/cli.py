"""The `imgserve` command: talk to a running service from a shell.

`imgserve models`, `imgserve health`, one command per task of the registry (`imgserve real|anime|layers
IMAGE -o OUT [--steps N --lora V ...]`, every field of the task an option, `--job` to queue it with a
progress bar: `serve_app.cli_tasks`), `imgserve jobs list|show|wait|cancel`, and
`imgserve submit IMAGE --task T -o OUT [--set field=value ...]` (a job, with a progress bar), and
`imgserve lora inspect FILE [--config YAML | --base DIR]` (offline: reads headers and configs only),
and `imgserve plan --task real|layers --gpus 2x24 [...]` (offline: the memory placement a replica
would use on those GPUs; exit status 2 when nothing fits), and `imgserve plan --config FILE --cluster
NxMxGB` (offline: whether the config's minimum GPU replicas fit N nodes of M cards of GB each, and
where they go; exit status 2, naming the deployment, when they do not: `serve_app.cluster_plan`),
and `imgserve kuberay CONFIG` (offline: the KubeRay RayService manifest whose serveConfigV2 is that
config file), and `imgserve fetch MANIFEST [--lock | --verify]` (downloads model files ahead of
time, checking every sha256), and `imgserve key new` / `imgserve key hash` (offline: an API key and
the SHA-256 digest that goes into the config; `--api-key` or $IMGSERVE_API_KEY sends a key with
every request).
Starting the service is Ray Serve's own `serve run configs/<profile>.yaml`; this command is a thin
layer over `serve_app.client` (429 and 503 retried after Retry-After unless `--no-retry`) and prints
errors as one readable line (exit status 1; a usage error 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from deployments.task import Tasks
from deployments.tasks import TASKS
from serve_app import cli_tasks
from serve_app import convert as convert_styles
from serve_app.client import Client, ServiceError

BUILTIN_COMMANDS = ("health", "models", "submit", "jobs", "lora", "plan", "convert-styles", "fetch", "key", "kuberay")
"""Commands that are not tasks: a task of the same name is reachable by `imgserve submit --task` only."""


def build_parser(tasks: Tasks = TASKS) -> argparse.ArgumentParser:
    """The whole command line; the task commands and `submit --task` come from `tasks`."""
    parser = argparse.ArgumentParser(prog="imgserve", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="service base URL")
    parser.add_argument("--api-key", default=os.environ.get("IMGSERVE_API_KEY"),
                        help="API key sent as `Authorization: Bearer` (default: $IMGSERVE_API_KEY)")
    parser.add_argument("--no-retry", action="store_true",
                        help="do not retry a 429 or 503 (by default: up to 3 times, after Retry-After, at most 30 s)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("health", help="is the service up")
    commands.add_parser("models", help="tasks and their choices")
    cli_tasks.add_task_commands(commands, tasks, reserved=BUILTIN_COMMANDS)
    submit = commands.add_parser("submit", help="queue a job, show its progress, save the result")
    submit.add_argument("image", help="input image file")
    submit.add_argument("--task", required=True, choices=tasks.names)
    submit.add_argument("-o", "--output", required=True, help="where to write the result")
    submit.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a task field, e.g. --set steps=20 --set lora=v2511-0823 (repeatable)")
    submit.add_argument("--priority", choices=cli_tasks.PRIORITIES, help="the job's priority (default normal)")
    submit.add_argument("--idempotency-key", metavar="KEY", help="the same key and request within a day return the first job")
    cli_tasks.add_jobs_commands(commands)
    lora = commands.add_parser("lora", help="LoRA files").add_subparsers(dest="lora_command", required=True)
    inspect = lora.add_parser("inspect", help="format, ranks, alpha, targets and fit of a LoRA file")
    inspect.add_argument("file")
    base = inspect.add_mutually_exclusive_group()
    base.add_argument("--config", help="a Serve config YAML: check against its real.source")
    base.add_argument("--base", help="a local Qwen-Image-Edit directory (diffusers layout)")
    plan = commands.add_parser("plan", help="memory placement of a diffusion replica on given GPUs (--task, --gpus), or "
                                            "whether a config's GPU replicas fit a cluster (--config, --cluster); offline")
    plan.add_argument("--task", choices=[task.name for task in tasks if "placement" in task.section.model_fields],
                      help="plan one replica of this task (with --gpus)")
    plan.add_argument("--gpus", help="GPUs one replica owns, COUNTxGB (e.g. 1x24, 2x24, 1x80)")
    plan.add_argument("--config", help="a Serve config YAML: with --cluster, check that the minimum replicas of its "
                                       "GPU deployments fit the cluster and print where they go (exit 2 when not)")
    plan.add_argument("--cluster", metavar="NxMxGB",
                      help="the GPU worker nodes: N nodes x M cards per node x GB per card (e.g. 4x1x24, 2x4x24; "
                           "1x0x0: no card). The head is not counted: it is a CPU-only node, where deployments "
                           "pinned to `imgserve_head` run; CPUs and host memory are not checked")
    plan.add_argument("--resolution", type=int, default=1024, help="longest pixel edge to plan for")
    plan.add_argument("--layers", type=int, default=8, help="layers task: layer count to plan for")
    plan.add_argument("--no-fp8", action="store_true", help="keep every weight in bf16")
    plan.add_argument("--no-offload", action="store_true", help="never stream weights from CPU")
    plan.add_argument("--compute", choices=["bf16", "fp8"], default="bf16",
                      help="how the transformer computes: bf16, or float8 (cards of compute capability >= 8.9)")
    plan.add_argument("--model", help="a local diffusers directory to size instead of the published configs")
    plan.add_argument("--text-encoder", choices=["inline", "stage"], default="stage",
                      help="where prompts are encoded: in the TextEncoder stage (default; the replica's cards "
                           "hold only transformer and VAE) or inline on the replica's own cards")
    plan.add_argument("--encoder-gpus", help="the TextEncoder stage's card, 1xGB, or `cpu` (default: 1x the GB of --gpus)")
    plan.add_argument("--cards", type=int, help="cluster size: recommend how many cards encode and how many denoise")
    plan.add_argument("--steps", type=int, help="with --cards: denoising steps per request (default: the task's)")
    plan.add_argument("--cfg", type=float, help="with --cards: true CFG scale, > 1 doubles the passes (default: the task's)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(registry=tasks)
    convert_styles.add_parser(commands)
    fetch = commands.add_parser("fetch", help="download model files ahead of time, verifying each sha256")
    fetch.add_argument("manifest", help="a models manifest, e.g. models.yaml")
    mode = fetch.add_mutually_exclusive_group()
    mode.add_argument("--lock", action="store_true", help="pin the revision and record every file's sha256 (once)")
    mode.add_argument("--verify", action="store_true", help="only check the files already on disk (offline)")
    key = commands.add_parser("key", help="API keys (offline)").add_subparsers(dest="key_command", required=True)
    key.add_parser("new", help="print a new random key and its SHA-256 digest (the digest goes into the config)")
    key.add_parser("hash", help="read a key from stdin, print its SHA-256 digest")
    kuberay = commands.add_parser("kuberay", help="a KubeRay RayService manifest from a Serve config (offline)")
    kuberay.add_argument("config", help="a Serve config YAML, e.g. configs/rtx4090-cluster.yaml")
    kuberay.add_argument("--image", default="imgserve:latest", help="container image with imgserve installed")
    kuberay.add_argument("--gpus-per-node", type=int, default=4)
    kuberay.add_argument("--min-workers", type=int, default=1)
    kuberay.add_argument("--max-workers", type=int, default=4)
    kuberay.add_argument("--monitoring-namespace", default="monitoring",
                         help="the namespace Prometheus scrapes from: the only one admitted to the metrics port")
    kuberay.add_argument("--operator-namespace", default="default",
                         help="the KubeRay operator's namespace: the only one admitted to the dashboard")
    kuberay.add_argument("--auth-secret", help="the Secret holding Ray's token (key auth_token); default imgserve-ray-token")
    return parser


def _encoder_budget(args: argparse.Namespace, memory: float) -> Any:
    """The TextEncoder stage's card from `--encoder-gpus` (None: on the CPU)."""
    from deployments import placement

    text = args.encoder_gpus or f"1x{memory:g}"
    if text.strip().lower() == "cpu":
        return None
    count, card = placement.parse_gpus(text)
    if count != 1:
        raise ValueError(f"--encoder-gpus must be 1xGB or cpu (the TextEncoder stage uses exactly one card), got {text!r}")
    return placement.PlacementConfig(gpu_memory_gb=card, resolution=args.resolution, layers=args.layers,
                                     allow_fp8=not args.no_fp8, allow_offload=not args.no_offload)


def _timed(args: argparse.Namespace, section: Any, result: Any, encoder: Any, sizes: Any) -> dict[str, Any]:
    """With `--cards`: the predicted stage times and the split of the cards (or, inline, the replicas)."""
    from deployments import placement

    if args.cards < 1:
        raise ValueError(f"--cards must be >= 1, got {args.cards}")
    steps = args.steps if args.steps is not None else section.default_steps
    cfg = args.cfg if args.cfg is not None else section.default_cfg
    # a `layers` request without a prompt is captioned first: timed at the caption's cap (worst case)
    caption = getattr(section, "caption_max_new_tokens", None)
    denoise = placement.transformer_seconds(result, steps, cfg, sizes)
    encode = placement.encoder_seconds(encoder or result, args.task, negative=cfg > 1, caption_tokens=caption,
                                       sizes=sizes)
    timed: dict[str, Any] = {"steps": steps, "cfg": cfg, "card": placement.RTX_4090.name,
                             "stage_times": {"transformer": vars(denoise), "text_encoder": vars(encode)}}
    if encoder is not None:
        timed["split"] = placement.recommend_split(args.cards, denoise.seconds, encode.seconds, result.gpus_used,
                                                   encoder.gpus)
        if encoder.gpus:  # the trade-off: every card denoising, the prompts encoded (slower) on CPUs
            on_cpu = placement.encoder_seconds(placement.plan_encoder(args.task, None, sizes), args.task,
                                               negative=cfg > 1, caption_tokens=caption, sizes=sizes)
            timed["cpu_encoder"] = placement.recommend_split(args.cards, denoise.seconds, on_cpu.seconds,
                                                             result.gpus_used, 0)
    else:
        replicas = args.cards // result.gpus_used
        if replicas < 1:
            raise ValueError(f"--cards {args.cards} cannot hold one replica of {result.gpus_used} cards")
        timed["inline"] = {"cards": args.cards, "replicas": replicas,
                           "requests_per_s": replicas / (denoise.seconds + encode.seconds)}
    return timed


def _describe_timed(timed: dict[str, Any]) -> str:
    times = timed["stage_times"]
    lines = [f"time model ({timed['card']} datasheet figures, uncalibrated; {timed['steps']} steps, cfg {timed['cfg']:g}):"]
    for stage in times.values():
        lines.append(f"  {stage['stage']}: {stage['seconds']:.2f} s per request = {stage['detail']}")
    if "split" in timed:
        lines.append(timed["split"].describe())
    if "cpu_encoder" in timed:
        cpu = timed["cpu_encoder"]
        lines.append(f"instead, with the encoder on CPUs: {cpu.transformer_replicas} diffusion replicas and "
                     f"{cpu.encoder_replicas} CPU TextEncoder replica(s), {cpu.requests_per_s * 3600:.1f} per hour, "
                     f"each request {cpu.encoder_s - timed['split'].encoder_s:.2f} s longer (encoding on CPU)")
    if "inline" in timed:
        inline = timed["inline"]
        lines.append(f"inline: {inline['replicas']} replicas on {inline['cards']} cards, each encoding its own prompts; "
                     f"throughput {inline['requests_per_s']:.4f} requests/s ({inline['requests_per_s'] * 3600:.1f} per hour)")
    return "\n".join(lines)


def plan_command(args: argparse.Namespace) -> int:
    """`imgserve plan`: print the replica's plan, the TextEncoder stage's plan (with `--text-encoder
    stage`, the default) and with `--cards` the predicted stage times and the split of the cards
    (exit 0), or why nothing fits (exit 2); needs no service. With `--config`/`--cluster`:
    `cluster_plan_command`."""
    from pydantic import ValidationError

    from deployments import placement

    if args.config or args.cluster:
        return cluster_plan_command(args)
    if not (args.task and args.gpus):
        print("imgserve: plan needs --task and --gpus (one replica), or --config and --cluster (a config on a cluster)",
              file=sys.stderr)
        return 2
    try:
        count, memory = placement.parse_gpus(args.gpus)
        config = placement.PlacementConfig(gpus=count, gpu_memory_gb=memory, resolution=args.resolution,
                                           layers=args.layers, allow_fp8=not args.no_fp8,
                                           allow_offload=not args.no_offload, compute=args.compute)
        sizes = placement.component_sizes(args.model) if args.model else None
        section = args.registry[args.task].section()
        result = section.plan_on(config, sizes, text_encoder=args.text_encoder)
        encoder = None
        if args.text_encoder == "stage":
            encoder = placement.plan_encoder(args.task, _encoder_budget(args, memory), sizes)
        timed = _timed(args, section, result, encoder, sizes) if args.cards is not None else None
    except placement.DoesNotFit as error:
        print(f"imgserve: {error.reason}", file=sys.stderr)
        return 2
    except ValidationError as error:
        print("imgserve: " + "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in error.errors()), file=sys.stderr)
        return 1
    except (ValueError, OSError) as error:
        print(f"imgserve: {error}", file=sys.stderr)
        return 1
    if args.json:
        data = result.to_dict()
        if encoder is not None:
            data["encoder_stage"] = encoder.to_dict()
        if timed is not None:
            data.update(timed, **{key: timed[key].to_dict() for key in ("split", "cpu_encoder") if key in timed})
        print(json.dumps(data, indent=2))
        return 0
    parts = [result.describe()]
    if encoder is not None:
        parts.append(encoder.describe())
    if timed is not None:
        parts.append(_describe_timed(timed))
    print("\n\n".join(parts))
    return 0


def cluster_plan_command(args: argparse.Namespace) -> int:
    """`imgserve plan --config FILE --cluster NxMxGB`: where the config's minimum GPU replicas go on
    the cluster (exit 0, on stdout), or which deployment does not fit and why (exit 2, on stderr);
    1 for a file or value that cannot be read. `--json`: the plan as JSON on stdout either way."""
    from pydantic import ValidationError

    from serve_app.cluster_plan import parse_cluster, plan_cluster

    if not (args.config and args.cluster) or args.task or args.gpus:
        print("imgserve: plan --config FILE --cluster NxMxGB takes both, and neither --task nor --gpus",
              file=sys.stderr)
        return 2
    try:
        cluster = parse_cluster(args.cluster)
    except ValueError as error:
        print(f"imgserve: {error}", file=sys.stderr)
        return 1
    try:
        plan = plan_cluster(_config_file(args.config), cluster)
    except ValidationError as error:
        print("imgserve: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()),
              file=sys.stderr)
        return 1
    except (ValueError, OSError, LookupError, TypeError) as error:
        print(f"imgserve: {args.config}: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    if not plan.fits:  # the placement so far and why it stops, where errors go
        print(plan.describe(), file=sys.stderr)
    elif not args.json:
        print(plan.describe())
    return 0 if plan.fits else 2


def _config_file(path: str) -> Any:
    """The validated `args` of the Serve config YAML at `path`."""
    import yaml

    from serve_app.config import load_config

    document = yaml.safe_load(Path(path).read_text())
    return load_config(document["applications"][0]["args"])


def _transformer_dir(config_path: str | None, base: str | None) -> Path | None:
    """The base transformer directory that `lora inspect` checks against, if any."""
    if base:
        return Path(base) / "transformer"
    if not config_path:
        return None
    config = _config_file(config_path)
    return config.section("real").transformer_dir(config.cache_dir)


def lora_inspect(file: str, config_path: str | None, base: str | None) -> int:
    from deployments.lora import base_linear_shapes, inspect_lora

    transformer = _transformer_dir(config_path, base)
    shapes = base_linear_shapes(transformer) if transformer else None
    report = inspect_lora(file, shapes)
    print(report.summary())
    if transformer:
        print(f"base:    {transformer.parent}")
    return 0 if report.ok else 2


def key_command(command: str) -> int:
    """`imgserve key new`: a key (give it to the client) and its digest (put it into
    `ingress.api_keys_sha256` or $IMGSERVE_API_KEYS_SHA256); `imgserve key hash`: the digest of a
    key read from stdin (one line; surrounding whitespace ignored)."""
    from serve_app.keys import hash_key, key_id, new_key

    if command == "new":
        key, digest = new_key()
        print(f"key:    {key}\nsha256: {digest}\nid:     {key_id(digest)}")
        return 0
    key = sys.stdin.readline().strip()
    if not key:
        print("imgserve: no key on stdin", file=sys.stderr)
        return 1
    print(hash_key(key))
    return 0


def main(argv: list[str] | None = None, tasks: Tasks = TASKS) -> int:
    """Run one command; its exit status. `tasks`: the registry the task commands come from."""
    args = build_parser(tasks).parse_args(argv)
    if args.command == "plan":  # offline: no service, no client
        return plan_command(args)
    if args.command == "key":
        return key_command(args.key_command)
    if args.command == "convert-styles":
        return convert_styles.command(args.source, args.dest)
    if args.command == "fetch":
        from serve_app.fetch import FetchError, fetch

        try:
            fetch(args.manifest, lock=args.lock, verify_only=args.verify)
        except FetchError as error:
            print(f"imgserve: {error}", file=sys.stderr)
            return 2
        except OSError as error:  # the hub unreachable, a disk full, ...
            print(f"imgserve: {error}", file=sys.stderr)
            return 1
        return 0
    if args.command == "kuberay":
        from pydantic import ValidationError

        from serve_app.kuberay import render

        try:
            print(render(args.config, image=args.image, gpus_per_node=args.gpus_per_node,
                         min_workers=args.min_workers, max_workers=args.max_workers,
                         monitoring_namespace=args.monitoring_namespace,
                         operator_namespace=args.operator_namespace, auth_secret=args.auth_secret), end="")
        except (ValidationError, ValueError, OSError) as error:
            print(f"imgserve: {error}", file=sys.stderr)
            return 1
        return 0
    try:
        with Client(args.url, api_key=args.api_key, max_retries=0 if args.no_retry else 3,
                    on_retry=_tell_retry) as client:
            if args.command == "health":
                print(json.dumps(client.health()))
            elif args.command == "models":
                print(json.dumps(client.models(), indent=2))
            elif args.command == "jobs":
                return cli_tasks.jobs_command(client, args)
            elif args.command == "submit":
                job = client.submit(args.task, args.image, priority=args.priority,
                                    idempotency_key=args.idempotency_key, **cli_tasks.parse_sets(args.set))
                print(f"job {job.id}", file=sys.stderr)
                cli_tasks.saved(cli_tasks.follow(job), args.output)
            elif args.command == "lora":
                return lora_inspect(args.file, args.config, args.base)
            elif getattr(args, "task_fields", None) is not None:  # a task's command
                return cli_tasks.run_task(client, args)
    except ServiceError as error:
        print(f"imgserve: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # a malformed --set
        print(f"imgserve: {error}", file=sys.stderr)
        return 2
    except (OSError, ConnectionError, httpx.HTTPError) as error:
        print(f"imgserve: {error}", file=sys.stderr)
        return 1
    return 0


def _tell_retry(error: ServiceError, seconds: float) -> None:
    print(f"imgserve: {error.status} {error.code}; retrying in {seconds:g} s", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
