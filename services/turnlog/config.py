"""Service settings, read once from the environment at start.

Every setting has an embedded default so that `turnlog serve` runs with no
configuration at all: no database URL means an embedded PostgreSQL server in
a per-user data folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def default_data_dir() -> Path:
    """Where turnlog keeps its embedded database: `$XDG_DATA_HOME/turnlog`."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "turnlog"


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Process-wide settings.

    Attributes:
        database_url: a libpq connection string or URL; None starts the
            embedded server in `data_dir`.
        data_dir: the folder for the embedded database (and other local state).
        listen: host:port the gRPC server binds.
        metrics_listen: host:port of the Prometheus metrics endpoint
            (docs/metrics.md); None serves none.
        config_file: the TOML file whose `[auth]` table says which
            credentials to accept (docs/security.md); None: the local key on
            loopback, nothing elsewhere.
        insecure: serve without authentication (every caller is the default
            tenant); for a trusted network only, and logged loudly.
        tls_cert, tls_key: the public port's certificate chain and key (PEM);
            None serves plain text (loopback only, unless `insecure`).
        tls_client_ca: CA bundle for client certificates: mTLS, required.
        worker_tls_ca, worker_tls_cert, worker_tls_key: mTLS towards `--worker`s.
        tenant_max_running_turns: turns a tenant may run at once per replica.
        tenant_requests_per_s, tenant_burst: each tenant's request rate limit
            per replica (0: none).
        client_tool_timeout_s: how long a turn awaits a client-side tool
            result before it fails (docs/conversation.md, "Turn control").
    """

    database_url: str | None
    data_dir: Path
    listen: str
    metrics_listen: str | None = None
    config_file: Path | None = None
    insecure: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    worker_tls_ca: Path | None = None
    worker_tls_cert: Path | None = None
    worker_tls_key: Path | None = None
    tenant_max_running_turns: int = 128
    tenant_requests_per_s: float = 500.0
    tenant_burst: int = 1000
    client_tool_timeout_s: float = 60.0

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ.get

        def path(name: str) -> Path | None:
            value = env(name)
            return Path(value) if value else None

        return cls(
            database_url=env("TURNLOG_DATABASE_URL") or None,
            data_dir=Path(env("TURNLOG_DATA_DIR") or default_data_dir()),
            listen=env("TURNLOG_LISTEN", "127.0.0.1:50051"),
            metrics_listen=env("TURNLOG_METRICS_LISTEN") or None,
            config_file=path("TURNLOG_CONFIG"),
            tls_cert=path("TURNLOG_TLS_CERT"),
            tls_key=path("TURNLOG_TLS_KEY"),
            tls_client_ca=path("TURNLOG_TLS_CLIENT_CA"),
            worker_tls_ca=path("TURNLOG_WORKER_TLS_CA"),
            worker_tls_cert=path("TURNLOG_WORKER_TLS_CERT"),
            worker_tls_key=path("TURNLOG_WORKER_TLS_KEY"),
            tenant_max_running_turns=int(env("TURNLOG_TENANT_MAX_RUNNING_TURNS") or 128),
            tenant_requests_per_s=float(env("TURNLOG_TENANT_REQUESTS_PER_S") or 500.0),
            tenant_burst=int(env("TURNLOG_TENANT_BURST") or 1000),
            client_tool_timeout_s=float(env("TURNLOG_CLIENT_TOOL_TIMEOUT_S") or 60.0),
        )
