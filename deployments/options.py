"""Ray Serve options of one deployment, as config: a pydantic model that imports no Ray.

Every config section that becomes a deployment carries one as its `serve:` block; the app builder
hands `serve_options()` to `serve.deployment(...).options(...)`. Bad values are refused naming the
field and the value.

Model deployments (and the TextEncoder stage) get two more things from the builder
(`model_serving`): a graceful shutdown long enough for the longest request they may hold (a
redeploy or scale-down waits for it instead of killing it), and their request methods on the
replica's own event loop, so that a cancelled request keeps its slot until the model thread has
stopped (with Serve 2.60's default, user code on a loop of its own, the replica frees the slot the
moment the caller cancels, while the model still works: Serve would count a busy replica free).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.validation import at_least

_ACTOR_OPTION_KEYS = {"num_cpus", "num_gpus", "memory", "resources", "runtime_env", "accelerator_type"}


class DeploymentOptions(BaseModel):
    """Ray Serve options of one deployment, applied by the builder with `.options(...)`."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = 1
    """Fixed replica count; must be None (null) when `autoscaling_config` is given."""
    autoscaling_config: dict[str, Any] | None = None
    """Ray Serve autoscaling (min_replicas, max_replicas, target_ongoing_requests, delays)."""
    max_ongoing_requests: int = 4
    """Requests a replica works on at once; model replicas use 1: never batch diffusion prompts."""
    max_queued_requests: int = -1
    """Requests waiting per caller for this deployment beyond which callers get backpressure
    (HTTP 503 with Retry-After); -1 means unbounded."""
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0.25})
    """Ray resources per replica: num_cpus, num_gpus, memory, resources (e.g. {"rtx4090": 1}),
    runtime_env. Fractional values are allowed, so the demo fits a 2-core machine."""
    health_check_period_s: float = 10.0
    """Seconds between `check_health` calls on each replica."""
    graceful_shutdown_timeout_s: float | None = None
    """Seconds a stopping replica (a redeploy, a scale-down) gets to finish the requests it holds.
    null (the default): derived for model deployments and the TextEncoder stage from the longest a
    request may run (the larger of `ingress.request_timeout_s` and `jobs.max_run_s`, plus
    SHUTDOWN_MARGIN_S), 20 s for every other deployment."""
    graceful_shutdown_wait_loop_s: float | None = None
    """Seconds between a stopping replica's checks whether its requests have finished. null: 2 s."""

    _counts = at_least(1, "num_replicas", "max_ongoing_requests")
    _shutdown = at_least(0, "graceful_shutdown_timeout_s", "graceful_shutdown_wait_loop_s")

    @field_validator("max_queued_requests")
    @classmethod
    def _queued(cls, value: int) -> int:
        if value < -1 or value == 0:
            raise ValueError(f"max_queued_requests must be -1 (unbounded) or >= 1, got {value}")
        return value

    @field_validator("ray_actor_options")
    @classmethod
    def _actor_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - _ACTOR_OPTION_KEYS)
        if unknown:
            raise ValueError(f"ray_actor_options has unknown keys {unknown}; allowed: {sorted(_ACTOR_OPTION_KEYS)}")
        for key in ("num_cpus", "num_gpus"):
            if key in value and not (isinstance(value[key], (int, float)) and value[key] >= 0):
                raise ValueError(f"ray_actor_options.{key} must be a number >= 0, got {value[key]!r}")
        return value

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> DeploymentOptions:
        if self.autoscaling_config is not None and self.num_replicas is not None:
            raise ValueError(
                f"num_replicas ({self.num_replicas}) and autoscaling_config are exclusive: set num_replicas: null"
            )
        if self.autoscaling_config is None and self.num_replicas is None:
            raise ValueError("num_replicas is null but no autoscaling_config is given")
        return self

    def serve_options(self) -> dict[str, Any]:
        """The keyword arguments for `serve.deployment(...).options(...)` (an unset graceful shutdown
        as the 20 s every deployment but a model's gets; `model_serving` derives a model's)."""
        options = self.model_dump(exclude_none=True)
        options.setdefault("graceful_shutdown_timeout_s", DEFAULT_SHUTDOWN_S)
        return options


DEFAULT_SHUTDOWN_S = 20.0
"""Graceful shutdown of a deployment that holds no model (Ray Serve's own default)."""
SHUTDOWN_MARGIN_S = 30.0
"""Added to the longest a request may run: the last step, decode and the answer after the limit."""
UNBOUNDED_SHUTDOWN_S = 3600.0
"""A model's graceful shutdown when neither the ingress nor the jobs have a time limit."""
WAIT_LOOP_S = 2.0
"""How often a stopping model replica checks whether its requests have finished."""
REPLICA_LOOP_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
"""Ray Serve 2.60: request methods run on the replica's own event loop (read when the replica's
process starts): a cancelled request then holds its slot until the method returns."""


def longest_request_s(*limits: float | None) -> float:
    """Graceful shutdown for a model whose requests may run as long as the largest of `limits`
    (None: no limit) plus SHUTDOWN_MARGIN_S; UNBOUNDED_SHUTDOWN_S when none is limited."""
    given = [limit for limit in limits if limit is not None]
    return max(given) + SHUTDOWN_MARGIN_S if given else UNBOUNDED_SHUTDOWN_S


def model_serving(options: dict[str, Any], section: DeploymentOptions, shutdown_s: float) -> dict[str, Any]:
    """A model deployment's Serve `options` (from `section`, its config): its graceful shutdown
    `shutdown_s` unless the section sets one, a 2 s wait loop unless it sets one, and its request
    methods on the replica's event loop (REPLICA_LOOP_ENV in its runtime_env, merged with the
    section's own env_vars)."""
    served = with_shutdown(options, section, shutdown_s)
    actor = dict(served["ray_actor_options"])
    runtime_env = dict(actor.get("runtime_env") or {})
    runtime_env["env_vars"] = {**REPLICA_LOOP_ENV, **(runtime_env.get("env_vars") or {})}
    actor["runtime_env"] = runtime_env
    served["ray_actor_options"] = actor
    return served


def with_shutdown(options: dict[str, Any], section: DeploymentOptions, shutdown_s: float) -> dict[str, Any]:
    """Serve `options` with graceful shutdown `shutdown_s` and a 2 s wait loop, where `section` (the
    config they came from) sets neither."""
    served = dict(options)
    if section.graceful_shutdown_timeout_s is None:
        served["graceful_shutdown_timeout_s"] = shutdown_s
    served.setdefault("graceful_shutdown_wait_loop_s", WAIT_LOOP_S)
    return served


def model_defaults(**ray_actor_options: Any) -> DeploymentOptions:
    """A model deployment's defaults: one request at a time, a short queue."""
    return DeploymentOptions(max_ongoing_requests=1, max_queued_requests=8, ray_actor_options=ray_actor_options)


def with_planned(options: dict[str, Any], planned: Callable[[float], dict[str, Any]]) -> dict[str, Any]:
    """Serve `options` from config with what a placement plan asks Ray for laid over them:
    `planned(num_cpus)` gives the plan's options (its GPUs, custom resources and, for several
    cards, the placement-group bundle); custom resources are merged, the rest replaced."""
    actor = dict(options["ray_actor_options"])
    plan_options = planned(actor.get("num_cpus", 1))
    resources = {**actor.get("resources", {}), **plan_options["ray_actor_options"].get("resources", {})}
    merged = {**options, **{key: value for key, value in plan_options.items() if key != "ray_actor_options"}}
    merged["ray_actor_options"] = {**actor, **plan_options["ray_actor_options"],
                                   **({"resources": resources} if resources else {})}
    return merged
