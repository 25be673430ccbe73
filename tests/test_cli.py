"""The clstr command in-process: parsing, request/notify/status against a live
cluster, error reporting, the lazily loaded bench command, --app loading, and
the commands the README tour and docs/cli.md show, run as they show them.

Commands run through ``clstr.cli.main`` in a worker thread (each command runs
its own event loop), against nodes started in the test's loop.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import textwrap
import types
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import structlog

from clstr import Envelope, KeyHandler, Router, errors, shard_for_key
from clstr.cli import ENV_VARS, build_parser, main
from clstr.demo_app import MESSAGE_TYPES, app
from clstr.discovery import ServiceDiscovery
from clstr.testing import NatsServer, TestCluster, create_test_cluster
from clstr.transports.nats import NatsTransport

NODE_IDS = ["node-1", "node-2", "node-3"]
NUM_SHARDS = 16
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Output:
    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("clstr: error:")]


def assert_usage_error(result: Output, *needles: str) -> None:
    """Exit code 2 and one `clstr: error:` line naming the problem, no traceback."""
    assert result.code == 2, result
    assert len(result.error_lines) == 1, result.err
    assert "Traceback" not in result.err
    for needle in needles:
        assert needle in result.error_lines[0]


@dataclass
class Live:
    """A running 3-node cluster of the demo app with discovery, and how to call the CLI on it."""

    cluster: TestCluster
    url: str
    prefix: str
    service: str
    capsys: pytest.CaptureFixture[str]

    async def run(self, *argv: str, prefix: str | None = None) -> Output:
        self.capsys.readouterr()
        code = await asyncio.to_thread(
            main,
            [
                "--nats-url",
                self.url,
                "--shards",
                str(NUM_SHARDS),
                "--prefix",
                prefix or self.prefix,
                "--service-name",
                self.service,
                *argv,
            ],
        )
        captured = self.capsys.readouterr()
        return Output(code, captured.out, captured.err)


@pytest_asyncio.fixture
async def live(
    clstr_nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> AsyncIterator[Live]:
    """The demo app on three nodes under a prefix and service name of this test's own."""
    tag = uuid.uuid4().hex[:8]
    prefix, service = f"cli{tag}", f"cli-{tag}"
    cluster = create_test_cluster(
        clstr_nats_server.url,
        NODE_IDS,
        num_shards=NUM_SHARDS,
        handler_factory=app,
        prefix=prefix,
        client_options={"prefix": prefix},
    )
    discoveries: list[ServiceDiscovery] = []
    async with cluster:
        try:
            for node in cluster.nodes:
                assert isinstance(node.transport, NatsTransport)
                discovery = ServiceDiscovery(node, node.transport, name=service)
                await discovery.start()
                discoveries.append(discovery)
            yield Live(cluster, clstr_nats_server.url, prefix, service, capsys)
        finally:
            for discovery in discoveries:
                await discovery.stop()


def run_sync(capsys: pytest.CaptureFixture[str], *argv: str) -> Output:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return Output(code, captured.out, captured.err)


class TestParser:
    def test_environment_gives_the_defaults(self) -> None:
        """CLSTR_* variables set the shared options, and flags still override them."""
        env = {
            "CLSTR_NATS_URL": "nats://a:4222, nats://b:4222",
            "CLSTR_SHARDS": "8",
            "CLSTR_SEED": "s1",
            "CLSTR_PREFIX": "p1",
            "CLSTR_LOG_JSON": "1",
        }
        args = build_parser(env).parse_args(["status"])
        assert args.nats_url == ["nats://a:4222", "nats://b:4222"]
        assert (args.shards, args.seed, args.prefix, args.log_json) == (8, "s1", "p1", True)
        assert args.shards_explicit
        args = build_parser(env).parse_args(["status", "--shards", "4"])
        assert args.shards == 4

    def test_shared_options_go_before_or_after_the_command(self) -> None:
        """`clstr --shards 8 status` and `clstr status --shards 8` mean the same."""
        before = build_parser({}).parse_args(["--shards", "8", "--prefix", "x", "status"])
        after = build_parser({}).parse_args(["status", "--shards", "8", "--prefix", "x"])
        assert (before.shards, before.prefix) == (after.shards, after.prefix) == (8, "x")
        assert not before.nats_url_explicit
        assert (
            build_parser({}).parse_args(["dev", "up", "--nats-url", "nats://h:1"]).nats_url_explicit
        )

    def test_options_between_the_arguments_of_request_and_notify(self) -> None:
        """`request KEY TYPE --shards 16 JSON` parses as if the option came last."""
        for command in ("request", "notify"):
            args = build_parser({}).parse_args(
                [command, "k", "Greet", "--shards", "16", "-H", "a=b", '{"name": "ann"}']
            )
            assert (args.key, args.type, args.payload) == ("k", "Greet", '{"name": "ann"}')
            assert (args.shards, args.header) == (16, [("a", "b")])
        args = build_parser({}).parse_args(["request", "--timeout", "2", "k", "T", "--json"])
        assert (args.key, args.type, args.payload, args.timeout, args.json) == (
            "k",
            "T",
            None,
            2.0,
            True,
        )

    def test_node_takes_its_settings_from_the_environment(self) -> None:
        """`clstr node` needs no flags when CLSTR_NODE_ID, CLSTR_APP and friends are set."""
        env = {
            "CLSTR_NODE_ID": "n1",
            "CLSTR_APP": "clstr.demo_app:app",
            "CLSTR_STATIC_NODES": "n1, n2,n3",
            "CLSTR_METRICS_PORT": "9100",
        }
        args = build_parser(env).parse_args(["node"])
        assert (args.node_id, args.app, args.metrics_port) == ("n1", "clstr.demo_app:app", 9100)
        assert args.static_nodes == ["n1", "n2", "n3"]
        with pytest.raises(SystemExit):
            build_parser({}).parse_args(["node"])

    def test_a_bad_environment_value_is_a_usage_error(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A CLSTR_SHARDS that is no number stops the command with exit code 2."""
        monkeypatch.setenv("CLSTR_SHARDS", "many")
        with pytest.raises(SystemExit) as exc:
            main(["shard", "k"])
        assert exc.value.code == 2
        assert "--shards" in capsys.readouterr().err
        monkeypatch.setenv("CLSTR_SHARDS", "8")
        monkeypatch.setenv("CLSTR_LOG_JSON", "perhaps")
        assert_usage_error(run_sync(capsys, "shard", "k"), "CLSTR_LOG_JSON")

    def test_every_environment_variable_is_in_the_help(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Each variable of ENV_VARS is named in the help of the command it configures."""
        texts = ""
        for argv in (["--help"], ["node", "--help"]):
            with pytest.raises(SystemExit):
                main(argv)
            texts += capsys.readouterr().out
        for name in ENV_VARS:
            assert f"[{name}" in texts, name


class TestShard:
    def test_shard_prints_the_shard_of_a_key(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`clstr shard KEY` prints shard_for_key, with --shards and --seed honoured."""
        result = run_sync(capsys, "shard", "user-1")
        assert (result.code, result.out) == (0, f"{shard_for_key('user-1', 64)}\n")
        result = run_sync(capsys, "shard", "user-1", "--shards", "8", "--seed", "s")
        assert result.out == f"{shard_for_key('user-1', 8, 's')}\n"

    def test_shard_refuses_the_keys_request_refuses(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An empty key, or one over the 1024-byte limit, exits 2 with request's own message."""
        unreachable = ["--nats-url", "nats://127.0.0.1:1", "--connect-timeout", "0.5"]
        for key, needle in (("", "key is empty"), ("k" * 1025, "over the limit of 1024")):
            refused = run_sync(capsys, "shard", key)
            assert_usage_error(refused, needle)
            assert refused.out == ""
            # request refuses it the same way, before it even connects.
            request = run_sync(capsys, *unreachable, "request", key, "Greet")
            assert request.error_lines == refused.error_lines
        assert run_sync(capsys, "shard", "k" * 1024).code == 0


class TestRequest:
    async def test_request_prints_the_reply_and_the_node(self, live: Live) -> None:
        """The reply is shown as JSON on stdout; the shard and answering node on stderr."""
        owner = live.cluster.owner_of_key("user-42")
        shard = live.cluster.client.shard_for("user-42")
        result = await live.run("request", "user-42", "Greet", '{"name": "ann"}')
        assert result.code == 0, result.err
        assert json.loads(result.out) == {"text": "hello ann", "node": owner, "visits": 1}
        assert f"shard {shard} -> {owner}" in result.err

    async def test_request_json_mode_is_one_object(self, live: Live) -> None:
        """--json prints key, shard, node, time and reply as one JSON object."""
        result = await live.run("request", "k1", "echo", '{"a": [1, null, "x"]}', "--json")
        body = json.loads(result.out)
        assert body["key"] == "k1"
        assert body["shard"] == live.cluster.client.shard_for("k1")
        assert body["node"] == live.cluster.owner_of_key("k1")
        assert body["reply"] == {"a": [1, None, "x"]}
        assert body["ms"] > 0

    async def test_notify_reaches_the_owner(self, live: Live) -> None:
        """A notification is handled by the key's owner (its counter moves)."""
        result = await live.run("notify", "c1", "counter.add", '{"by": 5}')
        assert result.code == 0, result.err
        assert f"-> {live.cluster.owner_of_key('c1')}" in result.err
        result = await live.run("request", "c1", "counter.add", '{"by": 1}')
        assert json.loads(result.out)["value"] == 6

    async def test_payload_can_come_from_stdin(
        self, live: Live, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A payload of '-' is read from stdin."""
        monkeypatch.setattr(sys, "stdin", io.StringIO('{"name": "bob"}'))
        result = await live.run("request", "user-9", "Greet", "-")
        assert json.loads(result.out)["text"] == "hello bob"


class TestErrors:
    async def test_unknown_message_type_is_refused_before_sending(self, live: Live) -> None:
        """An unknown type exits 2 listing the owner's types, and reaches no handler."""
        owner = next(n for n in live.cluster.nodes if n.node_id == live.cluster.owner_of_key("k"))
        received = owner.stats.received
        result = await live.run("request", "k", "Nope")
        assert_usage_error(result, "unknown message type 'Nope'", owner.node_id, "nothing was sent")
        assert str(sorted(MESSAGE_TYPES)) in result.error_lines[0]
        assert owner.stats.received == received

    async def test_notify_of_an_unknown_type_is_refused(self, live: Live) -> None:
        """A notification of a type nobody handles would vanish: it exits 2 instead."""
        owner = next(n for n in live.cluster.nodes if n.node_id == live.cluster.owner_of_key("k"))
        received = owner.stats.received
        result = await live.run("notify", "k", "UnknownType", "{}")
        assert_usage_error(result, "unknown message type 'UnknownType'", "Greet")
        assert owner.stats.received == received

    async def test_a_type_is_not_checked_when_the_handler_lists_none(
        self, clstr_nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A handler that does not list its types (a bare callable) gets every type sent."""
        seen: list[str] = []

        async def anything(env: Envelope) -> bytes:
            seen.append(env.type)
            return b""

        prefix = f"bare{uuid.uuid4().hex[:8]}"
        cluster = create_test_cluster(
            clstr_nats_server.url,
            ["solo"],
            num_shards=NUM_SHARDS,
            handler_factory=lambda node_id: anything,
            prefix=prefix,
            client_options={"prefix": prefix},
        )
        async with cluster:
            base = ["--nats-url", clstr_nats_server.url, "--shards", str(NUM_SHARDS)]
            argv = [*base, "--prefix", prefix, "request", "k", "AnyType"]
            assert await asyncio.to_thread(main, argv) == 0
        assert seen == ["AnyType"]

    async def test_bad_json_payload(self, live: Live) -> None:
        """A payload that is not JSON exits 2 and says where it breaks."""
        assert_usage_error(await live.run("request", "k", "Greet", "{bad"), "not valid JSON")

    @pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
    async def test_nan_and_infinity_are_not_json(self, live: Live, constant: str) -> None:
        """Python's parser takes NaN and Infinity; JSON does not, and neither does clstr."""
        result = await live.run("request", "k", "echo", f'{{"x": {constant}}}')
        assert_usage_error(result, "not valid JSON", f"{constant} is not a JSON number")

    async def test_an_integer_msgpack_cannot_carry(self, live: Live) -> None:
        """An integer past 64 bits exits 2 with advice, not a traceback."""
        result = await live.run("request", "k", "echo", '{"n": 123456789012345678901234567890}')
        assert_usage_error(result, "64 bits")

    async def test_options_between_the_arguments(self, live: Live) -> None:
        """`request KEY TYPE --timeout 2 JSON` sends the JSON, as if the option came last."""
        result = await live.run("request", "user-3", "Greet", "--timeout", "2", '{"name": "bo"}')
        assert result.code == 0, result.err
        assert json.loads(result.out)["text"] == "hello bo"

    async def test_a_wrong_shard_count_is_refused_before_sending(self, live: Live) -> None:
        """When the owner announces another shard count than --shards and the key is in
        another shard there, request and notify exit 2 saying the count to pass, and
        send nothing (the node would refuse the key: wrong_shard)."""
        fewer = NUM_SHARDS - 3  # every shard of --shards exists on the nodes
        key = next(
            f"k{i}"
            for i in range(1000)
            if shard_for_key(f"k{i}", fewer) != shard_for_key(f"k{i}", NUM_SHARDS)
        )
        right, sent = shard_for_key(key, NUM_SHARDS), shard_for_key(key, fewer)
        nodes = live.cluster.nodes
        received = sum(node.stats.received for node in nodes)
        for command in ("request", "notify"):
            result = await live.run(
                command, key, "counter.add", '{"by": 1}', "--shards", str(fewer)
            )
            assert_usage_error(
                result,
                f"uses {NUM_SHARDS} shards but --shards is {fewer}",
                f"is in shard {right} there, not {sent}",
                f"pass --shards {NUM_SHARDS}",
                "nothing was sent",
            )
        assert sum(node.stats.received for node in nodes) == received  # node info aside

    async def test_a_wrong_shard_count_the_key_survives_is_warned_about(self, live: Live) -> None:
        """When the counts differ but the key is in the same shard under both, the
        message goes through, with a warning that other keys will not."""
        key = next(
            f"k{i}" for i in range(1000) if shard_for_key(f"k{i}", 64) < NUM_SHARDS
        )  # 16 divides 64: such a key is in the same shard under both counts
        assert shard_for_key(key, 64) == shard_for_key(key, NUM_SHARDS)
        result = await live.run("request", key, "echo", "1", "--shards", "64")
        assert result.code == 0, result.err
        warnings = [line for line in result.err.splitlines() if line.startswith("clstr: warning:")]
        assert len(warnings) == 1, result.err
        assert f"uses {NUM_SHARDS} shards but --shards is 64" in warnings[0]
        assert f"is in shard {shard_for_key(key, 64)} under both, but other keys" in warnings[0]
        matching = await live.run("request", key, "echo", "1")
        assert "warning" not in matching.err

    async def test_a_key_refused_as_sent_to_the_wrong_shard_says_what_to_pass(
        self, live: Live
    ) -> None:
        """A seed other than the nodes' (which no node announces) sends the key to
        another shard; the node's wrong_shard refusal exits 2 with a hint to pass the
        cluster's --shards and --seed."""
        key = next(
            f"k{i}"
            for i in range(1000)
            if shard_for_key(f"k{i}", NUM_SHARDS, "s1") != shard_for_key(f"k{i}", NUM_SHARDS)
        )
        result = await live.run("request", key, "echo", "1", "--seed", "s1")
        assert_usage_error(
            result,
            f"belongs to shard {shard_for_key(key, NUM_SHARDS)}, not "
            f"{shard_for_key(key, NUM_SHARDS, 's1')}",
            "pass --shards N / --seed S matching the cluster",
        )

    async def test_a_larger_shard_count_shows_in_the_owners_shards(
        self, clstr_nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without discovery to ask, an owner serving a shard past --shards betrays a
        larger count: notify warns too."""
        prefix = f"nodisc{uuid.uuid4().hex[:8]}"
        cluster = create_test_cluster(
            clstr_nats_server.url,
            NODE_IDS,
            num_shards=NUM_SHARDS,
            handler_factory=app,
            prefix=prefix,
            client_options={"prefix": prefix},
        )
        async with cluster:
            argv = ["--nats-url", clstr_nats_server.url, "--prefix", prefix, "--shards", "2"]
            capsys.readouterr()
            code = await asyncio.to_thread(main, [*argv, "notify", "k", "echo"])
            err = capsys.readouterr().err
        assert code == 0, err
        assert "clstr: warning:" in err
        assert "so it uses more shards than --shards 2" in err

    async def test_empty_key(self, live: Live) -> None:
        """An empty key exits 2 before anything is sent."""
        assert_usage_error(await live.run("request", "", "Greet"), "key is empty")
        assert_usage_error(await live.run("notify", "", "Greet"), "key is empty")

    async def test_payload_the_handler_cannot_decode(self, live: Live) -> None:
        """A payload missing a field of the message type exits 2 with the node's reason."""
        result = await live.run("request", "k", "Greet", '{"nome": 1}')
        assert_usage_error(result, "missing field", "name")

    async def test_no_owner(self, live: Live) -> None:
        """A shard nobody serves exits 2 at once and says how to fix it."""
        result = await live.run("request", "k", "Greet", prefix="nobody-serves-this")
        assert_usage_error(result, "no node serves shard", "--prefix")
        result = await live.run("notify", "k", "Greet", prefix="nobody-serves-this")
        assert_usage_error(result, "no node serves shard")

    def test_unreachable_server(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A server nobody listens on exits 2 with one line on stderr (no log line of the
        failed connection besides), naming the URL and what to do."""
        url = "nats://127.0.0.1:1"
        for argv in (["request", "k", "Greet"], ["status"], ["notify", "k", "T"]):
            result = run_sync(capsys, "--nats-url", url, "--connect-timeout", "0.5", *argv)
            assert_usage_error(result, url, "clstr dev up")
            assert result.err.splitlines() == result.error_lines, result.err

    def test_remote_failures_exit_1(self) -> None:
        """A handler error or a timeout is a failed operation (1), not a usage error (2)."""
        from clstr.cli._request import _request_error

        args = types.SimpleNamespace(key="k", type="T", prefix="p", shards=4)
        raised = errors.RemoteHandlerError("boom", remote_type="ValueError")
        assert _request_error(raised, args, 1).code == 1  # type: ignore[arg-type]
        timeout = errors.RequestTimeoutError("late")
        assert _request_error(timeout, args, 1).code == 1  # type: ignore[arg-type]


class TestConnectionOptions:
    def test_credentials_open_a_protected_server(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without credentials the command exits 2; with CLSTR_NATS_USER/PASSWORD it connects."""
        config = 'authorization { user: "app", password: "s3cret" }'
        with NatsServer(jetstream=False, config=config) as server:
            refused = run_sync(capsys, "--nats-url", server.url, "status")
            assert_usage_error(refused, "authorization")
            monkeypatch.setenv("CLSTR_NATS_USER", "app")
            monkeypatch.setenv("CLSTR_NATS_PASSWORD", "s3cret")
            connected = run_sync(capsys, "--nats-url", server.url, "status", "--timeout", "0.5")
        assert connected.code == 1  # connected: no node serves anything there
        assert "no node answered" in connected.out

    def test_missing_credentials_file(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A --creds path that is not a file exits 2 before connecting."""
        result = run_sync(capsys, "--creds", "/no/such/file.creds", "status")
        assert_usage_error(result, "--creds", "not a file")


class TestStatus:
    async def test_table_shows_nodes_and_shard_map(self, live: Live) -> None:
        """The table names every node with its shard count, and maps every shard."""
        result = await live.run("status")
        assert result.code == 0, result.err
        assert f"{NUM_SHARDS} shards, 3 nodes, all shards owned" in result.out
        for node in live.cluster.nodes:
            line = next(
                line for line in result.out.splitlines() if f" {node.node_id} " in f"{line} "
            )
            assert str(len(node.shards)) in line.split()
        assert "shard map" in result.out

    async def test_json_matches_the_nodes(self, live: Live) -> None:
        """--json gives each node's shards and the owner of every shard."""
        result = await live.run("status", "--json")
        view = json.loads(result.out)
        assert view["complete"] is True
        assert view["num_shards"] == NUM_SHARDS
        by_id = {n["node_id"]: n for n in view["nodes"]}
        assert sorted(by_id) == NODE_IDS
        for node in live.cluster.nodes:
            assert by_id[node.node_id]["shards"] == node.shards
            assert by_id[node.node_id]["discovered"] is True
            for shard in node.shards:
                assert view["owners"][str(shard)] == node.node_id

    async def test_shards_without_owner_are_shown_and_fail(self, live: Live) -> None:
        """A shard nobody serves is listed as unowned, and status exits 1."""
        node = live.cluster.nodes[0]
        shard = node.shards[0]
        await node.release(shard)
        result = await live.run("status", "--json")
        assert result.code == 1
        view = json.loads(result.out)
        assert view["unowned"] == [shard]
        assert view["owners"][str(shard)] is None
        table = await live.run("status")
        assert "1 without owner" in table.out

    async def test_wait_until_every_shard_has_an_owner(self, live: Live) -> None:
        """--wait gives up with exit 1 while a shard has no owner, and exits 0 once it has."""
        node = live.cluster.nodes[1]
        shard = node.shards[0]
        await node.release(shard)
        assert (await live.run("status", "--wait", "0.3")).code == 1
        waiting = asyncio.ensure_future(live.run("status", "--wait", "10", "--json"))
        await node.acquire(shard)
        result = await waiting
        assert result.code == 0
        assert json.loads(result.out)["complete"] is True

    async def test_no_nodes_at_all(self, live: Live) -> None:
        """With nobody serving the prefix, status says so and exits 1."""
        result = await live.run("status", prefix="nobody-serves-this")
        assert result.code == 1
        assert "no node answered" in result.out


class TestBench:
    def test_missing_bench_module_is_a_clear_error(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without clstr.bench, `clstr bench` exits 2 saying it is not available."""
        monkeypatch.setitem(sys.modules, "clstr.bench", None)
        assert_usage_error(run_sync(capsys, "bench", "--quick"), "not available")

    def test_bench_options_and_run_come_from_the_module(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`clstr bench` takes its options from clstr.bench.add_arguments and runs its run()."""
        seen: list[Any] = []
        fake = types.ModuleType("clstr.bench")
        fake.add_arguments = lambda parser: parser.add_argument("--fake-option", type=int)  # type: ignore[attr-defined]
        fake.run = lambda args: seen.append(args.fake_option) or 3  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "clstr.bench", fake)
        assert run_sync(capsys, "bench", "--fake-option", "7").code == 3
        assert seen == [7]


class TestLoadApp:
    @pytest.fixture
    def apps(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
        """A module of handlers and factories of every supported shape."""
        name = f"cli_apps_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(
            textwrap.dedent(
                """
                from clstr import KeyHandler, Router

                router = Router()

                async def raw(env):
                    return b"raw"

                def factory():
                    return Router()

                def per_node(node_id):
                    return KeyHandler(lambda key: Router())

                async def async_factory():
                    return Router()

                class Service:
                    async def __call__(self, env):
                        return b""

                not_a_handler = 42

                def broken():
                    raise RuntimeError("no config")
                """
            )
        )
        monkeypatch.syspath_prepend(str(tmp_path))
        return name

    async def test_handler_shapes(self, apps: str) -> None:
        """A handler, a zero-arg factory, a node_id factory, an async factory and a class load."""
        from clstr.cli._app import load_app

        assert isinstance(await load_app(f"{apps}:router", "n"), Router)
        raw = await load_app(f"{apps}:raw", "n")
        assert await raw(Envelope(type="t")) == b"raw"
        assert isinstance(await load_app(f"{apps}:factory", "n"), Router)
        assert isinstance(await load_app(f"{apps}:per_node", "n"), KeyHandler)
        assert isinstance(await load_app(f"{apps}:async_factory", "n"), Router)
        assert callable(await load_app(f"{apps}:Service", "n"))
        demo = await load_app("clstr.demo_app:app", "n")
        assert isinstance(demo, Router)
        assert demo.message_types == sorted(MESSAGE_TYPES)

    @pytest.mark.parametrize(
        ("spec", "message"),
        [
            ("no_colon", "module:attr"),
            ("no_such_module_xyz:app", "no such module"),
            ("{apps}:missing", "has no attribute"),
            ("{apps}:not_a_handler", "not a handler"),
            ("{apps}:broken", "raised RuntimeError: no config"),
        ],
    )
    async def test_bad_specs_say_what_is_wrong(self, apps: str, spec: str, message: str) -> None:
        """Each kind of bad --app is one clear CliError."""
        from clstr.cli._app import load_app
        from clstr.cli._common import CliError

        with pytest.raises(CliError, match=message):
            await load_app(spec.format(apps=apps), "n")

    def test_node_with_a_bad_app_exits_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`clstr node` with an --app that does not import exits 2 before connecting."""
        result = run_sync(capsys, "node", "--id", "n1", "--app", "no_such_module_xyz:app")
        assert_usage_error(result, "no such module")


def run_into_closed_pipe(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """Run `clstr ARGV` with its stdout a pipe nobody reads any more (`| head` gone)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLSTR_")}
    try:
        return subprocess.run(
            [sys.executable, "-m", "clstr", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=env,
            timeout=30,
            check=False,
        )
    finally:
        os.close(write_end)


class TestClosedOutput:
    def test_shard_into_a_closed_pipe_ends_quietly(self) -> None:
        """`clstr shard k | head -0`: exit 141 as if killed by SIGPIPE, nothing on stderr."""
        done = run_into_closed_pipe("shard", "user-42")
        assert (done.returncode, done.stderr) == (141, b"")

    def test_status_into_a_closed_pipe_ends_quietly(self, clstr_nats_server: NatsServer) -> None:
        """`clstr status | head -1` with the reader gone: no BrokenPipeError traceback."""
        prefix = f"pipe{uuid.uuid4().hex[:8]}"
        done = run_into_closed_pipe(
            "--nats-url", clstr_nats_server.url, "--prefix", prefix, "status", "--timeout", "0.5"
        )
        assert (done.returncode, done.stderr) == (141, b"")


# -- the documented commands run as documented -------------------------------------------


@dataclass
class Documented:
    """A `clstr` command shown in the docs, with the output shown under it (if any)."""

    where: str
    argv: list[str]
    expected: list[str]


def _join_continued(lines: list[str]) -> list[tuple[int, str]]:
    """Lines with their number, those ending in a backslash joined with the next."""
    joined: list[tuple[int, str]] = []
    pending = ""
    start = 0
    for number, line in enumerate(lines):
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append((start, pending + line))
        pending = ""
    return joined


def _clstr_argv(command: str) -> list[str] | None:
    words = shlex.split(command, comments=True)
    if words[:2] == ["./run.sh", "clstr"]:
        return words[2:]
    if words[:1] == ["clstr"]:
        return words[1:]
    return None


def readme_tour() -> list[Documented]:
    """The commands of the README's `clstr` section: a `# output` comment line under a
    command is what it prints; `# offline: X` after `clstr shard` is its output."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## The `clstr` command") :]
    block = re.search(r"^```bash\n(.*?)^```", section, re.M | re.S)
    assert block is not None
    first = text[: text.index("## The `clstr` command")].count("\n") + section[
        : block.start(1)
    ].count("\n")
    found: list[Documented] = []
    for number, line in _join_continued(block[1].splitlines()):
        if line.startswith("#"):
            if found and found[-1].argv[:1] != ["dev"]:
                found[-1].expected.append(line.removeprefix("# "))
            continue
        argv = _clstr_argv(line)
        if argv is None:
            continue
        offline = re.search(r"#\s*offline:\s*(.+)$", line)
        found.append(
            Documented(f"README.md:{first + number + 1}", argv, [offline[1]] if offline else [])
        )
    return found


def cli_doc_commands() -> list[Documented]:
    """The `$ clstr ...` commands of docs/cli.md's console blocks, each with the lines
    under it up to the next command."""
    path = ROOT / "docs" / "cli.md"
    text = path.read_text(encoding="utf-8")
    found: list[Documented] = []
    for block in re.finditer(r"^```console\n(.*?)^```", text, re.M | re.S):
        first = text[: block.start(1)].count("\n")
        current: Documented | None = None
        for number, line in _join_continued(block[1].splitlines()):
            if line.startswith("$ "):
                argv = _clstr_argv(line[2:])
                current = None
                if argv is not None:
                    current = Documented(f"docs/cli.md:{first + number + 1}", argv, [])
                    found.append(current)
            elif current is not None:
                current.expected.append(line)
        for documented in found:
            while documented.expected and not documented.expected[-1].strip():
                documented.expected.pop()
    return found


_RUN = {"request", "notify", "status", "shard", "conformance"}


def _normalize(line: str) -> str:
    """What may differ between runs: timings, uptimes, pids, the version."""
    line = re.sub(r"\(\d+(\.\d+)? ms\)", "(N ms)", line)
    line = re.sub(r'"ms": \d+(\.\d+)?', '"ms": N', line)
    line = re.sub(r"(?<= )\d+(s|m\d\ds|h\d\dm|d\d\dh)(?= )", "UP", line)
    line = re.sub(r"\b\d+\.\d+\.\d+$", "VERSION", line)
    return " ".join(line.split())


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest_asyncio.fixture
async def docs_cluster(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """What the docs run against: `clstr dev up`'s cluster (three nodes of the demo app,
    64 shards, the default prefix and service name), on a server of its own; its URL
    is in CLSTR_NATS_URL, as the docs' `export` line puts it."""
    # The nodes' loggers are bound now: keep their lines out of the commands' output.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    async with NatsServer(jetstream=False) as server:
        cluster = create_test_cluster(server.url, NODE_IDS, num_shards=64, handler_factory=app)
        discoveries: list[ServiceDiscovery] = []
        async with cluster:
            try:
                for node in cluster.nodes:
                    assert isinstance(node.transport, NatsTransport)
                    discovery = ServiceDiscovery(node, node.transport)
                    await discovery.start()
                    discoveries.append(discovery)
                for name in list(os.environ):
                    if name.startswith("CLSTR_"):
                        monkeypatch.delenv(name)
                monkeypatch.setenv("CLSTR_NATS_URL", server.url)
                yield server.url
            finally:
                for discovery in discoveries:
                    await discovery.stop()


async def run_documented(
    commands: list[Documented], capsys: pytest.CaptureFixture[str]
) -> list[str]:
    """Run each command in order: the request-like ones for real, compared with their
    documented output; the others (dev up, node, demo...) through the parser only.
    Returns the commands that ran."""
    ran = []
    for doc in commands:
        try:
            args = build_parser().parse_args(doc.argv)
        except SystemExit:
            pytest.fail(f"{doc.where}: clstr {shlex.join(doc.argv)} does not parse")
        if args.command not in _RUN:
            continue
        if "nats://127.0.0.1:4999" in doc.argv and _port_in_use(4999):
            continue  # the example needs nobody listening there
        capsys.readouterr()
        code = await asyncio.to_thread(main, doc.argv)
        captured = capsys.readouterr()
        lines = (captured.out + captured.err).splitlines()
        ran.append(doc.where)
        if doc.expected:
            assert sorted(map(_normalize, lines)) == sorted(map(_normalize, doc.expected)), (
                f"{doc.where}: clstr {shlex.join(doc.argv)} printed\n"
                + "\n".join(lines)
                + "\nbut the docs show\n"
                + "\n".join(doc.expected)
            )
        wants_error = any(line.startswith("clstr: error:") for line in doc.expected)
        assert (code != 0) == wants_error, f"{doc.where}: exit {code}\n" + "\n".join(lines)
    return ran


class TestDocumentedCommands:
    """The README's command tour and docs/cli.md show what the commands really print."""

    def test_the_tour_and_the_page_were_parsed(self) -> None:
        """The parsers find the documented commands (so the tests below test something)."""
        tour = readme_tour()
        assert [d.argv[0] for d in tour][:5] == ["dev", "status", "request", "notify", "shard"]
        assert tour[2].expected == [
            '{"text": "hello ann", "node": "node-3", "visits": 1}',
            "shard 22 -> node-3 (1.7 ms)",
        ]
        assert tour[4].expected == ["22"]
        page = cli_doc_commands()
        assert len(page) >= 15
        assert sum(bool(d.expected) for d in page) >= 12

    async def test_readme_tour(self, docs_cluster: str, capsys: pytest.CaptureFixture[str]) -> None:
        """Every command of the README tour parses; the ones that talk to a cluster, run
        in order against a fresh one, print what the README says."""
        ran = await run_documented(readme_tour(), capsys)
        assert len(ran) >= 4

    async def test_cli_page(self, docs_cluster: str, capsys: pytest.CaptureFixture[str]) -> None:
        """Every `$ clstr ...` of docs/cli.md parses; request, notify, status, shard and
        conformance, run in order against a fresh cluster, print what the page shows."""
        ran = await run_documented(cli_doc_commands(), capsys)
        assert len(ran) >= 12
