"""Start and stop the `turnlog serve` process: the wiring of every layer.

The process opens the event log (the embedded PostgreSQL server unless
`TURNLOG_DATABASE_URL` names one), applies migrations, and serves gRPC on
one port: standard health checking and server reflection, plus the
conversation API as it is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import uuid
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from turnlog.api.authentication import DEFAULT_RECHECK_INTERVAL_S, Authenticates, Authentication
from turnlog.api.limits import RateLimit, TenantRateLimiter
from turnlog.api.security import SecurityConfigError, public_security
from turnlog.api.servicer import ConversationServicer
from turnlog.api.validation import RequestValidation
from turnlog.auth.principal import DEFAULT_TENANT
from turnlog.auth.settings import AuthSettingsError
from turnlog.config import Settings
from turnlog.conversation.application import ConversationApplication
from turnlog.conversation.options import ServiceDefaults
from turnlog.conversation.tools import builtin_tools
from turnlog.eventlog import wall_clock_us
from turnlog.metrics import start_metrics_server
from turnlog.storage import PostgresReplicaLock, PostgresTurnMailbox, open_event_store
from turnlog.tls import ReloadingChannelCredentials, TlsFilesError
from turnlog.v1 import conversation_service_pb2, conversation_service_pb2_grpc
from turnlog.worker.client import EngineClient, WorkerTarget
from turnlog.worker.spawn import spawned_worker

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 5.0
#: Seconds between recovery rounds (±20% jitter): how long a turn of a replica
#: that died stays open at most, give or take. TURNLOG_RECOVERY_INTERVAL_S overrides.
DEFAULT_RECOVERY_INTERVAL_S = 15.0


def recovery_interval_s() -> float:
    """The recovery period from TURNLOG_RECOVERY_INTERVAL_S (default 15 s, at least 1 s)."""
    raw = os.environ.get("TURNLOG_RECOVERY_INTERVAL_S")
    try:
        return max(1.0, float(raw)) if raw else DEFAULT_RECOVERY_INTERVAL_S
    except ValueError:
        log.warning("ignoring TURNLOG_RECOVERY_INTERVAL_S=%r (not a number)", raw)
        return DEFAULT_RECOVERY_INTERVAL_S


def describe_event_log(settings: Settings) -> str:
    """Where the event log lives, for humans; never prints credentials."""
    if settings.database_url is None:
        return f"embedded PostgreSQL in {settings.data_dir / 'postgres'}"
    return "PostgreSQL from TURNLOG_DATABASE_URL"


async def migrate_only(settings: Settings) -> int:
    """Open the event log (which applies pending migrations) and close it again."""
    async with open_event_store(settings) as opened:
        applied = ", ".join(opened.applied_migrations) or "none pending"
        print(f"event log migrated ({describe_event_log(settings)}): {applied}", flush=True)
    return 0


def grpc_server(
    app: ConversationApplication,
    *,
    authenticator: Authenticates,
    rate_limit: RateLimit | None = None,
    recheck_interval_s: float = DEFAULT_RECHECK_INTERVAL_S,
) -> tuple[grpc.aio.Server, Any]:
    """The gRPC server of `turnlog serve` over `app`, with no port and not started.

    Every call is first admitted by `Authentication` (a verified credential
    from `authenticator`, the method's scope, the tenant's request rate;
    health checks excepted), then every request passes `RequestValidation`
    (the one validation table, and INVALID_ARGUMENT for a body that is not
    a message) before any handler. Serves the conversation API, health
    checking (not yet SERVING) and reflection. Returns the server and its
    health servicer.
    """
    admission = Authentication(
        authenticator,
        rate_limiter=None if rate_limit is None else TenantRateLimiter(rate_limit),
        recheck_interval_s=recheck_interval_s,
    )
    server = grpc.aio.server(interceptors=[admission, RequestValidation()])
    conversation_service_pb2_grpc.add_ConversationServiceServicer_to_server(
        ConversationServicer(app), server
    )
    # grpc_health re-exports its asyncio servicer as `health.aio` without
    # declaring it, which strict mypy reads as a private import.
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_names = [
        conversation_service_pb2.DESCRIPTOR.services_by_name["ConversationService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    ]
    reflection.enable_server_reflection(service_names, server)
    return server, health_servicer


async def run_server(
    settings: Settings,
    *,
    listen: str | None = None,
    metrics_listen: str | None = None,
    worker_addresses: list[str] | None = None,
    spawn_workers: list[str] | None = None,
) -> int:
    """Serve until SIGINT or SIGTERM; returns the process exit code.

    Args:
        settings: process settings (database, data folder, listen address).
        listen: host:port to bind, overriding `settings.listen`.
        metrics_listen: host:port of the Prometheus endpoint, overriding
            `settings.metrics_listen`; with neither, no endpoint.
        worker_addresses: engine workers to use.
        spawn_workers: argument strings of engine workers to start as child
            processes (and use) for the server's lifetime.
    """
    address = listen or settings.listen
    worker_credentials = None
    if settings.worker_tls_ca is not None:
        worker_credentials = ReloadingChannelCredentials(
            ca=settings.worker_tls_ca, cert=settings.worker_tls_cert, key=settings.worker_tls_key
        )
    workers: list[str | WorkerTarget] = [
        WorkerTarget(address=w, credentials=worker_credentials) for w in worker_addresses or []
    ]
    metrics_address = metrics_listen or settings.metrics_listen
    if metrics_address:
        # First, so that a bad address fails before anything starts; the
        # exporter thread lives as long as the process.
        try:
            metrics_port = start_metrics_server(metrics_address)
        except (ValueError, OSError) as e:
            log.error("cannot serve metrics on %s: %s", metrics_address, e)
            return 2
        metrics_host = metrics_address.rsplit(":", 1)[0]
        print(
            f"turnlog metrics on port {metrics_port} "
            f"(http://{metrics_host}:{metrics_port}/metrics)",
            flush=True,
        )
    try:
        security = public_security(settings, address)
    except (SecurityConfigError, AuthSettingsError, TlsFilesError, OSError) as e:
        log.error("cannot start: %s", e)
        return 2
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(security.authenticator.aclose)
        for worker_args in spawn_workers or []:
            # Spawned workers come with their own mTLS credentials.
            workers.append(await stack.enter_async_context(spawned_worker(worker_args)))
        opened = await stack.enter_async_context(open_event_store(settings))
        engine = None
        if workers:
            engine = await stack.enter_async_context(EngineClient(workers))
        else:
            log.warning(
                "no --worker or --spawn-worker given: conversations can be managed, "
                "turns fail UNAVAILABLE"
            )
        # This replica's liveness lock, on a connection of its own: other
        # replicas may share this log, and only the open turns of a replica
        # that is gone may be closed. A fresh name per process: a restart's
        # turns left open are those of a gone replica.
        ownership = await PostgresReplicaLock.open(
            opened.conninfo, f"serve-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        )
        stack.push_async_callback(ownership.close)
        # Cancels and client tool results for turns that run on another replica.
        mailbox = await PostgresTurnMailbox.open(opened.conninfo)
        stack.push_async_callback(mailbox.close)
        app = ConversationApplication(
            opened.store,
            engine,
            tools=builtin_tools(wall_clock_us),
            ownership=ownership,
            mailbox=mailbox,
            defaults=ServiceDefaults(
                tenant_max_running_turns=settings.tenant_max_running_turns,
                client_tool_timeout_s=settings.client_tool_timeout_s,
            ),
        )
        # Before serving, and then periodically: turns whose replica died
        # (this one before a restart, or any other) are closed.
        closed = await app.close_interrupted_turns()
        if closed:
            log.warning("closed %d interrupted turn(s)", len(closed))
        stack.push_async_callback(app.shutdown)
        app.start_recovery(recovery_interval_s())
        server, health_servicer = grpc_server(
            app,
            authenticator=security.authenticator,
            rate_limit=RateLimit(rate=settings.tenant_requests_per_s, burst=settings.tenant_burst),
        )
        if security.port_credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, security.port_credentials)
        if port == 0:
            log.error("cannot bind %s", address)
            return 2
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        host = address.rsplit(":", 1)[0]
        if security.local_token is not None:
            # Printed, never logged: the one place a secret is shown, to the
            # person who started the service (as Jupyter prints its token).
            # Before the "serving" line, which readers wait for.
            print(
                f"turnlog token for tenant {DEFAULT_TENANT!r} (24 h; `turnlog token` mints "
                f"more): {security.local_token}",
                flush=True,
            )
        transport = "TLS" if security.port_credentials is not None else "plain text"
        print(
            f"turnlog serving gRPC on {host}:{port} ({transport}; "
            f"event log: {describe_event_log(settings)})",
            flush=True,
        )

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
        await health_servicer.enter_graceful_shutdown()
        await server.stop(SHUTDOWN_GRACE_SECONDS)
        with contextlib.suppress(NotImplementedError):
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    return 0
