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
    """

    database_url: str | None
    data_dir: Path
    listen: str
    metrics_listen: str | None = None

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            database_url=os.environ.get("TURNLOG_DATABASE_URL") or None,
            data_dir=Path(os.environ.get("TURNLOG_DATA_DIR") or default_data_dir()),
            listen=os.environ.get("TURNLOG_LISTEN", "127.0.0.1:50051"),
            metrics_listen=os.environ.get("TURNLOG_METRICS_LISTEN") or None,
        )
