"""The clstr command in-process: parsing, request/notify/status against a live
cluster, error reporting, the lazily loaded bench command, and --app loading.

Commands run through ``clstr.cli.main`` in a worker thread (each command runs
its own event loop), against nodes started in the test's loop.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import textwrap
import types
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import structlog

from clstr import Envelope, KeyHandler, Router, errors, shard_for_key
from clstr.cli import ENV_VARS, build_parser, main
from clstr.demo_app import app
from clstr.discovery import ServiceDiscovery
from clstr.testing import NatsServer, TestCluster, create_test_cluster
from clstr.transports.nats import NatsTransport

NODE_IDS = ["node-1", "node-2", "node-3"]
NUM_SHARDS = 16


@pytest.fixture(autouse=True)
def restore_structlog() -> Iterator[None]:
    """main() configures structlog globally; put the previous configuration back."""
    saved = structlog.get_config()
    try:
        yield
    finally:
        structlog.configure(**saved)


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
    async def test_unknown_message_type(self, live: Live) -> None:
        """An unknown type exits 2 and lists the types the node knows."""
        result = await live.run("request", "k", "Nope")
        assert_usage_error(result, "unknown message type 'Nope'", "Greet")

    async def test_bad_json_payload(self, live: Live) -> None:
        """A payload that is not JSON exits 2 and says where it breaks."""
        assert_usage_error(await live.run("request", "k", "Greet", "{bad"), "not valid JSON")

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
        """A server nobody listens on exits 2, naming the URL and what to do."""
        url = "nats://127.0.0.1:1"
        for argv in (["request", "k", "Greet"], ["status"], ["notify", "k", "T"]):
            result = run_sync(capsys, "--nats-url", url, "--connect-timeout", "0.5", *argv)
            assert_usage_error(result, url, "clstr dev up")

    def test_remote_failures_exit_1(self) -> None:
        """A handler error or a timeout is a failed operation (1), not a usage error (2)."""
        from clstr.cli import _request_error

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
        from clstr._cli_node import load_app

        assert isinstance(await load_app(f"{apps}:router", "n"), Router)
        raw = await load_app(f"{apps}:raw", "n")
        assert await raw(Envelope(type="t")) == b"raw"
        assert isinstance(await load_app(f"{apps}:factory", "n"), Router)
        assert isinstance(await load_app(f"{apps}:per_node", "n"), KeyHandler)
        assert isinstance(await load_app(f"{apps}:async_factory", "n"), Router)
        assert callable(await load_app(f"{apps}:Service", "n"))
        assert isinstance(await load_app("clstr.demo_app:app", "n"), KeyHandler)

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
        from clstr._cli_common import CliError
        from clstr._cli_node import load_app

        with pytest.raises(CliError, match=message):
            await load_app(spec.format(apps=apps), "n")

    def test_node_with_a_bad_app_exits_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`clstr node` with an --app that does not import exits 2 before connecting."""
        result = run_sync(capsys, "node", "--id", "n1", "--app", "no_such_module_xyz:app")
        assert_usage_error(result, "no such module")
