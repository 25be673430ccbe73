"""Authentication, TLS and least-privilege permissions against real nats-servers.

Every way a nats-server can ask for credentials (user and password, token,
nkey, JWT credentials file) and TLS (certificates made in the test, mutual
TLS too): a node and a client connect with :class:`NatsOptions` and work;
wrong or missing credentials fail fast with a :class:`ConnectionFailedError`
that says the credentials were refused. Then a server with exactly the
permissions docs/security.md gives node and client users: both work, and a
client user cannot act as a node (subscribe to shard subjects) nor forge
replies.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import ssl
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import nkeys  # type: ignore[import-untyped]
import pytest
import pytest_asyncio
import trustme
from prometheus_client import CollectorRegistry

from clstr import Client, ConnectionFailedError, Envelope, Node, PrometheusMetrics, TransportError
from clstr.discovery import ServiceDiscovery
from clstr.membership import KvMembership, KvSettings, control_subject
from clstr.testing import NatsServer
from clstr.transports.nats import NatsOptions, NatsTransport

from _support import eventually

NUM_SHARDS = 4
# Far above what a refused connection may take: failing fast means well under it.
DEADLINE = 10.0
FAST = 2.0


async def echo(env: Envelope) -> bytes:
    """Answers with what it got."""
    return b"echo:" + env.data


async def round_trip(url: str, node_options: NatsOptions, client_options: NatsOptions) -> bytes:
    """Start a node and a client with these options; return one request's reply."""
    node_transport = await NatsTransport.connect(url, node_options)
    try:
        async with (
            Node(node_transport, echo, node_id="n", num_shards=NUM_SHARDS),
            await Client.connect(url, num_shards=NUM_SHARDS, nats_options=client_options) as client,
        ):
            return await client.request_key("k", "t", b"hi")
    finally:
        await node_transport.close()


async def refused(url: str, options: NatsOptions) -> tuple[ConnectionFailedError, float]:
    """Connect with ``options``, which must fail; return the error and how long it took."""
    started = time.monotonic()
    with pytest.raises(ConnectionFailedError) as caught:
        await NatsTransport.connect(url, dataclasses.replace(options, connect_deadline=DEADLINE))
    return caught.value, time.monotonic() - started


# -- nkeys and JWTs -------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_keypair(prefix: int) -> nkeys.KeyPair:
    """A fresh nkey pair of the given kind (operator, account, user)."""
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def issue_jwt(issuer: nkeys.KeyPair, subject: str, name: str, claims: Mapping[str, object]) -> str:
    """A NATS JWT (v2) about ``subject``, signed by ``issuer``."""
    body: dict[str, object] = {
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": {"version": 2, **claims},
    }
    body["jti"] = base64.b32encode(hashlib.sha256(json.dumps(body).encode()).digest()).decode()
    header = {"typ": "JWT", "alg": "ed25519-nkey"}
    signing = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(body).encode())
    return signing + "." + _b64(issuer.sign(signing.encode()))


UNLIMITED = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}


@dataclass
class Operator:
    """An operator with one account, in the server's memory resolver."""

    config: str
    account: nkeys.KeyPair

    def creds(self, path: Path, name: str) -> Path:
        """Write a .creds file for a new user of the account."""
        user = new_keypair(nkeys.PREFIX_BYTE_USER)
        token = issue_jwt(
            self.account,
            user.public_key.decode(),
            name,
            {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
        )
        path.write_text(
            "-----BEGIN NATS USER JWT-----\n"
            f"{token}\n"
            "------END NATS USER JWT------\n\n"
            "-----BEGIN USER NKEY SEED-----\n"
            f"{user.seed.decode()}\n"
            "------END USER NKEY SEED------\n"
        )
        return path


def make_operator() -> Operator:
    """Operator mode: operator JWT, a system account and one account, preloaded."""
    op = new_keypair(nkeys.PREFIX_BYTE_OPERATOR)
    account = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    system = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    op_jwt = issue_jwt(op, op.public_key.decode(), "op", {"type": "operator"})
    acc_claims = {"type": "account", "limits": UNLIMITED}
    acc_jwt = issue_jwt(op, account.public_key.decode(), "app", acc_claims)
    sys_jwt = issue_jwt(op, system.public_key.decode(), "SYS", acc_claims)
    config = (
        f'operator: "{op_jwt}"\n'
        f'system_account: "{system.public_key.decode()}"\n'
        "resolver: MEMORY\n"
        "resolver_preload: {\n"
        f'  {account.public_key.decode()}: "{acc_jwt}"\n'
        f'  {system.public_key.decode()}: "{sys_jwt}"\n'
        "}\n"
    )
    return Operator(config, account)


# -- credentials ----------------------------------------------------------------


@dataclass
class AuthCase:
    """A server config, options that it accepts, and options that it refuses."""

    name: str
    config: str
    good: NatsOptions
    bad: NatsOptions


USER_SEED = new_keypair(nkeys.PREFIX_BYTE_USER)
OTHER_SEED = new_keypair(nkeys.PREFIX_BYTE_USER)


def auth_cases(tmp: Path) -> Iterator[AuthCase]:
    yield AuthCase(
        "user_password",
        'authorization { user: "app", password: "s3cret-pw" }',
        NatsOptions(user="app", password="s3cret-pw"),
        NatsOptions(user="app", password="wrong"),
    )
    yield AuthCase(
        "token",
        'authorization { token: "t0ken-value" }',
        NatsOptions(token="t0ken-value"),
        NatsOptions(token="not-the-token"),
    )
    seed_file = tmp / "user.nk"
    seed_file.write_text(USER_SEED.seed.decode())
    yield AuthCase(
        "nkey",
        f'authorization {{ users: [ {{ nkey: "{USER_SEED.public_key.decode()}" }} ] }}',
        NatsOptions(nkeys_seed=str(seed_file)),
        NatsOptions(nkeys_seed=OTHER_SEED.seed.decode()),
    )
    operator = make_operator()
    good = operator.creds(tmp / "good.creds", "app")
    # A user signed by an account the server does not know.
    stranger = make_operator().creds(tmp / "stranger.creds", "stranger")
    yield AuthCase(
        "credentials_file",
        operator.config,
        NatsOptions(credentials=str(good)),
        NatsOptions(credentials=str(stranger)),
    )


CASE_NAMES = ["user_password", "token", "nkey", "credentials_file"]


@pytest.fixture(scope="module")
def auth_servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, tuple[NatsServer, AuthCase]]]:
    """One running server per authentication method, for this module."""
    tmp = tmp_path_factory.mktemp("auth")
    servers: dict[str, tuple[NatsServer, AuthCase]] = {}
    try:
        for case in auth_cases(tmp):
            server = NatsServer(config=case.config, jetstream=False).start()
            servers[case.name] = (server, case)
        yield servers
    finally:
        for server, _ in servers.values():
            server.stop()


class TestAuthentication:
    """Each authentication method lets the right user in and refuses others fast."""

    @pytest.mark.parametrize("name", CASE_NAMES)
    async def test_node_and_client_connect(
        self, name: str, auth_servers: dict[str, tuple[NatsServer, AuthCase]]
    ) -> None:
        """A node and a client with the right credentials serve a request."""
        server, case = auth_servers[name]
        node_opts = dataclasses.replace(case.good, name="node")
        client_opts = dataclasses.replace(case.good, name="client")
        assert await round_trip(server.url, node_opts, client_opts) == b"echo:hi"

    @pytest.mark.parametrize("name", CASE_NAMES)
    async def test_wrong_credentials_fail_fast(
        self, name: str, auth_servers: dict[str, tuple[NatsServer, AuthCase]]
    ) -> None:
        """Wrong credentials raise ConnectionFailedError saying so, well before the deadline."""
        server, case = auth_servers[name]
        error, took = await refused(server.url, case.bad)
        assert "refused the credentials" in str(error)
        assert took < FAST

    @pytest.mark.parametrize("name", CASE_NAMES)
    async def test_missing_credentials_fail_fast(
        self, name: str, auth_servers: dict[str, tuple[NatsServer, AuthCase]]
    ) -> None:
        """No credentials at all are refused just as fast."""
        server, _ = auth_servers[name]
        error, took = await refused(server.url, NatsOptions())
        assert "refused the credentials" in str(error)
        assert took < FAST

    async def test_unreachable_server_waits_for_the_deadline(self) -> None:
        """Only a server that does not answer makes connect wait, and only until the deadline."""
        with NatsServer(jetstream=False) as server:
            url = server.url
        started = time.monotonic()
        with pytest.raises(ConnectionFailedError, match="no server answered within 1"):
            await NatsTransport.connect(url, NatsOptions(connect_deadline=1.0))
        assert 0.9 < time.monotonic() - started < 3


# -- TLS ------------------------------------------------------------------------


@dataclass
class Tls:
    """A CA, a server certificate for 127.0.0.1, and a server that requires TLS."""

    ca: trustme.CA
    server: NatsServer
    client_cert: trustme.LeafCert

    @property
    def url(self) -> str:
        return self.server.url.replace("nats://", "tls://")

    def context(self, *, trusted: bool = True, with_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if trusted:
            self.ca.configure_trust(ctx)
        if with_cert:
            self.client_cert.configure_cert(ctx)
        return ctx


@contextlib.contextmanager
def tls_server(tmp: Path, *, mutual: bool) -> Iterator[Tls]:
    """A nats-server requiring TLS (and, when ``mutual``, a client certificate)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(tmp / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    config = (
        "tls {\n"
        f'  cert_file: "{tmp / "server.pem"}"\n'
        f'  key_file: "{tmp / "server.key"}"\n'
        + (f'  ca_file: "{tmp / "ca.pem"}"\n  verify: true\n' if mutual else "")
        + "  timeout: 2\n}\n"
    )
    with NatsServer(config=config, jetstream=False) as server:
        yield Tls(ca, server, ca.issue_cert("clstr-client"))


@pytest.fixture(scope="module", params=["tls", "mutual_tls"])
def tls(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Tls]:
    """A TLS-only nats-server, with and without client certificate verification."""
    with tls_server(tmp_path_factory.mktemp("tls"), mutual=request.param == "mutual_tls") as t:
        yield t


@pytest.fixture(scope="module")
def mutual_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    """A TLS-only nats-server that verifies client certificates."""
    with tls_server(tmp_path_factory.mktemp("mtls"), mutual=True) as t:
        yield t


class TestTls:
    """TLS: trusted certificates connect, untrusted ones fail fast."""

    async def test_node_and_client_over_tls(self, tls: Tls) -> None:
        """A node and a client trusting the CA (with a client cert for mutual TLS) work."""
        options = NatsOptions(tls=tls.context(with_cert=True))
        assert await round_trip(tls.url, options, options) == b"echo:hi"

    async def test_untrusted_server_certificate_fails_fast(self, tls: Tls) -> None:
        """A client that does not trust the server's CA fails at once, saying TLS failed."""
        error, took = await refused(tls.url, NatsOptions(tls=tls.context(trusted=False)))
        assert "TLS handshake failed" in str(error)
        assert "CERTIFICATE_VERIFY_FAILED" in str(error)
        assert took < FAST

    async def test_plain_client_is_refused(self, tls: Tls) -> None:
        """A client with no TLS settings cannot reach a TLS-only server's data."""
        error, took = await refused(tls.server.url, NatsOptions())
        assert "TLS handshake failed" in str(error)
        assert took < FAST


class TestMutualTls:
    """Mutual TLS: the server refuses a client without a certificate it trusts."""

    async def test_client_without_certificate_is_refused(self, mutual_tls: Tls) -> None:
        """Without a client certificate, connecting to a verify-on server fails fast."""
        error, took = await refused(
            mutual_tls.url, NatsOptions(tls=mutual_tls.context(with_cert=False))
        )
        assert "TLS handshake failed" in str(error)
        assert took < FAST

    async def test_certificate_from_another_ca_is_refused(self, mutual_tls: Tls) -> None:
        """A client certificate the server's CA did not sign is refused just as fast."""
        ctx = mutual_tls.context()
        trustme.CA().issue_cert("intruder").configure_cert(ctx)
        error, took = await refused(mutual_tls.url, NatsOptions(tls=ctx))
        assert "TLS handshake failed" in str(error)
        assert took < FAST


# -- least privilege ------------------------------------------------------------

PREFIX = "clstr"

SECURITY_DOC = Path(__file__).resolve().parent.parent / "docs" / "security.md"
#: The users docs/security.md defines, and the passwords the test gives them.
PASSWORDS = {"node-user": "node-pw", "client-user": "client-pw", "ops-user": "ops-pw"}


def documented_permissions(doc: Path = SECURITY_DOC) -> str:
    """The server config of docs/security.md's least-privilege section, as documented,
    with each user's ``"..."`` password filled in from :data:`PASSWORDS`.

    Read from the page itself, so that the tested permissions cannot drift from
    the documented ones.
    """
    text = doc.read_text(encoding="utf-8")
    section = text.partition("\n## Least-privilege permissions\n")[2].partition("\n## ")[0]
    blocks = re.findall(r"^```[^\n]*\n(authorization \{.*?)^```", section, re.M | re.S)
    assert len(blocks) == 1, f"expected one authorization block in {doc.name}, got {len(blocks)}"
    placeholder = re.compile(r'user: "(?P<user>[^"]+)", password: "\.\.\."')
    users = [m["user"] for m in placeholder.finditer(blocks[0])]
    assert sorted(users) == sorted(PASSWORDS), f"{doc.name} documents the users {users}"
    return placeholder.sub(
        lambda m: f'user: "{m["user"]}", password: "{PASSWORDS[m["user"]]}"', blocks[0]
    )


NODE_USER = NatsOptions(name="node", user="node-user", password=PASSWORDS["node-user"])
CLIENT_USER = NatsOptions(name="client", user="client-user", password=PASSWORDS["client-user"])
OPS_USER = NatsOptions(name="ops", user="ops-user", password=PASSWORDS["ops-user"])


@pytest.fixture(scope="module")
def locked_server() -> Iterator[NatsServer]:
    """A nats-server (JetStream on) with the least-privilege users of docs/security.md."""
    with NatsServer(config=documented_permissions()) as server:
        yield server


@pytest_asyncio.fixture
async def node_on_locked(locked_server: NatsServer) -> AsyncIterator[Node]:
    """A node of the node user, serving every shard."""
    transport = await NatsTransport.connect(locked_server.url, NODE_USER)
    try:
        async with Node(transport, echo, node_id="n", num_shards=NUM_SHARDS) as node:
            yield node
    finally:
        await transport.close()


class TestLeastPrivilege:
    """With the documented permissions, nodes and clients work and cannot overstep."""

    def test_the_server_runs_the_documented_permissions(self, locked_server: NatsServer) -> None:
        """The locked server's config holds docs/security.md's block, as written there."""
        assert locked_server.config_file is not None
        config = locked_server.config_file.read_text(encoding="utf-8")
        documented = documented_permissions()
        assert documented in config
        assert 'subscribe: { allow: ["clstr.shard.> clstr"' in documented
        assert "allow_responses: true" in documented

    def test_an_edit_of_the_docs_is_what_gets_tested(self, tmp_path: Path) -> None:
        """Change a permission on the page and the tested config changes with it."""
        doc = tmp_path / "security.md"
        text = SECURITY_DOC.read_text(encoding="utf-8")
        doc.write_text(text.replace('"clstr.shard.> clstr"', '"clstr.shard.> other"', 1))
        assert '"clstr.shard.> other"' in documented_permissions(doc)
        assert '"clstr.shard.> clstr"' not in documented_permissions(doc)

    async def test_client_and_node_work(
        self, locked_server: NatsServer, node_on_locked: Node
    ) -> None:
        """A client user's requests reach a node user's node and its replies come back."""
        async with await Client.connect(
            locked_server.url, num_shards=NUM_SHARDS, nats_options=CLIENT_USER
        ) as client:
            for i in range(NUM_SHARDS * 4):
                assert await client.request_key(f"k{i}", "t", b"x") == b"echo:x"
            await client.notify_key("k", "t", b"note")

    async def test_dynamic_membership_works_with_node_permissions(
        self, locked_server: NatsServer
    ) -> None:
        """A node on JetStream KV membership runs with exactly the node user's permissions."""
        transport = await NatsTransport.connect(locked_server.url, NODE_USER)
        settings = KvSettings(heartbeat_interval=0.25, heartbeat_ttl=1.0, reconcile_interval=0.25)
        node = Node(
            transport,
            echo,
            node_id="kv-node",
            num_shards=NUM_SHARDS,
            membership=KvMembership(settings=settings),
            stop_timeout=2,
        )
        try:
            async with (
                node,
                await Client.connect(
                    locked_server.url, num_shards=NUM_SHARDS, nats_options=CLIENT_USER
                ) as client,
            ):
                # It creates the buckets, heartbeats and takes every shard key.
                await eventually(lambda: node.shards == list(range(NUM_SHARDS)), timeout=15)
                assert await client.request_key("k", "t", b"kv") == b"echo:kv"
                # An ops user may operate the node remotely (clstr cordon/uncordon/drain).
                ops = await NatsTransport.connect(locked_server.url, OPS_USER)
                try:
                    for op in ("cordon", "uncordon"):
                        body = json.dumps({"op": op}).encode()
                        reply = await ops.request(control_subject(PREFIX, "kv-node"), body, 5.0)
                        assert json.loads(reply)["ok"] is True
                finally:
                    await ops.close()
            assert not transport._denied, transport._denied
        finally:
            await transport.close()

    async def test_service_discovery_works_with_node_permissions(
        self, locked_server: NatsServer, node_on_locked: Node
    ) -> None:
        """A node answers $SRV discovery with its own permissions; an ops user asks."""
        assert isinstance(node_on_locked.transport, NatsTransport)
        ops = await NatsTransport.connect(locked_server.url, OPS_USER)
        try:
            async with ServiceDiscovery(node_on_locked, node_on_locked.transport):
                reply = await ops.request("$SRV.PING.clstr", b"", timeout=2.0)
            assert json.loads(reply)["id"] == node_on_locked.node_id
            assert not node_on_locked.transport._denied
        finally:
            await ops.close()

    async def test_client_user_cannot_act_as_a_node(self, locked_server: NatsServer) -> None:
        """A node started with client credentials fails: the server refuses its subscriptions."""
        transport = await NatsTransport.connect(locked_server.url, CLIENT_USER)
        try:
            with pytest.raises(TransportError, match=r"refused the subscription to 'clstr\.shard"):
                await transport.subscribe("clstr.shard.0", lambda data, reply: None, queue=PREFIX)
            node = Node(transport, echo, node_id="impostor", num_shards=NUM_SHARDS)
            with pytest.raises(TransportError, match="lacks subscribe permission"):
                await node.start()
            assert node.shards == []
        finally:
            await transport.close()

    async def test_node_user_cannot_eavesdrop(
        self, locked_server: NatsServer, node_on_locked: Node
    ) -> None:
        """A node user takes shard messages only in the cluster's queue group, never copies."""
        transport = await NatsTransport.connect(locked_server.url, NODE_USER)
        try:
            with pytest.raises(TransportError, match="refused the subscription"):
                await transport.subscribe("clstr.shard.1", lambda data, reply: None)
            with pytest.raises(TransportError, match="refused the subscription"):
                await transport.subscribe("clstr.shard.1", lambda data, reply: None, queue="spy")
        finally:
            await transport.close()

    async def test_client_user_cannot_forge_replies(
        self, locked_server: NatsServer, node_on_locked: Node
    ) -> None:
        """Publishing to another connection's inbox is a permissions violation, counted."""
        registry = CollectorRegistry()
        transport = await NatsTransport.connect(
            locked_server.url, CLIENT_USER, metrics=PrometheusMetrics(registry)
        )
        try:
            await transport.publish("_INBOX.someone.else", b"forged")
            # The server reports a refused publish asynchronously.
            await eventually(lambda: bool(transport._denied))
            assert "publish" in transport._denied[0].lower()
            assert (
                registry.get_sample_value(
                    "clstr_cluster_transport_errors_total", {"error_type": "permission_denied"}
                )
                == 1
            )
        finally:
            await transport.close()
