"""TLS and mTLS: the public port, the service's connections to its workers, and reloads.

Every certificate is made here (turnlog.worker.certs): a trusted CA with a
server and a client certificate, and a second CA that nobody trusts. The
public server is `turnlog serve`'s own (api.server.grpc_server) on a secure
port, probed with grpc.health.v1.Health/Check; workers are real `turnlog
worker --backend scripted` processes. A refused connection shows as
UNAVAILABLE (the handshake fails before any RPC), and each probe is bounded
by a deadline, so a hang fails as DEADLINE_EXCEEDED rather than passing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import ssl
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from worker_processes import TurnlogProcess, WorkerProcess, printed_token

from turnlog import errors
from turnlog.api.server import grpc_server
from turnlog.auth.authenticator import Authenticator
from turnlog.auth.channel import credentialed_channel
from turnlog.auth.mtls import MtlsIdentity
from turnlog.auth.principal import Scope
from turnlog.auth.settings import AuthSettings
from turnlog.cli import main
from turnlog.conversation.application import ConversationApplication
from turnlog.engine.v1 import engine_pb2 as pb
from turnlog.storage import PostgresEventStore
from turnlog.tls import (
    ReloadingChannelCredentials,
    TlsFiles,
    TlsFilesError,
    channel_credentials,
    server_credentials,
)
from turnlog.v1 import conversation_service_pb2 as spb
from turnlog.v1 import conversation_service_pb2_grpc as sgrpc
from turnlog.worker.certs import CertificateAuthority, IssuedCertificate
from turnlog.worker.client import EngineClient, WorkerTarget
from turnlog.worker.spawn import spawned_worker

#: Seconds any one probe may take; a refusal comes in milliseconds.
PROBE_TIMEOUT_S = 10.0
#: Seconds a reload may take to show (the server looks at most every RELOAD_INTERVAL_S).
RELOAD_DEADLINE_S = 15.0
RELOAD_INTERVAL_S = 0.2
HOSTS = ["127.0.0.1", "localhost"]
SCRIPT = {"model": "scripted-tls", "replies": [], "default": {"text": "over TLS"}}


@dataclass(frozen=True)
class Pki:
    """PEM files in a folder: a trusted CA and its certificates, and an untrusted CA's."""

    folder: Path
    ca: CertificateAuthority
    other_ca: CertificateAuthority
    server: IssuedCertificate
    client: IssuedCertificate
    other_client: IssuedCertificate

    def path(self, name: str) -> Path:
        return self.folder / name


def _write(folder: Path, name: str, issued: IssuedCertificate) -> None:
    issued.write(folder / f"{name}.pem", folder / f"{name}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create("test CA")
    other_ca = CertificateAuthority.create("untrusted CA")
    made = Pki(
        folder=folder,
        ca=ca,
        other_ca=other_ca,
        server=ca.issue_server("test server", hosts=HOSTS),
        client=ca.issue_client("test client"),
        other_client=other_ca.issue_client("intruder"),
    )
    (folder / "ca.pem").write_bytes(ca.cert_pem)
    (folder / "other-ca.pem").write_bytes(other_ca.cert_pem)
    _write(folder, "server", made.server)
    _write(folder, "client", made.client)
    _write(folder, "other-client", made.other_client)
    return made


def _credentials(ca: bytes, client: IssuedCertificate | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=client.key_pem, certificate_chain=client.cert_pem
    )


async def _health(port: int, credentials: grpc.ChannelCredentials | None) -> int:
    """Health/Check over a new connection (no shared subchannel); returns the status."""
    target = f"127.0.0.1:{port}"
    options = [("grpc.use_local_subchannel_pool", 1)]
    channel = (
        grpc.aio.insecure_channel(target, options=options)
        if credentials is None
        else grpc.aio.secure_channel(target, credentials, options=options)
    )
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S)
    return int(reply.status)


async def _refused(port: int, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _health(port, credentials)
    return caught.value.code()


def _presented_certificate_sync(port: int) -> x509.Certificate:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only reading what the server presents
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT_S) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def _presented_certificate(port: int) -> x509.Certificate:
    """The certificate the server presents to a new connection."""
    return await asyncio.to_thread(_presented_certificate_sync, port)


@pytest.fixture
async def app(store: PostgresEventStore) -> AsyncIterator[ConversationApplication]:
    application = ConversationApplication(store, None)
    yield application
    await application.shutdown()


@contextlib.asynccontextmanager
async def public_server(
    app: ConversationApplication, credentials: grpc.ServerCredentials
) -> AsyncIterator[int]:
    """`turnlog serve`'s gRPC server over `app` on a secure loopback port; yields the port.

    Its callers authenticate by client certificate: "test client" is tenant
    `tls-tenant` with the read scope.
    """
    identity = MtlsIdentity(name="test client", tenant="tls-tenant", scopes=frozenset({Scope.READ}))
    authenticator = Authenticator(AuthSettings(mtls=(identity,)))
    server, health = grpc_server(app, authenticator=authenticator)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    assert port
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield port
    finally:
        await server.stop(0)
        await authenticator.aclose()


SERVING = health_pb2.HealthCheckResponse.SERVING


# --- the public port: TLS ---------------------------------------------------------------


async def test_public_port_tls(app: ConversationApplication, pki: Pki) -> None:
    files = TlsFiles(cert=pki.path("server.pem"), key=pki.path("server.key"))
    async with public_server(app, server_credentials(files, require_client_cert=False)) as port:
        assert await _health(port, _credentials(pki.ca.cert_pem)) == SERVING
        # The same through the file-based client credentials the service's users get.
        assert await _health(port, channel_credentials(ca=pki.path("ca.pem"))) == SERVING
        assert await _refused(port, None) == grpc.StatusCode.UNAVAILABLE
        assert await _refused(port, _credentials(pki.other_ca.cert_pem)) == (
            grpc.StatusCode.UNAVAILABLE
        )


# --- the public port: mTLS --------------------------------------------------------------


async def test_public_port_mtls(app: ConversationApplication, pki: Pki) -> None:
    files = TlsFiles(cert=pki.path("server.pem"), key=pki.path("server.key"), ca=pki.path("ca.pem"))
    async with public_server(app, server_credentials(files, require_client_cert=True)) as port:
        ca = pki.ca.cert_pem
        assert await _refused(port, _credentials(ca)) == grpc.StatusCode.UNAVAILABLE
        assert await _refused(port, _credentials(ca, pki.other_client)) == (
            grpc.StatusCode.UNAVAILABLE
        )
        assert await _health(port, _credentials(ca, pki.client)) == SERVING
        good = channel_credentials(
            ca=pki.path("ca.pem"), cert=pki.path("client.pem"), key=pki.path("client.key")
        )
        assert await _health(port, good) == SERVING
        # The verified certificate is the caller's credential: no token needed.
        async with grpc.aio.secure_channel(f"localhost:{port}", good) as channel:
            stub = sgrpc.ConversationServiceStub(channel)
            listed = await stub.ListConversations(spb.ListConversationsRequest(), timeout=10)
            assert list(listed.conversations) == []
            with pytest.raises(grpc.aio.AioRpcError) as refused:  # read only
                await stub.CreateConversation(spb.CreateConversationRequest(), timeout=10)
            assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED


# --- reloading the server's files -------------------------------------------------------


async def test_public_port_reloads_its_certificate_without_restart(
    app: ConversationApplication, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    first = pki.server
    first.write(cert, key)
    new_ca = CertificateAuthority.create("rotated CA")
    second = new_ca.issue_server("rotated server", hosts=HOSTS)
    credentials = server_credentials(
        TlsFiles(cert=cert, key=key), require_client_cert=False, check_interval_s=RELOAD_INTERVAL_S
    )
    async with public_server(app, credentials) as port:
        assert (await _presented_certificate(port)).serial_number == first.certificate.serial_number
        assert await _refused(port, _credentials(new_ca.cert_pem)) == grpc.StatusCode.UNAVAILABLE

        # The new pair lands file by file, as a copy would: the server must never
        # serve a certificate with the wrong key in between.
        second.write(cert, key)
        deadline = time.monotonic() + RELOAD_DEADLINE_S
        while (await _presented_certificate(port)).serial_number != (
            second.certificate.serial_number
        ):
            assert time.monotonic() < deadline, "the new certificate was never served"
            await asyncio.sleep(RELOAD_INTERVAL_S)
        assert await _health(port, _credentials(new_ca.cert_pem)) == SERVING
        assert await _refused(port, _credentials(pki.ca.cert_pem)) == grpc.StatusCode.UNAVAILABLE

        # A broken key (half written, say) is refused and the certificate in use stays.
        caplog.set_level(logging.WARNING, logger="turnlog.tls")
        caplog.clear()  # the pair above may have been seen half-written too
        key.write_bytes(second.key_pem[: len(second.key_pem) // 2])
        deadline = time.monotonic() + RELOAD_DEADLINE_S
        while not [r for r in caplog.records if r.name == "turnlog.tls"]:
            assert time.monotonic() < deadline, "the broken key was never looked at"
            await asyncio.sleep(RELOAD_INTERVAL_S)
            assert await _health(port, _credentials(new_ca.cert_pem)) == SERVING
        assert await _health(port, _credentials(new_ca.cert_pem)) == SERVING
        assert (await _presented_certificate(port)).serial_number == (
            second.certificate.serial_number
        )
        warnings = [r for r in caplog.records if r.name == "turnlog.tls"]
        assert warnings[0].levelno == logging.WARNING
        assert str(key) in warnings[0].getMessage()
        logged = caplog.text
        assert "PRIVATE KEY" not in logged
        for line in second.key_pem.decode().splitlines()[1:-1]:
            assert line not in logged


async def test_a_server_refuses_to_start_with_a_key_of_another_certificate(pki: Pki) -> None:
    files = TlsFiles(cert=pki.path("server.pem"), key=pki.path("client.key"))
    with pytest.raises(TlsFilesError, match="does not belong"):
        server_credentials(files, require_client_cert=False)
    with pytest.raises(ValueError, match="CA bundle"):
        server_credentials(
            TlsFiles(cert=pki.path("server.pem"), key=pki.path("server.key")),
            require_client_cert=True,
        )


# --- the service's connection to its workers --------------------------------------------


@pytest.fixture
def mtls_worker(pki: Pki, tmp_path: Path) -> Iterator[WorkerProcess]:
    """A scripted `turnlog worker` that requires a client certificate from the test CA."""
    script = tmp_path / "script.json"
    script.write_text(json.dumps(SCRIPT))
    worker = WorkerProcess(
        [
            "--backend",
            "scripted",
            "--script",
            str(script),
            "--grace",
            "1",
            "--tls-cert",
            str(pki.path("server.pem")),
            "--tls-key",
            str(pki.path("server.key")),
            "--tls-client-ca",
            str(pki.path("ca.pem")),
        ],
        tmp_path / "worker.log",
    )
    worker.start(timeout_s=30)
    yield worker
    worker.kill()


async def _generate(client: EngineClient) -> str:
    events = [e async for e in client.generate(pb.StartGeneration(prompt_text="hi"))]
    assert isinstance(events[-1], pb.GenerationDone)
    return "".join(e.text for e in events if isinstance(e, pb.GenerationDelta))


async def _generate_fails(target: str | WorkerTarget) -> errors.EngineUnavailableError:
    async with EngineClient([target], retries=0, load_poll_interval_s=0) as client:
        with pytest.raises(errors.EngineUnavailableError) as caught:
            await asyncio.wait_for(_generate(client), PROBE_TIMEOUT_S)
    return caught.value


async def test_worker_requires_a_client_certificate(mtls_worker: WorkerProcess, pki: Pki) -> None:
    address, ca = mtls_worker.target, pki.ca.cert_pem
    for refused in (
        address,  # plaintext
        WorkerTarget(address=address, credentials=_credentials(ca)),
        WorkerTarget(address=address, credentials=_credentials(ca, pki.other_client)),
    ):
        failure = await _generate_fails(refused)
        assert failure.metadata == {"grpcCode": "UNAVAILABLE"}
    good = WorkerTarget(address=address, credentials=_credentials(ca, pki.client))
    async with EngineClient([good], load_poll_interval_s=0) as client:
        assert await _generate(client) == "over TLS"
    # Credentials for all plain addresses, from files.
    files = ReloadingChannelCredentials(
        ca=pki.path("ca.pem"), cert=pki.path("client.pem"), key=pki.path("client.key")
    )
    async with EngineClient([address], credentials=files, load_poll_interval_s=0) as client:
        assert await _generate(client) == "over TLS"


async def test_engine_client_reads_renewed_client_files_when_it_reconnects(
    mtls_worker: WorkerProcess, pki: Pki, tmp_path: Path
) -> None:
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    pki.other_client.write(cert, key)  # not accepted by the worker
    files = ReloadingChannelCredentials(
        ca=pki.path("ca.pem"), cert=cert, key=key, check_interval_s=0
    )
    target = WorkerTarget(address=mtls_worker.target, credentials=files)
    async with EngineClient([target], retries=0, load_poll_interval_s=0) as client:
        with pytest.raises(errors.EngineUnavailableError):
            await asyncio.wait_for(_generate(client), PROBE_TIMEOUT_S)
        pki.client.write(cert, key)
        assert await asyncio.wait_for(_generate(client), PROBE_TIMEOUT_S) == "over TLS"


def test_worker_tls_flags_are_checked_before_the_model_loads(pki: Pki, tmp_path: Path) -> None:
    scripted = ["worker", "--backend", "scripted", "--script", str(tmp_path / "none.json")]
    cert, key, ca = (str(pki.path(n)) for n in ("server.pem", "server.key", "ca.pem"))
    for argv, message in [
        ([*scripted, "--tls-cert", cert], "--tls-cert and --tls-key go together"),
        ([*scripted, "--tls-client-ca", ca], "needs --tls-cert and --tls-key"),
        ([*scripted, "--tls-cert", ca, "--tls-key", key], "does not belong"),
        ([*scripted, "--tls-cert", key, "--tls-key", key], "holds no PEM certificate"),
    ]:
        with pytest.raises(SystemExit) as caught:
            main(argv)
        assert message in str(caught.value), argv


# --- spawned workers (turnlog serve --spawn-worker) -------------------------------------


async def test_spawned_worker_is_reached_over_mtls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps(SCRIPT))
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    async with spawned_worker(f"--backend scripted --script {script} --grace 1") as target:
        assert target.credentials is not None
        async with EngineClient([target], load_poll_interval_s=0) as client:
            assert await _generate(client) == "over TLS"

        [folder] = list(temp.iterdir())
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert sorted(p.name for p in folder.iterdir()) == ["ca.pem", "worker.key", "worker.pem"]
        assert stat.S_IMODE((folder / "worker.key").stat().st_mode) == 0o600
        # TLS, and mTLS: a client that trusts the worker's CA but has no certificate is refused.
        assert (await _generate_fails(target.address)).metadata == {"grpcCode": "UNAVAILABLE"}
        ca_only = WorkerTarget(
            address=target.address, credentials=channel_credentials(ca=folder / "ca.pem")
        )
        assert (await _generate_fails(ca_only)).metadata == {"grpcCode": "UNAVAILABLE"}
    assert list(temp.iterdir()) == []


async def test_spawned_worker_refuses_tls_flags_of_its_own(pki: Pki) -> None:
    with pytest.raises(ValueError, match="drop --tls-cert"):
        async with spawned_worker(f"--backend scripted --tls-cert={pki.path('server.pem')}"):
            pass


# --- turnlog serve's flags, end to end ------------------------------------------------


async def test_serve_flags_secure_the_port_and_the_worker_connection(
    mtls_worker: WorkerProcess, pki: Pki, database_url: str, tmp_path: Path
) -> None:
    """`--tls-cert/--tls-key` on the public port; `--worker-tls-*` mTLS to a worker that needs it."""
    log = tmp_path / "serve.log"
    serve = TurnlogProcess(
        [
            "serve",
            "--worker",
            mtls_worker.target,
            "--tls-cert",
            str(pki.path("server.pem")),
            "--tls-key",
            str(pki.path("server.key")),
            "--worker-tls-ca",
            str(pki.path("ca.pem")),
            "--worker-tls-cert",
            str(pki.path("client.pem")),
            "--worker-tls-key",
            str(pki.path("client.key")),
        ],
        log,
        re.compile(r"turnlog serving gRPC on \S+:(\d+) \(TLS;"),
    )
    serve.env = {
        "TURNLOG_DATABASE_URL": database_url,
        "TURNLOG_LISTEN": "127.0.0.1:0",
        "TURNLOG_DATA_DIR": str(tmp_path / "data"),
    }
    port = int(serve.start(timeout_s=60)[1])
    try:
        token = printed_token(log.read_text(errors="replace"))
        tls = _credentials(pki.ca.cert_pem)
        async with credentialed_channel(f"localhost:{port}", token, credentials=tls) as channel:
            stub = sgrpc.ConversationServiceStub(channel)
            created = await stub.CreateConversation(spb.CreateConversationRequest(), timeout=15)
            sent = await stub.SendMessage(
                spb.SendMessageRequest(
                    input=spb.TurnInput(conversation=created.conversation.name, content="hi")
                ),
                timeout=30,
            )
        # The turn ran on the worker that accepts only certified clients.
        assert sent.assistant_message.content
        assert await _refused(port, None) == grpc.StatusCode.UNAVAILABLE  # no plain text
    finally:
        serve.terminate(15)
