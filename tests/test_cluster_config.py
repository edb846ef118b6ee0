"""ray_cluster.yaml passes Ray's own launcher validation, and the docs name real configs.

`ray up` prepares the YAML (merges the provider's defaults) and validates it against
ray/autoscaler/ray-schema.json; the same two calls run here, offline (without the AWS
resource auto-detection `ray up` adds, which is why the node types state their resources).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "ray_cluster.yaml"


def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def validate(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_ray_validates_the_cluster_config():
    prepared = validate(cluster_config())
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_the_validation_catches_mistakes():
    """The check is real: a missing required field or an unknown key fails it."""
    config = cluster_config()
    del config["available_node_types"]["gpu_worker"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        validate(config)
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate({**cluster_config(), "max_worker": 24})


def test_max_workers_does_not_cap_the_node_types():
    config = cluster_config()
    types = config["available_node_types"]
    workers = sum(t.get("max_workers", 0) for name, t in types.items() if name != config["head_node_type"])
    assert config["max_workers"] >= workers, (
        f"top-level max_workers {config['max_workers']} caps the node types' {workers} workers")
    assert types["gpu_worker"]["resources"]["GPU"] == 8  # one embed replica / index shard per GPU


def test_start_commands_raise_the_file_limit_and_keep_the_dashboard_local():
    config = cluster_config()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts, key
        for command in starts:
            # The same line: each command runs in its own shell.
            assert re.search(r"ulimit -n \d+\s*;.*ray start", command), command
            assert "RAY_AUTH_MODE=token" in command, command
            assert "0.0.0.0" not in command and "--dashboard-host" not in command, command


def test_file_mounts_exist_locally():
    for remote, local in cluster_config()["file_mounts"].items():
        if local.startswith("~"):
            continue  # the user's token, made by `ray get-auth-token --generate` (docs/cluster.md)
        assert (ROOT / local).exists(), f"file_mounts {remote}: {local} does not exist"


def named_configs(text: str) -> set[str]:
    return set(re.findall(r"configs/[\w.-]+\.ya?ml", text))


@pytest.mark.parametrize("path", ["ray_cluster.yaml", "README.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_named_configs_exist(path):
    for name in named_configs((ROOT / path).read_text()):
        assert (ROOT / name).exists(), f"{path} names {name}, which does not exist"


def test_the_cluster_config_and_its_doc_name_a_config():
    assert named_configs(CLUSTER_YAML.read_text())
    assert named_configs((ROOT / "docs" / "cluster.md").read_text())
