"""Run an engine worker: gRPC server, health checking, reflection, graceful drain."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from turnlog.engine.v1 import engine_pb2, engine_pb2_grpc
from turnlog.worker.backend import EngineBackend
from turnlog.worker.service import EngineServicer

log = logging.getLogger(__name__)

SERVICE_NAME = engine_pb2.DESCRIPTOR.services_by_name["EngineService"].full_name

# Tuned for many small messages on one long-lived stream.
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


async def serve(
    make_backend: Callable[[], Awaitable[EngineBackend]],
    *,
    listen: str,
    grace_s: float = 30.0,
    stop: asyncio.Event | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> None:
    """Serve EngineService until SIGTERM/SIGINT (or `stop`), then drain and exit.

    The port opens once the backend is loaded. Health reports SERVING until a
    stop signal, then NOT_SERVING while draining, for both the overall server ("") and
    `turnlog.engine.v1.EngineService`. On a stop signal the worker refuses new
    requests, lets in-flight ones finish for up to `grace_s` seconds, aborts
    the rest, and closes the backend.

    Args:
        make_backend: builds the backend (may take a while: model loading).
        listen: host:port to bind.
        grace_s: how long in-flight requests may take to finish on shutdown.
        stop: an event that stops the worker like a signal (for embedding and tests).
        credentials: TLS (or mTLS) server credentials, e.g. from
            `turnlog.tls.server_credentials`; None serves plaintext.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    # The model loads before the port opens: until then clients get UNAVAILABLE.
    backend = await make_backend()
    servicer = EngineServicer(backend)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    server = grpc.aio.server(options=SERVER_OPTIONS)
    engine_pb2_grpc.add_EngineServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    if credentials is None:
        port = server.add_insecure_port(listen)
        transport = "plaintext"
    else:
        port = server.add_secure_port(listen, credentials)
        transport = "TLS"
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    # Tests and supervisors may wait for this line.
    print(f"turnlog worker serving on port {port} ({transport})", flush=True)

    await stop.wait()
    log.info("draining (grace %.1fs)", grace_s)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await servicer.drain(grace_s)
    await server.stop(grace=1.0)
    await backend.close()
    log.info("engine worker stopped")
