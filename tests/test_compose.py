"""docker-compose.yml without Docker: every clstr command and CLSTR_* variable in
it is one the `clstr` parser accepts, and the NATS servers form a routed
JetStream cluster (their config checked by the real nats-server)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from clstr.cli import ENV_VARS, build_parser
from clstr.testing import find_nats_server

ROOT = Path(__file__).parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
NATS = {name: s for name, s in SERVICES.items() if str(s.get("image", "")).startswith("nats:")}
CLSTR_IMAGE = next(s["image"] for s in SERVICES.values() if "build" in s)
CLSTR = {name: s for name, s in SERVICES.items() if s.get("image") == CLSTR_IMAGE}
# Shell words that may open a command inside a script line.
_SHELL_KEYWORDS = {"do", "then", "else", "while", "until", "if", "!"}


def dockerfile_entrypoint() -> list[str]:
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("ENTRYPOINT"):
            entrypoint: list[str] = json.loads(line.removeprefix("ENTRYPOINT"))
            return entrypoint
    raise AssertionError("the Dockerfile has no ENTRYPOINT")


def commands_in_script(script: str) -> list[list[str]]:
    """The argv of every simple command in a shell script (lines split at ; && || |)."""
    commands: list[list[str]] = []
    for line in script.replace("$$", "$").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        current: list[str] = []
        for token in [*lexer, ";"]:
            if set(token) <= set(";&|"):
                while current and current[0] in _SHELL_KEYWORDS:
                    current.pop(0)
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
    return commands


def clstr_argvs(service: dict[str, Any]) -> list[list[str]]:
    """Every `clstr` command line the service runs, without the leading `clstr`."""
    entrypoint = service.get("entrypoint", dockerfile_entrypoint())
    entrypoint = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
    command = service.get("command", [])
    command = shlex.split(command) if isinstance(command, str) else list(command)
    if entrypoint == ["clstr"]:
        return [command]
    if entrypoint[:1] in (["/bin/sh"], ["sh"], ["/bin/bash"]) and "-c" in entrypoint:
        script = command[0] if command else entrypoint[entrypoint.index("-c") + 1]
        return [argv[1:] for argv in commands_in_script(script) if argv[0] == "clstr"]
    raise AssertionError(f"unexpected entrypoint {entrypoint}")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


class TestClstrServices:
    @pytest.mark.parametrize("name", sorted(CLSTR))
    def test_commands_and_variables_are_accepted(self, name: str) -> None:
        """Each clstr command of the service parses with the service's environment."""
        service = CLSTR[name]
        env = environment(service)
        unknown = sorted(k for k in env if k.startswith("CLSTR_") and k not in ENV_VARS)
        assert not unknown, f"{name}: variables the clstr command does not read: {unknown}"
        argvs = clstr_argvs(service)
        assert argvs, f"{name} runs no clstr command"
        for argv in argvs:
            try:
                args = build_parser(env).parse_args(argv)
            except SystemExit as exc:
                pytest.fail(f"{name}: `clstr {shlex.join(argv)}` is refused (exit {exc.code})")
            if args.command in ("request", "notify") and args.payload is not None:
                json.loads(args.payload)

    def test_nodes_form_the_static_cluster(self) -> None:
        """One `clstr node` per id of CLSTR_STATIC_NODES, all on every NATS server."""
        ids: list[str] = []
        member_lists: set[tuple[str, ...]] = set()
        for service in CLSTR.values():
            env = environment(service)
            for argv in clstr_argvs(service):
                args = build_parser(env).parse_args(argv)
                assert args.nats_url == [f"nats://{n}:4222" for n in sorted(NATS)]
                if args.command == "node":
                    ids.append(args.node_id)
                    member_lists.add(tuple(args.static_nodes))
                    assert args.metrics_port is not None
        (members,) = member_lists
        assert sorted(ids) == sorted(members) == ["node-1", "node-2", "node-3"]

    def test_client_waits_for_the_cluster_then_sends_requests(self) -> None:
        """The client checks the shard map and then loops over requests."""
        commands = [argv[0] for argv in clstr_argvs(SERVICES["client"])]
        assert commands[0] == "status"
        assert "request" in commands

    def test_image_runs_clstr(self) -> None:
        """The Dockerfile installs the package on python:3.11-slim and runs `clstr`."""
        dockerfile = (ROOT / "Dockerfile").read_text()
        assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M)
        assert "pip install ." in dockerfile
        assert dockerfile_entrypoint() == ["clstr"]


class TestNatsCluster:
    def config(self, name: str) -> str:
        mounts = NATS[name]["configs"]
        (mount,) = mounts
        path = mount["target"]
        command = NATS[name]["command"]
        assert command[command.index("--config") + 1] == path
        content: str = COMPOSE["configs"][mount["source"]]["content"]
        return content

    def test_three_named_servers(self) -> None:
        """Three NATS servers with distinct server names (JetStream clustering needs them)."""
        names = [s["command"][s["command"].index("--name") + 1] for s in NATS.values()]
        assert len(NATS) == 3
        assert sorted(names) == sorted(NATS)

    def test_routes_connect_every_server(self) -> None:
        """Each server's routes reach every server on its cluster port, in one named cluster."""
        for name in NATS:
            config = self.config(name)
            port = re.search(r"cluster\s*\{[^}]*?\bport:\s*(\d+)", config, re.S)
            assert port, config
            routes = re.findall(r"nats-route://([\w.-]+):(\d+)", config)
            assert {host for host, _ in routes} == set(NATS)
            assert {int(p) for _, p in routes} == {int(port.group(1))}
            assert re.search(r"cluster\s*\{[^}]*\bname:\s*\w+", config, re.S)

    def test_jetstream_is_on_with_a_volume(self, tmp_path: Path) -> None:
        """JetStream stores on each server's own volume, and nats-server accepts the config."""
        for name, service in NATS.items():
            config = self.config(name)
            store = re.search(r"jetstream\s*\{[^}]*store_dir:\s*(\S+)", config, re.S)
            assert store, config
            assert any(v.endswith(f":{store.group(1)}") for v in service["volumes"])
            conf = tmp_path / f"{name}.conf"
            conf.write_text(config)
            check = subprocess.run(
                [find_nats_server(), "-t", "-c", str(conf)],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
            assert check.returncode == 0, check.stdout + check.stderr

    def test_nodes_wait_for_healthy_servers(self) -> None:
        """Nodes start once every NATS server reports healthy."""
        for name, service in CLSTR.items():
            if "build" not in service:
                continue
            depends = service["depends_on"]
            assert {k for k, v in depends.items() if v["condition"] == "service_healthy"} == set(
                NATS
            ), name
        for service in NATS.values():
            assert "healthz" in " ".join(service["healthcheck"]["test"])
