"""Everything in deploy/ is valid for the tool that reads it, and the node scripts stop only their own.

Ray cluster configs: the schema inside the installed Ray, then Ray's own config preparation (the
steps `ray up` runs before it launches anything). service.yaml: ServiceConfig. The KubeRay manifest:
its structure. Shell scripts: `bash -n`. ray-node.sh's `stop`: against real processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import ray
import yaml

from scheduler.config import ServiceConfig

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"

YAMLS = sorted(DEPLOY.glob("*.yaml")) + sorted(DEPLOY.glob("*.yml"))


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path.name}: top level is not a mapping"
    return data


def kind_of(data: dict[str, Any]) -> str:
    if "provider" in data and "cluster_name" in data:
        return "ray-cluster"
    if data.get("kind") == "RayCluster":
        return "kuberay"
    if "queues" in data:
        return "service"
    return "unknown"


CLUSTERS = [p for p in YAMLS if kind_of(load(p)) == "ray-cluster"]


def test_every_yaml_in_deploy_is_known() -> None:
    """Each YAML is a Ray cluster config, a service config or the KubeRay manifest (and so is
    checked below); the expected ones are all there."""
    kinds = {p.name: kind_of(load(p)) for p in YAMLS}
    assert "unknown" not in kinds.values(), kinds
    assert kinds["cluster-onprem.yaml"] == "ray-cluster"
    assert kinds["cluster-aws.yaml"] == "ray-cluster"
    assert kinds["service.yaml"] == "service"
    assert kinds["kuberay-raycluster.yaml"] == "kuberay"


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_cluster_config_matches_rays_schema(path: Path) -> None:
    """The file as written validates against ray/autoscaler/ray-schema.json of the installed Ray."""
    schema = json.loads(RAY_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.validate(load(path), schema)


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_cluster_config_survives_rays_preparation(path: Path) -> None:
    """Ray's own steps before `ray up` launches: defaults merged (and, for the local provider, the
    on-prem rewrite), then its validation, which also checks the merged config against the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(load(path))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_cluster_commands_are_scoped_and_use_the_repo_scripts(path: Path) -> None:
    """No command runs `ray stop` (it would stop every Ray on a shared host); every script named
    exists; the head starts Ray, then the service; the repo is synced to ~/bilevel."""
    config = load(path)
    commands: list[str] = []
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        commands += config.get(key, [])
    for node_type in config.get("available_node_types", {}).values():
        commands += node_type.get("worker_setup_commands", [])
    head, worker = config["head_start_ray_commands"], config["worker_start_ray_commands"]
    commands += head + worker
    for command in commands:
        assert "ray stop" not in command, command
        for script in re.findall(r"~/bilevel/(deploy/[\w.-]+\.sh)", command):
            assert (REPO / script).is_file(), f"{command!r}: {script} does not exist"
    assert any("install.sh" in c for c in config["setup_commands"])
    assert "ray-node.sh start-head" in head[0]
    assert any("service.sh start" in c for c in head[1:])
    assert all("ray-node.sh start-worker" in c for c in worker)
    assert config["file_mounts"]["~/bilevel"] == "."
    assert ".venv" in config["rsync_exclude"]


def test_aws_has_head_cpu_and_gpu_node_types() -> None:
    """Head (no CPU for model workers), CPU workers, GPU workers with GPUs, all with an image."""
    config = load(DEPLOY / "cluster-aws.yaml")
    types = config["available_node_types"]
    assert config["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 0}
    assert types["cpu_worker"]["resources"]["CPU"] > 0
    assert "GPU" not in types["cpu_worker"]["resources"]
    assert types["gpu_worker"]["resources"]["GPU"] >= 1
    assert types["gpu_worker"]["max_workers"] >= 1
    for node_type in types.values():
        assert node_type["node_config"]["ImageId"]
        assert node_type["node_config"]["InstanceType"]
    gpu_setup = " ".join(types["gpu_worker"]["worker_setup_commands"])
    assert "BILEVEL_TORCH_INDEX=pypi" in gpu_setup


def test_onprem_uses_the_local_provider_with_listed_hosts() -> None:
    """Ray's `local` provider with a head IP, worker IPs and SSH auth."""
    config = load(DEPLOY / "cluster-onprem.yaml")
    assert config["provider"]["type"] == "local"
    assert config["provider"]["head_ip"]
    assert config["provider"]["worker_ips"]
    assert config["auth"]["ssh_user"]
    assert config["auth"]["ssh_private_key"]


def test_service_yaml_is_a_valid_service_config() -> None:
    """deploy/service.yaml loads through ServiceConfig (the validation `bilevel serve` runs)."""
    config = ServiceConfig.load(DEPLOY / "service.yaml")
    assert config.queues
    assert config.allocation.budget >= sum(q.min_workers for q in config.queues)


def test_kuberay_manifest_structure() -> None:
    """A ray.io/v1 RayCluster: head runs `bilevel serve`, CPU and GPU worker groups, our image,
    BILEVEL_REDIS_URL from a Secret everywhere, GPU limits on the GPU group."""
    doc = load(DEPLOY / "kuberay-raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == "RayCluster"
    spec = doc["spec"]
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    head_container = head["template"]["spec"]["containers"][0]
    assert "bilevel serve" in " ".join(head_container["args"])
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict)
    containers = [head_container] + [
        g["template"]["spec"]["containers"][0] for g in groups.values()
    ]
    for container in containers:
        assert container["image"].split(":")[0].endswith("bilevel")
        env = {e["name"]: e for e in container["env"]}
        assert env["BILEVEL_REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"]
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1"
    assert (
        "nvidia.com/gpu"
        not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    )


def test_dockerfile_pins_and_user() -> None:
    """python:3.11-slim, constraints.txt, the torch CPU index by default, a non-root user,
    `bilevel` as the entrypoint. (No Docker engine here: the build itself is not run.)"""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert "-c constraints.txt" in text
    assert "download.pytorch.org/whl/cpu" in text
    assert re.search(r"^ARG TORCH_INDEX=cpu$", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users
    assert users[-1] not in {"root", "0"}
    assert re.search(r'^ENTRYPOINT \["bilevel"\]$', text, re.M)
    ignored = (REPO / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".venv", ".git"} <= set(ignored)


@pytest.mark.parametrize("script", sorted(DEPLOY.glob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts_parse(script: Path) -> None:
    """bash -n: every deploy script is valid bash."""
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


# -- ray-node.sh stop: only this cluster's processes -------------------------------------------


def _spawn(temp_dir: str) -> subprocess.Popen[bytes]:
    """A stand-in for a Ray daemon of `temp_dir`: its command line names the temp dir, and it has a
    child whose own command line does not (like the raylet's workers)."""
    return subprocess.Popen(
        ["bash", "-c", "sleep 300 & wait", "ray-standin", f"--temp-dir={temp_dir}"],
        start_new_session=True,
    )


def _children(pid: int) -> list[int]:
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            out.append(int(fields["Pid"]))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return "\nState:\tZ" not in f.read()
    except OSError:
        return False


@pytest.fixture
def standins(
    tmp_path: Path,
) -> Iterator[tuple[str, subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    ours_dir = str(tmp_path / "ray")
    # A prefix of ours: a naive substring match would take it for ours.
    other_dir = ours_dir + "-other"
    ours, other = _spawn(ours_dir), _spawn(other_dir)
    try:
        yield ours_dir, ours, other
    finally:
        for proc in (ours, other):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_ray_node_stop_ends_only_its_cluster(
    tmp_path: Path, standins: tuple[str, subprocess.Popen[bytes], subprocess.Popen[bytes]]
) -> None:
    """`ray-node.sh stop` ends the processes naming its temp dir and their children; a process of
    another temp dir (even one with the same prefix) survives."""
    temp_dir, ours, other = standins
    deadline = time.monotonic() + 10
    while not (_children(ours.pid) and _children(other.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    our_child = _children(ours.pid)[0]
    env = {
        **os.environ,
        "BILEVEL_RAY_TEMP_DIR": temp_dir,
        "BILEVEL_STATE_DIR": str(tmp_path / "state"),
        "HOME": str(tmp_path),
    }
    script = str(DEPLOY / "ray-node.sh")
    listed = subprocess.run(
        ["bash", script, "pids"], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert sorted(map(int, listed)) == sorted([ours.pid, our_child])
    out = subprocess.run(
        ["bash", script, "stop"], env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    ours.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _alive(our_child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(our_child)
    assert other.poll() is None
    assert all(_alive(c) for c in _children(other.pid))


def test_ray_hook_turns_ray_stop_into_the_scoped_stop(tmp_path: Path) -> None:
    """After `install-hook`, `ray stop` in a shell that sources ~/.bashrc (as Ray's SSH runner
    does, and so `ray down`) runs ray-node.sh stop; other subcommands go to the venv's ray."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake_ray = venv / "bin" / "ray"
    fake_ray.write_text('#!/bin/sh\necho "venv ray $*"\n')
    fake_ray.chmod(0o755)
    env = {
        **os.environ,
        # The fake ray first on PATH: should the hook ever fail to load, `ray stop` below reaches
        # the fake (and the assertion fails), never a real ray that would stop this host's clusters.
        "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}",
        "HOME": str(tmp_path),
        "BILEVEL_VENV": str(venv),
        "BILEVEL_RAY_TEMP_DIR": str(tmp_path / "no-such-cluster"),
        "BILEVEL_STATE_DIR": str(tmp_path / "state"),
    }
    script = str(DEPLOY / "ray-node.sh")
    for _ in range(2):  # idempotent: one block after two installs
        subprocess.run(["bash", script, "install-hook"], env=env, check=True, capture_output=True)
    bashrc = (tmp_path / ".bashrc").read_text()
    assert bashrc.count(">>> bilevel ray-node >>>") == 1

    def shell(command: str) -> str:
        return subprocess.run(
            ["bash", "-c", f"source ~/.bashrc; {command}"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    assert "no Ray processes of" in shell("ray stop")
    assert shell("ray status --verbose").strip() == "venv ray status --verbose"
