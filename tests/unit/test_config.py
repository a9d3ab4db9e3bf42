"""AppConfig: the shipped configs validate, and bad values are refused naming the field and value."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from serve_app.config import AppConfig, DeploymentOptions, load_config
from tests.conftest import REPO, demo_args


def test_demo_config_validates_and_fits_two_cores_without_gpu() -> None:
    config = load_config(demo_args())
    sections = [getattr(config, name) for name in AppConfig.model_fields if hasattr(getattr(config, name), "serve")]
    assert {"ingress", "preprocess", "real", "layers", "postprocess"} <= {
        name for name in AppConfig.model_fields if hasattr(getattr(config, name), "serve")}
    total_cpus = sum(s.serve.ray_actor_options.get("num_cpus", 1) * (s.serve.num_replicas or 1) for s in sections)
    assert total_cpus <= 2
    assert all(s.serve.ray_actor_options.get("num_gpus", 0) == 0 for s in sections)
    assert config.real.source == "tiny"
    assert config.real.default_steps == 30 and config.real.default_cfg == 7.0


def test_every_shipped_config_validates() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        document = yaml.safe_load(path.read_text())
        for app in document["applications"]:
            assert app["import_path"] == "serve_app.app:build_app"
            load_config(app["args"])


def test_every_shipped_config_plans_its_placements_where_it_encodes_prompts() -> None:
    """Each diffusion section's plan follows the config's `text_encoder.mode` (in stage mode its
    cards hold no text encoder), and a staged encoder's placement plans on its card."""
    staged = set()
    for path in sorted((REPO / "configs").glob("*.yaml")):
        for app in yaml.safe_load(path.read_text())["applications"]:
            config = load_config(app["args"])
            mode = config.text_encoder.mode
            for name, section in config.sections().items():
                if getattr(section, "placement", None) is None:
                    continue
                assert section.text_encoder == mode, (path.name, name)
                plan = section.plan()
                assert plan.text_encoder_mode == mode, (path.name, name)
                assert (plan.text_encoder.offload == "stage") == (mode == "stage"), (path.name, name)
            if mode == "stage":
                staged.add(path.name)
                encoder = config.text_encoder.plan(config.staged())
                assert encoder is None or encoder.gpus == 1, path.name
    assert {"demo.yaml", "rtx4090.yaml", "rtx4090-cluster.yaml"} <= staged


@pytest.mark.parametrize(
    "args,field,value",
    [
        ({"preprocess": {"max_long_edge": 8}}, "max_long_edge", "8"),
        ({"preprocess": {"max_bytes": 0}}, "max_bytes", "0"),
        ({"real": {"max_steps": 0}}, "max_steps", "0"),
        ({"real": {"default_cfg": 0.5}}, "default_cfg", "0.5"),
        ({"real": {"device": "tpu"}}, "device", "tpu"),
        ({"real": {"serve": {"max_ongoing_requests": 0}}}, "max_ongoing_requests", "0"),
        ({"real": {"serve": {"max_queued_requests": 0}}}, "max_queued_requests", "0"),
        ({"real": {"serve": {"ray_actor_options": {"num_gpu": 1}}}}, "num_gpu", "num_gpu"),
        ({"real": {"serve": {"ray_actor_options": {"num_gpus": -1}}}}, "num_gpus", "-1"),
        ({"ingress": {"retry_after_s": 0}}, "retry_after_s", "0"),
        ({"postprocess": {"jpeg_quality": 101}}, "jpeg_quality", "101"),
        ({"preprocess": {"formats": ["JPEG", "NOPE"]}}, "formats", "NOPE"),
        ({"reel": {}}, "reel", "reel"),
    ],
)
def test_bad_values_are_refused_naming_field_and_value(args, field, value) -> None:
    with pytest.raises(ValidationError) as error:
        AppConfig.model_validate(args)
    message = str(error.value)
    assert field in message and value in message


def test_replicas_and_autoscaling_are_exclusive() -> None:
    with pytest.raises(ValidationError, match="exclusive"):
        DeploymentOptions(num_replicas=2, autoscaling_config={"min_replicas": 1, "max_replicas": 4})
    options = DeploymentOptions(num_replicas=None, autoscaling_config={"min_replicas": 1, "max_replicas": 4})
    assert "num_replicas" not in options.serve_options()
    assert options.serve_options()["autoscaling_config"]["max_replicas"] == 4


def test_serve_options_carry_backpressure_limits() -> None:
    options = DeploymentOptions(max_ongoing_requests=1, max_queued_requests=3, ray_actor_options={"num_gpus": 1})
    assert options.serve_options() == {
        "num_replicas": 1,
        "max_ongoing_requests": 1,
        "max_queued_requests": 3,
        "ray_actor_options": {"num_gpus": 1},
        "health_check_period_s": 10.0,
        "graceful_shutdown_timeout_s": 20.0,
    }


def test_cache_dir_expands_home() -> None:
    assert "~" not in str(load_config({"cache_dir": "~/x"}).cache_dir)


@pytest.mark.parametrize("jobs", [{"webhook_allow": ["10.0.0.1/8"]}, {"webhook_allow": ["bad host"]},
                                  {"webhook_secret": "nope"}, {"webhook_secret": "whsec_c2hvcnQ="},
                                  {"priority_ageing_s": 0}, {"idempotency_ttl_s": -1}])
def test_webhook_priority_and_idempotency_settings_are_refused_naming_the_field(jobs: dict) -> None:
    with pytest.raises(ValidationError, match=next(iter(jobs))):
        load_config({"jobs": jobs})


def test_a_webhook_allow_list_and_secret_of_the_documented_forms_load() -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the Standard Webhooks specification's example
    jobs = load_config({"jobs": {"webhook_allow": ["hooks.example.com:8443", "10.0.0.0/8", "127.0.0.1"],
                                 "webhook_secret": secret}}).jobs
    assert jobs.webhook_allow == ["hooks.example.com:8443", "10.0.0.0/8", "127.0.0.1"] and jobs.webhook_secret == secret
