"""The cluster configs in infra/cluster/ and the commands in docs/cluster.md are valid.

- ray-up.yaml: Ray's own cluster schema (ray/autoscaler/ray-schema.json, validated with
  the jsonschema that ray depends on), before and after Ray fills in its AWS defaults the
  way `ray up` does (no cloud call).
- kuberay-rayjob.yaml: no package installable here ships the KubeRay CRDs' OpenAPI schema,
  so this checks the fields the ray.io/v1 RayJob and RayCluster CRDs require and type
  strictly (written down below from the CRD), then hands the cluster spec to Ray's own
  KubeRay autoscaler code, which derives each group's resources as it would in a cluster.
- Every `mergeflow ...` command line in these files parses with the real CLI parser, and
  the merge config in the RayJob's ConfigMap loads as a mergeflow config.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from mergeflow.workflows.cli import _parser
from mergeflow.workflows.config import config_from_dict

REPO = Path(__file__).resolve().parent.parent
RAY_UP = REPO / "infra" / "cluster" / "ray-up.yaml"
RAYJOB = REPO / "infra" / "cluster" / "kuberay-rayjob.yaml"
DOCS = REPO / "docs" / "cluster.md"
SUBCOMMANDS = ("merge", "inspect", "reconstruct", "make-family", "suite")
COMMAND = re.compile(rf"(?<![\w/.-])mergeflow (?:{'|'.join(SUBCOMMANDS)})\b[^'`\n|;&#]*")


def ray_pin() -> str:
    return next(
        line.split("==")[1].strip()
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if line.startswith("ray==")
    )


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def commands_in(text: str) -> list[str]:
    """`mergeflow SUBCOMMAND ARGS...` command lines; a bare `mergeflow merge` is a mention in prose."""
    return [m.strip() for m in COMMAND.findall(text) if len(shlex.split(m)) > 2]


def parse(command: str):
    argv = shlex.split(command)
    assert argv[0] == "mergeflow", command
    try:
        return _parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"not a valid mergeflow command line (see the error above): {command}")


# ------------------------------------------------------------------------ ray up


def test_ray_up_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(RAY_UP.read_text())
    jsonschema.validate(raw, ray_schema())
    prepared = prepare_config(copy.deepcopy(raw))  # merges ray/autoscaler/aws/defaults.yaml, as `ray up` does
    validate_config(prepared)  # the schema again, plus Ray's own checks of a filled-in config

    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types and types["head"]["resources"] == {"CPU": 0}
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    assert prepared["max_workers"] >= sum(t.get("max_workers", 0) for n, t in types.items() if n != "head")
    # Same Ray everywhere: the images' tag is the version mergeflow pins.
    images = [prepared["docker"]["image"]] + [t["docker"]["worker_image"] for t in types.values() if "docker" in t]
    assert images and all(i.startswith(f"rayproject/ray:{ray_pin()}-") for i in images), images
    assert any("gpu" in i for i in images)
    install = " ".join(prepared["setup_commands"])
    assert "-c /home/ray/mergeflow/constraints.txt /home/ray/mergeflow" in install
    assert prepared["file_mounts"]["/home/ray/mergeflow"] == "."


def test_ray_schema_rejects_what_ray_up_would():
    """The validator is not vacuous: misspelled or mistyped keys fail."""
    raw = yaml.safe_load(RAY_UP.read_text())
    misspelled = copy.deepcopy(raw) | {"setup_command": ["true"]}
    wrong_type = copy.deepcopy(raw)
    wrong_type["available_node_types"]["gpu_workers"]["resources"]["GPU"] = "one"
    for bad in (misspelled, wrong_type):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, ray_schema())


# ----------------------------------------------------------------- KubeRay RayJob

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
_ENV = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "value": {"type": "string"},
            "valueFrom": {
                "type": "object",
                "properties": {
                    "secretKeyRef": {
                        "type": "object",
                        "required": ["key", "name"],
                        "properties": {
                            "key": {"type": "string"},
                            "name": {"type": "string"},
                            "optional": {"type": "boolean"},
                        },
                    }
                },
            },
        },
    },
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "image"],
                        "properties": {
                            "name": {"type": "string"},
                            "image": {"type": "string"},
                            "env": _ENV,
                            "resources": {
                                "type": "object",
                                "properties": {
                                    "limits": {"type": "object", "additionalProperties": _QUANTITY},
                                    "requests": {"type": "object", "additionalProperties": _QUANTITY},
                                },
                            },
                            "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"]}},
                            "volumeMounts": {
                                "type": "array",
                                "items": {"type": "object", "required": ["mountPath", "name"]},
                            },
                        },
                    },
                },
                "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
            },
        }
    },
}
# What the ray.io/v1 CRDs require (the union over KubeRay 1.x: older releases also require
# rayStartParams, minReplicas and maxReplicas) and the types they enforce, e.g.
# rayStartParams values are strings: `num-cpus: 0` is refused by the API server.
RAYJOB_REQUIRED = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["entrypoint", "rayClusterSpec"],
            "properties": {
                "entrypoint": {"type": "string"},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "rayClusterSpec": {
                    "type": "object",
                    "required": ["headGroupSpec"],
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["rayStartParams", "template"],
                            "properties": {"rayStartParams": _STR_MAP, "template": _POD_TEMPLATE},
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["groupName", "rayStartParams", "template", "minReplicas", "maxReplicas"],
                                "properties": {
                                    "groupName": {"type": "string"},
                                    "rayStartParams": _STR_MAP,
                                    "template": _POD_TEMPLATE,
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 0},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def rayjob_documents() -> tuple[dict, dict]:
    docs = {d["kind"]: d for d in yaml.safe_load_all(RAYJOB.read_text()) if d}
    assert set(docs) == {"ConfigMap", "RayJob"}
    return docs["RayJob"], docs["ConfigMap"]


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_rayjob_has_what_kuberay_requires():
    job, _ = rayjob_documents()
    jsonschema.validate(job, RAYJOB_REQUIRED)
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray_pin()
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(set(names)) == len(names)

    # The structural check refuses what the CRD refuses.
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, RAYJOB_REQUIRED)


def test_rayjob_cluster_as_rays_kuberay_autoscaler_reads_it():
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    job, _ = rayjob_documents()
    ray_cr = {
        "metadata": {"name": job["metadata"]["name"], "namespace": "default"},
        "spec": job["spec"]["rayClusterSpec"],
    }
    config = _derive_autoscaling_config_from_ray_cr(copy.deepcopy(ray_cr))  # validates against ray-schema.json too
    types = config["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0  # the driver's pod runs no shard
    assert types["cpu"]["resources"]["CPU"] == 8 and "GPU" not in types["cpu"]["resources"]
    assert types["gpu"]["resources"]["GPU"] == 1
    assert config["max_workers"] == sum(g["maxReplicas"] for g in ray_cr["spec"]["workerGroupSpecs"])


def test_rayjob_credentials_config_and_tracking():
    job, config_map = rayjob_documents()
    spec = job["spec"]["rayClusterSpec"]
    for c in containers(spec):
        env = {e["name"]: e for e in c.get("env", [])}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # on every pod, from the Secret only
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "mergeflow-s3", "key": key}, c["name"]
            assert "value" not in env[key]
    head = spec["headGroupSpec"]["template"]["spec"]
    head_env = {e["name"]: e.get("value") for e in head["containers"][0]["env"]}
    assert head_env["MLFLOW_TRACKING_URI"].startswith("http")

    # The entrypoint's config file is the ConfigMap's key, mounted on the head.
    args = parse(job["spec"]["entrypoint"])
    assert args.command == "merge" and args.ray_address == "auto"
    mount = head["containers"][0]["volumeMounts"][0]
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    key = Path(args.config).relative_to(mount["mountPath"]).as_posix()
    raw = yaml.safe_load(config_map["data"][key])
    cfg = config_from_dict(raw)
    assert all(u.startswith("s3://") for u in [cfg.base, cfg.output, *(t.checkpoint for t in cfg.tasks)])


# ------------------------------------------------------------- commands in docs


@pytest.mark.parametrize("path", [RAY_UP, RAYJOB, DOCS], ids=lambda p: p.name)
def test_mergeflow_commands_parse(path):
    commands = commands_in(path.read_text())
    assert commands, f"{path.name}: no mergeflow command found"
    for command in commands:
        parse(command)


def test_command_pattern_catches_bad_flags():
    found = commands_in("runs `mergeflow merge` as: ray exec c.yaml 'mergeflow merge m.yaml --ray-adress auto'")
    assert found == ["mergeflow merge m.yaml --ray-adress auto"]
    with pytest.raises(pytest.fail.Exception):
        parse(found[0])
