"""The RayService: the Serve application, the API Service, the Ray pods and their settings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import yaml

from server.auth import parse_token

Render = Callable[..., Any]


def test_serve_config_runs_the_tuneloop_application_at_the_root(render: Render) -> None:
    spec = render().find("RayService")["spec"]

    config = yaml.safe_load(spec["serveConfigV2"])

    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    [app] = config["applications"]
    assert app["name"] == "tuneloop"
    assert app["import_path"] == "server.app:build_app"
    assert app["route_prefix"] == "/"


def test_serve_args_and_deployment_overrides_reach_the_serve_config(render: Render) -> None:
    deployments = [{"name": "Predictor", "num_replicas": 3}]
    rendering = render({"serve": {"args": {"workers": 2}, "deployments": deployments}})

    config = yaml.safe_load(rendering.find("RayService")["spec"]["serveConfigV2"])

    assert config["applications"][0]["args"] == {"workers": 2}
    assert config["applications"][0]["deployments"] == deployments


def test_api_service_exposes_only_port_8000(render: Render, scenario: str) -> None:
    serve_service = render(scenario=scenario).find("RayService")["spec"]["serveService"]

    assert serve_service["metadata"]["name"] == "tuneloop-api"
    assert serve_service["spec"]["ports"] == [{"name": "serve", "port": 8000}]


def test_only_the_api_and_metrics_ports_are_on_the_workers(render: Render) -> None:
    containers = render(scenario="gpu-values").ray_containers()

    ports = {name: {p["containerPort"] for p in c["ports"]} for name, c in containers.items()}

    assert ports == {
        "head": {6379, 8265, 10001, 8000, 8080},
        "cpu": {8000, 8080},
        "gpu": {8000, 8080},
    }


def test_ray_pods_carry_the_release_selector_labels(render: Render, scenario: str) -> None:
    # The NetworkPolicy and the PodMonitors find the Ray pods by these labels.
    cluster = render(scenario=scenario).find("RayService")["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster.get("workerGroupSpecs", [])]

    for template in templates:
        assert template["metadata"]["labels"] == {
            "app.kubernetes.io/name": "tuneloop",
            "app.kubernetes.io/instance": "tuneloop",
            "app.kubernetes.io/component": "ray",
        }


def test_metrics_port_is_fixed_on_every_ray_node(render: Render, scenario: str) -> None:
    cluster = render(scenario=scenario).find("RayService")["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]

    assert all(group["rayStartParams"]["metrics-export-port"] == "8080" for group in groups)
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"


def test_bundled_database_url_comes_from_the_release_secret(render: Render) -> None:
    rendering = render()

    for group in rendering.pod_specs():
        source = rendering.env(group)["TUNELOOP_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert source == {"name": "tuneloop-postgresql", "key": "url"}


def test_external_database_url_comes_from_the_named_secret(render: Render) -> None:
    rendering = render(scenario="external-db-values")

    for group in rendering.pod_specs():
        source = rendering.env(group)["TUNELOOP_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert source == {"name": "tuneloop-db", "key": "url"}
    assert rendering.all("StatefulSet") == []


def test_shared_volume_holds_home_data_and_artifacts_on_every_ray_pod(render: Render) -> None:
    rendering = render()
    claim = rendering.find("PersistentVolumeClaim")

    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for group, spec in rendering.pod_specs().items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        env = rendering.env(group)
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert mounts["shared"] == "/var/lib/tuneloop"
        assert env["TUNELOOP_HOME"]["value"] == "/var/lib/tuneloop"
        assert env["TUNELOOP_DATA_ROOT"]["value"] == "/var/lib/tuneloop/data"
        assert env["TUNELOOP_ARTIFACT_ROOT"]["value"] == "/var/lib/tuneloop/artifacts"


def test_s3_artifacts_take_their_keys_from_the_secret(render: Render) -> None:
    rendering = render(scenario="s3-values")

    for group in rendering.pod_specs():
        env = rendering.env(group)
        assert env["TUNELOOP_ARTIFACT_ROOT"]["value"] == "s3://tuneloop-artifacts/prod"
        assert env["TUNELOOP_S3_ENDPOINT_URL"]["value"] == "http://minio.minio.svc:9000"
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
            "name": "tuneloop-s3",
            "key": "AWS_ACCESS_KEY_ID",
        }
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "tuneloop-s3",
            "key": "AWS_SECRET_ACCESS_KEY",
        }
        assert "TUNELOOP_DATA_ROOT" not in env
    assert rendering.all("PersistentVolumeClaim") == []


def test_s3_without_a_secret_sets_no_keys(render: Render) -> None:
    rendering = render({"artifacts": {"s3": {"existingSecret": ""}}}, scenario="s3-values")

    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(rendering.env())


@pytest.mark.parametrize(
    ("values_file", "secret", "keys"),
    [
        ("default", "tuneloop-api-tokens", ("admin-token", "metrics-token")),
        ("external-db-values", "tuneloop-api-tokens", ("admin", "metrics")),
    ],
)
def test_every_ray_pod_reads_the_bootstrap_tokens_from_their_secret(
    render: Render, values_file: str, secret: str, keys: tuple[str, str]
) -> None:
    rendering = render(scenario=values_file)

    for group, spec in rendering.pod_specs().items():
        env = rendering.env(group)
        variables = ("TUNELOOP_ADMIN_TOKEN", "TUNELOOP_METRICS_TOKEN")
        for variable, key in zip(variables, keys, strict=True):
            assert env[variable]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}
            assert "value" not in env[variable]
        assert "api-tokens" not in {v["name"] for v in spec["volumes"]}


def test_api_token_secret_is_generated_only_without_an_existing_one(render: Render) -> None:
    rendering = render()
    admin = rendering.secret_value("tuneloop-api-tokens", "admin-token")
    metrics = rendering.secret_value("tuneloop-api-tokens", "metrics-token")
    # external-db-values names an existing token Secret.
    secrets = render(scenario="external-db-values").all("Secret")

    # The tokens the API parses at start; a malformed one would stop it.
    assert parse_token(admin) is not None and parse_token(metrics) is not None
    assert admin != metrics
    assert [s["metadata"]["name"] for s in secrets] == []


def test_gpu_workers_get_gpus_tolerations_node_selector_and_cuda_image(render: Render) -> None:
    rendering = render(scenario="gpu-values")
    gpu = rendering.pod_specs()["gpu"]
    container = gpu["containers"][0]

    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"] == "tuneloop:0.1.0-gpu"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu[
        "tolerations"
    ]
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert "nvidia.com/gpu" not in rendering.ray_containers()["cpu"]["resources"]["limits"]


def test_gpu_image_defaults_to_the_gpu_tag_of_the_main_image(render: Render) -> None:
    image = {"repository": "registry.example/tuneloop", "tag": "1.2.3"}
    rendering = render({"image": image, "ray": {"workers": {"gpu": {"enabled": True}}}})

    images = {group: c["image"] for group, c in rendering.ray_containers().items()}

    assert images == {
        "head": "registry.example/tuneloop:1.2.3",
        "cpu": "registry.example/tuneloop:1.2.3",
        "gpu": "registry.example/tuneloop:1.2.3-gpu",
    }


def test_gpu_group_is_absent_by_default(render: Render) -> None:
    groups = render().find("RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]

    assert [g["groupName"] for g in groups] == ["cpu"]


def test_autoscaling_flag_reaches_kuberay(render: Render) -> None:
    assert (
        render().find("RayService")["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is False
    )
    gpu = render(scenario="gpu-values").find("RayService")["spec"]["rayClusterConfig"]
    assert gpu["enableInTreeAutoscaling"] is True


def test_ray_containers_run_as_the_image_user_without_privileges(
    render: Render, scenario: str
) -> None:
    rendering = render(scenario=scenario)

    for spec in rendering.pod_specs().values():
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 1000
        container = spec["containers"][0]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_log_format_and_extra_env_reach_every_ray_container(render: Render) -> None:
    extra = [{"name": "TUNELOOP_MAX_RUNNING_JOBS", "value": "4"}]
    rendering = render({"logFormat": "text", "extraEnv": extra}, scenario="gpu-values")

    for group in rendering.pod_specs():
        env = rendering.env(group)
        assert env["TUNELOOP_LOG_FORMAT"]["value"] == "text"
        assert env["TUNELOOP_MAX_RUNNING_JOBS"]["value"] == "4"
