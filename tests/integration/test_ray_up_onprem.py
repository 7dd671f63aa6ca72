"""End to end on this machine: `ray up` with deploy/cluster-onprem.yaml pointed at 127.0.0.1.

An sshd of our own (127.0.0.1, a free port, a throwaway host key and user key, its own config and
PID file; HOME of the session set to a temp dir, so Ray's files and the synced repo land there, not
in the user's home) stands in for an on-prem host. The shipped config is used with only the host,
the SSH auth and the cluster name replaced; its setup and start commands run as written, with
site settings (free ports, this checkout's venv, BILEVEL_INSTALL=skip: no network installs) in
~/.bilevel/env, which the node scripts read. The head start commands minus `service.sh start`:
the service is started with `ray exec`. Jobs go in from this process through the client and
results come back; a rolling upgrade (`ray exec ... service.sh upgrade`) replaces `serve` with one
whose config adds a queue served by a handler module that exists only in a temp dir (not synced, on
no node's path): the new serve ships it to the workers as its runtime_env's working_dir, and a
job's result, computed with a token only that module holds, proves a worker ran the shipped copy;
the demo jobs flow again; then `ray down` (whose `ray stop` the installed hook turns into
deploy/ray-node.sh stop) and every process started here is checked gone.

Never `ray stop`, `pkill` or the like: this machine runs other people's clusters. Every process is
stopped by PID (sshd, SSH masters) or through the scoped script (Ray, serve, Redis).

Needs openssh-server, rsync, socat: installed with apt-get when missing and running as root
(CI on a fresh Debian 12); skipped, saying so, otherwise.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from scheduler.client import Client, JobRequest
from scheduler.settings import Settings
from tests.integration.processes import alive, descendants, kill_all, processes_matching

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.prefix) / "bin"
# Debian package -> a file it installs that this test runs.
PACKAGES = {
    "openssh-server": "/usr/sbin/sshd",
    "openssh-client": "ssh",
    "rsync": "rsync",
    "socat": "socat",
}


def _have(binary: str) -> bool:
    return Path(binary).is_file() if binary.startswith("/") else shutil.which(binary) is not None


def ensure_packages() -> None:
    """apt-get install what is missing (as root), or skip with the reason."""
    missing = [pkg for pkg, binary in PACKAGES.items() if not _have(binary)]
    if not missing:
        return
    if os.geteuid() != 0:
        pytest.skip(f"needs {' '.join(missing)} (apt-get install them, or run as root)")
    if shutil.which("apt-get") is None:
        pytest.skip(f"needs {' '.join(missing)} and there is no apt-get to install them")
    # Debian starts services from postinst; policy-rc.d exit code 101 forbids it, so installing
    # openssh-server does not start a system sshd on port 22 (docker images ship the same file).
    policy = Path("/usr/sbin/policy-rc.d")
    created = not policy.exists()
    if created:
        policy.write_text("#!/bin/sh\n# bilevel test: no service starts during apt-get\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    try:
        if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
            # A fresh machine may have no package lists yet.
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
            subprocess.run(install, env=env, capture_output=True, check=True)
    finally:
        if created:
            policy.unlink()
    still = [pkg for pkg, binary in PACKAGES.items() if not _have(binary)]
    assert not still, f"apt-get install did not provide {still}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Host:
    """The stand-in on-prem host: our sshd and the session's HOME."""

    root: Path
    home: Path
    port: int
    user: str
    key: Path
    process: subprocess.Popen[bytes]

    def ssh(self, command: str) -> subprocess.CompletedProcess[str]:
        args = [
            "ssh", "-i", str(self.key),
            "-o", f"ProxyCommand=socat - TCP:127.0.0.1:{self.port}",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            f"{self.user}@127.0.0.1", command,
        ]  # fmt: skip
        return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def host() -> Iterator[Host]:
    ensure_packages()
    # Short: Ray's unix socket paths under root/ray must stay below the 107-byte cap.
    root = Path(tempfile.mkdtemp(prefix="bl6e", dir="/tmp"))
    home = root / "home"
    home.mkdir()
    (home / ".bashrc").write_text("# bilevel e2e test home\n")
    for name in ("host_key", "user_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True
        )
    authorized = root / "authorized_keys"
    authorized.write_text((root / "user_key.pub").read_text())
    authorized.chmod(0o600)
    if os.geteuid() == 0:
        # sshd's privilege-separation directory; Debian creates it only when its service starts.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    port, user = free_port(), getpass.getuser()
    config = root / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {root / 'host_key'}",
                f"PidFile {root / 'sshd.pid'}",
                f"AuthorizedKeysFile {authorized}",
                f"AllowUsers {user}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                # The keys live in a temp dir, not in a home with the modes sshd expects.
                "StrictModes no",
                # Everything Ray and the node scripts write under ~ lands in the temp dir.
                f"SetEnv HOME={home}",
                "PrintMotd no",
                # Ray's SSH runner opens a few connections in parallel (and multiplexes).
                "MaxStartups 50",
                "MaxSessions 50",
                "LogLevel VERBOSE",
            ]
        )
        + "\n"
    )
    log = (root / "sshd.log").open("wb")
    process = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stdout=log, stderr=log
    )
    h = Host(root, home, port, user, root / "user_key", process)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert process.poll() is None, (root / "sshd.log").read_text()
            with socket.socket() as sock, contextlib.suppress(OSError):
                sock.connect(("127.0.0.1", port))
                break
            assert time.monotonic() < deadline, "sshd does not listen"
            time.sleep(0.1)
        out = h.ssh("echo $HOME")
        assert out.returncode == 0, out.stderr + (root / "sshd.log").read_text()
        assert out.stdout.strip() == str(home), "sshd's SetEnv HOME did not apply"
        yield h
    finally:
        # sshd and its per-connection children (a session may outlive the listener otherwise).
        kill_all(descendants({process.pid}))
        process.wait(timeout=10)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def cluster_config(host: Host, name: str) -> dict[str, Any]:
    """deploy/cluster-onprem.yaml pointed at our sshd; commands unchanged except that the head
    start commands leave the service to `ray exec`."""
    config: dict[str, Any] = yaml.safe_load((REPO / "deploy" / "cluster-onprem.yaml").read_text())
    config["cluster_name"] = name
    config["provider"] = {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    config["auth"] = {
        "ssh_user": host.user,
        "ssh_private_key": str(host.key),
        # The head is "127.0.0.1" to Ray; the proxy takes SSH to our sshd's port.
        "ssh_proxy_command": f"socat - TCP:127.0.0.1:{host.port}",
    }
    head = config["head_start_ray_commands"]
    config["head_start_ray_commands"] = [c for c in head if "service.sh start" not in c]
    assert len(config["head_start_ray_commands"]) == len(head) - 1
    return config


def write_site_env(host: Host) -> dict[str, str]:
    """~/.bilevel/env on the "node": this checkout's venv as is, free ports, private dirs."""
    ports = {name: free_port() for name in ("gcs", "client", "agent", "metrics", "redis")}
    tmp = host.root / "t"
    tmp.mkdir()
    settings = {
        "BILEVEL_VENV": str(Path(sys.prefix)),
        "BILEVEL_INSTALL": "skip",
        "BILEVEL_RAY_TEMP_DIR": str(host.root / "ray"),
        "BILEVEL_RAY_PORT": str(ports["gcs"]),
        "BILEVEL_RAY_START_ARGS": (
            "--num-cpus=2 --include-dashboard=false "
            f"--ray-client-server-port={ports['client']} "
            f"--dashboard-agent-listen-port={ports['agent']} "
            f"--metrics-export-port={ports['metrics']}"
        ),
        "BILEVEL_REDIS_PORT": str(ports["redis"]),
        "BILEVEL_REDIS_BIND": "127.0.0.1",
        # The code `ray up` synced to the node, whichever checkout the venv's editable install
        # points at (the same one in CI; another one from a second worktree).
        "PYTHONPATH": str(host.home / "bilevel"),
        # The local provider's state files (cluster-<name>.state), written by the autoscaler on
        # the head, go here instead of /tmp/ray.
        "TMPDIR": str(tmp),
    }
    env_dir = host.home / ".bilevel"
    env_dir.mkdir(mode=0o700)
    (env_dir / "env").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in settings.items()))
    return settings


def run(args: list[str], log: Path, *, timeout_s: float, env: dict[str, str]) -> str:
    """Run a Ray CLI command from the repo root; its output is appended to `log` and returned."""
    with log.open("a") as f:
        f.write(f"\n$ {shlex.join(args)}\n")
    out = subprocess.run(
        args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    with log.open("a") as f:
        f.write(out.stdout + out.stderr)
    assert out.returncode == 0, f"{shlex.join(args)} failed:\n{(out.stdout + out.stderr)[-4000:]}"
    return out.stdout + out.stderr


def read_pid(path: Path) -> int:
    return int(path.read_text().strip())


def check_demo_jobs(client: Client, *, tag: str) -> None:
    """Jobs of the three demo models (deploy/service.yaml) come back with real results."""
    handles = client.submit_many(
        [JobRequest("embed", {"text": f"{tag} {i}"}) for i in range(8)]
        + [JobRequest("classify", {"features": [0.1 * j for j in range(16)]})] * 4
        + [JobRequest("generate", {"prompt": "ray up", "max_tokens": 6})] * 2
    )
    results = [h.result(timeout=120) for h in handles]
    embeddings, labels, texts = results[:8], results[8:12], results[12:]
    assert all(isinstance(e, list) and len(e) == 128 for e in embeddings)
    assert embeddings[0] != embeddings[1]
    assert all(r["label"] in {"negative", "neutral", "positive", "question"} for r in labels)
    # Same prompt, same seeded generator: the same 6 characters every time.
    assert texts[0] == texts[1]
    assert len(texts[0]) == 6


# A handler module written at test time: its token exists nowhere else, so a result computed with
# it can only come from a worker that imported this module.
TOKEN_HANDLERS = """
import hashlib

from workers.registry import REGISTRY

TOKEN = {token!r}


@REGISTRY.handler("stamp", loader=lambda: TOKEN)
def stamp(token, payload):
    digest = hashlib.sha256((token + payload["text"]).encode()).hexdigest()
    return {{"digest": digest, "file": __file__}}
"""


def write_own_service(directory: Path, token: str) -> Path:
    """deploy/service.yaml plus a queue served by ./token_handlers.py, both in `directory` (a temp
    dir on the head, synced nowhere); no runtime_env: serve ships the directory by default."""
    directory.mkdir()
    (directory / "token_handlers.py").write_text(TOKEN_HANDLERS.format(token=token))
    config: dict[str, Any] = yaml.safe_load((REPO / "deploy" / "service.yaml").read_text())
    config["handlers"] = ["workers.demo_models", "./token_handlers.py"]
    config["queues"].append({"name": "stamps", "job_types": ["stamp"], "min_workers": 1})
    config["allocation"]["budget"] += 1
    path = directory / "my_service.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def check_own_handler(client: Client, *, token: str, ray_temp: Path) -> None:
    """Jobs of the temp-dir handler: the digest needs its token, the file is Ray's unpacked copy."""
    texts = [f"stamp {i}" for i in range(4)]
    results = client.gather(client.submit_many([JobRequest("stamp", {"text": t}) for t in texts]),
                            timeout=120)  # fmt: skip
    for text, result in zip(texts, results, strict=True):
        assert result["digest"] == hashlib.sha256((token + text).encode()).hexdigest()
        shipped = Path(result["file"])
        assert shipped.name == "token_handlers.py"
        assert shipped.is_relative_to(ray_temp), shipped
        assert "/runtime_resources/working_dir_files/_ray_pkg_" in str(shipped)


def test_ray_up_onprem_end_to_end(host: Host) -> None:
    """ray up -> ray exec service.sh start -> jobs from outside -> rolling upgrade -> jobs ->
    ray down -> nothing left."""
    started = time.monotonic()
    name = f"bl6e2e-{uuid.uuid4().hex[:8]}"
    settings = write_site_env(host)
    cfg = host.root / "cluster.yaml"
    cfg.write_text(yaml.safe_dump(cluster_config(host, name)))
    log = host.root / "ray-cli.log"
    ray_cli = str(VENV_BIN / "ray")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "BILEVEL_"))}
    env |= {"TMPDIR": settings["TMPDIR"], "RAY_USAGE_STATS_ENABLED": "0"}
    node_env = {**env, "HOME": str(host.home)}
    node_script = str(REPO / "deploy" / "ray-node.sh")
    # Ray's SSH multiplexing masters for this cluster (ControlPersist keeps them ~10 s).
    user_hash = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    control_dir = f"/tmp/ray_ssh_{user_hash}/{hashlib.sha256(name.encode()).hexdigest()[:10]}"
    tracked: set[int] = set()
    went_down = False
    try:
        run([ray_cli, "up", str(cfg), "--yes", "--no-config-cache"], log, timeout_s=240, env=env)
        ray_temp = Path(settings["BILEVEL_RAY_TEMP_DIR"])
        assert (ray_temp / "ray_current_cluster").is_file(), "the head did not start Ray"
        # The setup commands (install.sh) installed the hook that scopes `ray down`'s `ray stop`.
        hook = run(
            [ray_cli, "exec", str(cfg), "type -t ray", "--no-config-cache"],
            log,
            timeout_s=60,
            env=env,
        )
        assert "function" in hook.split(), "`ray` is not the scoped hook on the head"

        run(
            [ray_cli, "exec", str(cfg), "bash ~/bilevel/deploy/service.sh start"],
            log,
            timeout_s=180,
            env=env,
        )
        state = host.home / ".bilevel"
        serve_pid, redis_pid = read_pid(state / "serve.pid"), read_pid(state / "redis.pid")
        assert "bilevel" in Path(f"/proc/{serve_pid}/cmdline").read_bytes().decode()
        assert "redis-server" in Path(f"/proc/{redis_pid}/cmdline").read_bytes().decode()
        ray_pids = subprocess.run(
            ["bash", node_script, "pids"], env=node_env, capture_output=True, text=True, check=True
        ).stdout.split()
        assert len(ray_pids) >= 3, "expected gcs_server, raylet and more"
        tracked |= {serve_pid, redis_pid, *map(int, ray_pids)}
        url = (state / "redis.url").read_text().strip()
        assert url.startswith("redis://:")
        assert f":{settings['BILEVEL_REDIS_PORT']}/" in url

        # The client, from outside the cluster: the URL is all it needs (namespace from the
        # service config).
        with Client(url, settings=Settings.from_url(url, namespace="demo")) as client:
            check_demo_jobs(client, tag="before")
            # Rolling restart onto a config with a handler of our own: a standby serve starts
            # (shipping the handler's directory), the old one drains and exits, the standby takes
            # over; Redis and the queued state stay.
            token = uuid.uuid4().hex
            own_config = write_own_service(host.root / "own", token)
            upgrade = (
                f"BILEVEL_SERVICE_CONFIG={own_config} bash ~/bilevel/deploy/service.sh upgrade"
            )
            run([ray_cli, "exec", str(cfg), upgrade], log, timeout_s=240, env=env)
            new_serve_pid = read_pid(state / "serve.pid")
            assert new_serve_pid != serve_pid
            assert not alive(serve_pid), "the old serve did not exit after the upgrade"
            tracked.add(new_serve_pid)
            serve_log = (state / "serve.log").read_text()
            assert f"shipping {host.root / 'own'} to every node as runtime_env.working_dir" in (
                serve_log
            ), serve_log[-3000:]
            check_own_handler(client, token=token, ray_temp=ray_temp)
            check_demo_jobs(client, tag="after")
        # Workers the controller started since: the Ray pid list grew (actors are Ray workers).
        ray_pids_now = subprocess.run(
            ["bash", node_script, "pids"], env=node_env, capture_output=True, text=True, check=True
        ).stdout.split()
        tracked |= set(map(int, ray_pids_now))

        run([ray_cli, "down", str(cfg), "--yes"], log, timeout_s=180, env=env)
        went_down = True
        log_text = log.read_text()
        assert "service: stopped" in log_text, "ray down did not run the scoped stop"
        deadline = time.monotonic() + 30
        while any(alive(p) for p in tracked) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in tracked if alive(p)], "processes survived ray down"
        assert not subprocess.run(
            ["bash", node_script, "pids"], env=node_env, capture_output=True, text=True, check=True
        ).stdout.split()
        assert time.monotonic() - started < 300
    finally:
        if not went_down:
            # Failure path: the same scoped stop `ray down` runs (service, Redis, Ray).
            subprocess.run(["bash", node_script, "stop"], env=node_env, check=False, timeout=180)
        kill_all(descendants(processes_matching(control_dir) | processes_matching(str(host.root))))
        leftover = [p for p in tracked if alive(p)]
        shutil.rmtree(control_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # Ray's per-user parent dir, only if now empty
            os.rmdir(os.path.dirname(control_dir))
        assert not leftover, f"still running after teardown: {leftover}"
        print(f"ray up end-to-end: {time.monotonic() - started:.0f} s")
