"""The cluster configs in cluster/configs/: valid YAML, the launcher config valid against the JSON schema
that ships with Ray, the KubeRay manifest with the fields a RayCluster needs, and both set up the way
the README promises (prunetune installed, token auth on, a tracking server on the head bound to
loopback, GPU workers, shared storage)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parent.parent / "cluster" / "configs"


def ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((CONFIGS / "aws.yaml").read_text())


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    return list(yaml.safe_load_all((CONFIGS / "kuberay.yaml").read_text()))


def test_the_launcher_config_is_valid_against_rays_schema(launcher):
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)
    broken = {**launcher, "available_node_types": {"head": {"node_config": {}}}}  # no resources
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_the_launcher_config_sets_up_prunetune_auth_tracking_and_gpus(launcher):
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    assert types[launcher["head_node_type"]]["resources"] == {"CPU": 0}  # the head runs no trials
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in types.values())  # GPU workers
    setup = " ".join(launcher["setup_commands"])
    assert "prunetune-src" in setup and f"ray[default]=={ray_version()}" in setup
    assert launcher["file_mounts"]["/home/ubuntu/prunetune-src"] == "."
    assert "auth_token" in " ".join(launcher["file_mounts"])
    for command in launcher["head_start_ray_commands"][1:2] + launcher["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in command and "ray start" in command
    server = next(c for c in launcher["head_start_ray_commands"] if "mlflow server" in c)
    assert "--host 127.0.0.1" in server and "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in server
    assert "--dashboard-host=127.0.0.1" in launcher["head_start_ray_commands"][1]


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_the_kuberay_manifest_has_what_a_raycluster_needs(manifests):
    cluster = next(m for m in manifests if m["kind"] == "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1" and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", cluster["metadata"]["name"])
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray_version()
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    groups = spec["workerGroupSpecs"]
    for group in [head, *groups]:
        assert isinstance(group["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # KubeRay wants strings
        containers = _containers(group)
        assert containers and all(c["name"] and c["image"] for c in containers)
        assert any(m["mountPath"] == "/mnt/prunetune" for m in containers[0]["volumeMounts"])  # shared storage
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in group["template"]["spec"]["volumes"]}
        assert claims == {"shared": "prunetune-shared"}
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert len({g["groupName"] for g in groups}) == len(groups)
    for group in groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu_limits = [_containers(g)[0]["resources"]["limits"].get("nvidia.com/gpu") for g in groups]
    assert any(gpu_limits)

    sidecar = next(c for c in _containers(head) if c["name"] == "mlflow-server")
    assert "--host 127.0.0.1" in " ".join(sidecar["args"])
    assert {"name": "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "value": "false"} in sidecar["env"]
    images = {c["image"] for g in [head, *groups] for c in _containers(g)}
    assert len(images) == 1  # one image with prunetune installed (cluster/configs/Dockerfile)
    dockerfile = (CONFIGS / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray_version()}" in dockerfile and "pip install" in dockerfile

    claim = next(m for m in manifests if m["kind"] == "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "prunetune-shared" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
