"""ray_cluster.yaml and the run presets in pipeline/configs/, checked offline.

How the cluster file is validated (Ray 2.60, ray/autoscaler/_private/util.py):
- `prepare_config` merges the file over the provider's defaults.yaml shipped in the wheel
  (ray/autoscaler/aws/defaults.yaml: a shallow top-level `dict.update`), prepends
  `setup_commands` to the head and worker setup commands, checks the docker section and fills each
  node type's min/max_workers. It only reads files from the wheel: no boto3 (not even installed
  here), no credentials, no network. The AWS-side steps of `ray up` (IAM role, security groups,
  subnets, key pair, AMI and instance-type lookups) happen later in `_bootstrap_config`, which we
  do not call. The `no_network` fixture makes any socket use fail, to keep it that way.
- `validate_config` checks the prepared dict against ray/autoscaler/ray-schema.json with
  jsonschema (no unknown keys at the top level or in a node type, types of every field), then that
  `head_node_type` is one of `available_node_types` and that `max_workers` >= the sum of
  `min_workers`. It needs the prepared dict: the raw file lacks `cluster_synced_files`.
- The schema is JSON Schema draft-07, where `"type": "integer"` accepts 1.0. Ray wants integer
  resources, so the project checks below test `type(value) is int` themselves.
What stays unchecked offline: that the AMI id, instance types and quotas exist in the region.
"""
from __future__ import annotations

import copy
import re
import socket
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline.config import CONFIG_DIR, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "ray_cluster.yaml"

# What each instance type we use really has: declared resources must not exceed it, or Ray
# schedules work that the machine cannot run. Add a row when ray_cluster.yaml uses a new type.
INSTANCE_SPECS = {  # type: (vCPUs, GPUs)
    "c7i.8xlarge": (32, 0),
    "c7i.16xlarge": (64, 0),
    "g6.4xlarge": (16, 1),
    "p5.48xlarge": (192, 8),
}


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("cluster config validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def raw_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def prepared(config: dict) -> dict:
    return prepare_config(copy.deepcopy(config))


def check(config: dict) -> dict:
    """What `ray up` checks before it talks to the cloud; returns the prepared config."""
    full = prepared(config)
    validate_config(full)
    return full


# ---- project checks: each returns a list of problems (empty = fine) ------------------------------


def non_int_resources(config: dict) -> list[str]:
    return [
        f"{name}.resources.{res} = {value!r} is not an int"
        for name, node in config["available_node_types"].items()
        for res, value in node.get("resources", {}).items()
        if type(value) is not int or value < 0
    ]


def resource_mismatches(config: dict) -> list[str]:
    problems = []
    for name, node in config["available_node_types"].items():
        instance = node["node_config"].get("InstanceType")
        if instance not in INSTANCE_SPECS:
            problems.append(f"{name}: add {instance!r} to INSTANCE_SPECS in this test")
            continue
        vcpus, gpus = INSTANCE_SPECS[instance]
        res = node.get("resources", {})
        if not 0 < res.get("CPU", 0) <= vcpus:
            problems.append(f"{name}: CPU {res.get('CPU')} must be in 1..{vcpus} on {instance}")
        if res.get("GPU", 0) != gpus:
            problems.append(f"{name}: GPU {res.get('GPU', 0)} but {instance} has {gpus} GPUs")
    return problems


def effective_setup(full: dict, node_type: str) -> list[str]:
    """The commands a node of this type runs (a node type's own worker_setup_commands replace
    the global setup_commands + worker_setup_commands)."""
    if node_type == full["head_node_type"]:
        return full["head_setup_commands"]
    return full["available_node_types"][node_type].get("worker_setup_commands", full["worker_setup_commands"])


def project_dirs(config: dict) -> list[str]:
    """Remote paths that file_mounts fill from this checkout."""
    return [
        remote.rstrip("/")
        for remote, local in config["file_mounts"].items()
        if (ROOT / Path(local).expanduser()).resolve() == ROOT
    ]


def setup_problems(full: dict) -> list[str]:
    problems = []
    dirs = project_dirs(full)
    for name in full["available_node_types"]:
        commands = " ; ".join(effective_setup(full, name))
        if "python3.11 -m venv" not in commands:
            problems.append(f"{name}: setup makes no python3.11 venv")
        if not any(re.search(rf"cd {re.escape(d)}\b.*pip install -e \.", commands) for d in dirs):
            problems.append(f"{name}: setup does not `pip install -e .` the mounted project {dirs}")
    return problems


# ---- the real file passes ------------------------------------------------------------------------


def test_cluster_yaml_passes_rays_own_validation(no_network):
    full = check(raw_config())
    assert full["provider"]["type"] == "aws"


def test_resources_are_integers():
    assert non_int_resources(raw_config()) == []


def test_resources_match_the_instance_types():
    assert resource_mismatches(raw_config()) == []


def test_gpu_node_types_declare_gpus():
    types = raw_config()["available_node_types"]
    gpu_types = {name for name, node in types.items() if node["resources"].get("GPU", 0) > 0}
    # One small-GPU type for CLIP/VAE, one 8-GPU type for LLM serving and training.
    assert {types[n]["resources"]["GPU"] for n in gpu_types} >= {1, 8}
    for name in gpu_types:
        accel = [r for r in types[name]["resources"] if r.startswith("accelerator_type:")]
        assert len(accel) == 1, f"{name} should declare the accelerator_type:<GPU> resource Ray reports"


def test_head_is_a_cpu_node_type_that_never_scales():
    config = raw_config()
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head.get("max_workers", 0) == 0
    assert any(n["resources"].get("GPU", 0) == 0 for k, n in config["available_node_types"].items()
               if k != config["head_node_type"]), "a CPU worker type scales decode out"


def test_worker_bounds(no_network):
    full = check(raw_config())
    types = full["available_node_types"]
    assert full["max_workers"] >= sum(n["min_workers"] for n in types.values())
    for name, node in types.items():
        assert 0 <= node["min_workers"] <= node["max_workers"], name


def test_every_node_type_installs_this_project(no_network):
    full = check(raw_config())
    assert project_dirs(full), "file_mounts must sync this checkout (local path '.') to the nodes"
    assert setup_problems(full) == []


def test_sync_skips_ignored_files():
    config = raw_config()
    assert ".gitignore" in config.get("rsync_filter", [])
    assert ".venv/" in (ROOT / ".gitignore").read_text().split()


def test_head_can_launch_workers(no_network):
    # Our head_setup_commands replace Ray's default, which is where boto3 came from.
    full = check(raw_config())
    assert any("pip install boto3" in c for c in full["head_setup_commands"])


def test_start_commands_use_token_auth_and_the_autoscaler():
    config = raw_config()
    head, worker = config["head_start_ray_commands"], config["worker_start_ray_commands"]
    assert "ray stop" in head[0] and "ray stop" in worker[0]
    start = head[-1]
    assert "ray start --head" in start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start
    assert re.search(r"--dashboard-host[= ]0\.0\.0\.0", start)
    assert "--address=$RAY_HEAD_IP:6379" in worker[-1]
    for command in (head[-1], worker[-1]):
        assert "RAY_AUTH_MODE=token" in command
    assert "~/.ray/auth_token" in config["file_mounts"], "every node needs the cluster's token"


def test_nodes_install_the_pins_of_this_checkout():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = pyproject["project"]["dependencies"]
    torch_pin = next(d for d in deps if d.startswith("torch=="))
    vision_pin = next(d for d in deps if d.startswith("torchvision=="))
    ray_pin = next(d for d in deps if d.startswith("ray["))
    setup = " ; ".join(raw_config()["setup_commands"])
    assert f'"{torch_pin}"' in setup, "torch preinstalled on nodes must satisfy pyproject's pin"
    assert f'"{vision_pin}"' in setup, "CPU nodes need torchvision from the same (CPU) index as torch"
    # `pip install -e .` gives the nodes pyproject's Ray; `ray up` wants the same Ray here.
    major_minor = ".".join(ray.__version__.split(".")[:2])
    assert ray_pin.endswith(f"=={major_minor}.*"), (ray_pin, ray.__version__)


# ---- mutated copies fail: the checks above can fail ----------------------------------------------


def _float_gpu(c):
    c["available_node_types"]["gpu_l4"]["resources"]["GPU"] = 0.5


def _unknown_top_level_key(c):
    c["max_wrokers"] = 3


def _unknown_node_type_key(c):
    c["available_node_types"]["cpu_decode"]["instance_type"] = "c7i.16xlarge"


def _missing_head_type(c):
    c["head_node_type"] = "head_gpu"


def _min_workers_over_max(c):
    c["available_node_types"]["cpu_decode"]["min_workers"] = c["max_workers"] + 1
    c["available_node_types"]["cpu_decode"]["max_workers"] = c["max_workers"] + 1


def _string_resource(c):
    c["available_node_types"]["gpu_h100x8"]["resources"]["GPU"] = "8"


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (_float_gpu, jsonschema.ValidationError, "0.5 is not of type 'integer'"),
        (_unknown_top_level_key, jsonschema.ValidationError, "'max_wrokers' was unexpected"),
        (_unknown_node_type_key, jsonschema.ValidationError, "'instance_type' was unexpected"),
        (_string_resource, jsonschema.ValidationError, "'8' is not of type 'integer'"),
        (_missing_head_type, ValueError, "must be one of `available_node_types`"),
        (_min_workers_over_max, ValueError, "smaller than the sum of `min_workers`"),
    ],
    ids=["float_gpu", "unknown_top_level_key", "unknown_node_type_key", "string_resource",
         "missing_head_type", "min_workers_over_max"],
)
def test_ray_validation_rejects_broken_copies(no_network, mutate, error, match):
    config = raw_config()
    mutate(config)
    with pytest.raises(error, match=re.escape(match)):
        check(config)


def test_integral_float_passes_the_schema_but_not_our_check(no_network):
    config = raw_config()
    config["available_node_types"]["gpu_l4"]["resources"]["GPU"] = 1.0
    check(config)  # draft-07 "integer" accepts 1.0
    assert non_int_resources(config) == ["gpu_l4.resources.GPU = 1.0 is not an int"]


def test_project_checks_catch_broken_copies(no_network):
    config = raw_config()
    config["available_node_types"]["gpu_l4"]["resources"]["GPU"] = 4
    assert resource_mismatches(config) == ["gpu_l4: GPU 4 but g6.4xlarge has 1 GPUs"]

    # A node type with its own worker_setup_commands drops the global setup_commands.
    config = raw_config()
    config["available_node_types"]["gpu_h100x8"]["worker_setup_commands"] = ["echo hi"]
    problems = setup_problems(check(config))
    assert len(problems) == 2 and all(p.startswith("gpu_h100x8:") for p in problems)


# ---- run presets ---------------------------------------------------------------------------------

PRESETS = sorted([*CONFIG_DIR.glob("*.yaml"), *CONFIG_DIR.glob("*.yml")])


def test_cluster_preset_exists():
    assert CONFIG_DIR / "cluster.yaml" in PRESETS


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_validates(path):
    config = load_config(path)  # pydantic, extra="forbid": a misspelt key fails here
    assert config.stages, path


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_names_registered_stages(path):
    registry = pytest.importorskip("pipeline.registry")
    stages = load_config(path).stages
    unknown = [s for s in stages if s not in registry.STAGES]
    assert unknown == [], f"{path.name}: unknown stages {unknown}"


def test_cluster_preset_values():
    config = load_config("cluster")
    assert config.runner.engine == "ray"
    assert config.runner.progress_bars is True
    assert config.writer.samples_per_shard == 512
