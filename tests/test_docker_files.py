"""The cluster files in docker/ parse and call attncache with options that exist."""
import re
import shlex
from pathlib import Path

import yaml

from attncache.cli.cache_cmd import precompute

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def test_rayjob_entrypoint_is_a_valid_precompute_command():
    job = yaml.safe_load((DOCKER / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["attncache", "precompute"]
    ctx = precompute.make_context("precompute", argv[2:], resilient_parsing=False)  # unknown options raise
    assert ctx.params["ray_address"] == "auto" and ctx.params["gpus_per_worker"] == 1.0
    assert ctx.params["device"] == "cuda"  # GPUs reserved are GPUs used
    images = {c["image"] for c in job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]}
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        images |= {c["image"] for c in group["template"]["spec"]["containers"]}
    assert images == {"attncache:gpu"}


def test_cluster_launcher_config_uses_the_image_and_token_auth():
    config = yaml.safe_load((DOCKER / "cluster.yaml").read_text())
    assert config["docker"]["image"].startswith("attncache:")
    assert "-e RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert any("ray start --head" in c and "--include-dashboard=false" in c for c in config["head_start_ray_commands"])
    assert config["head_node_type"] in config["available_node_types"]


def test_dockerfile_builds_on_rays_image_and_installs_what_the_project_ships():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-\$\{VARIANT\}$", text, re.M)
    copied = set(re.findall(r"^COPY --chown=\S+ (\S+)", text, re.M))
    assert {"pipeline", "cli", "storage_schema"} <= copied
    assert "torch==2.14.1" in text and "pip install --no-cache-dir ." in text
