"""The embedded server: starts from nothing, keeps data across restarts."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg

from turnlog.config import Settings
from turnlog.storage.connect import embedded_data_dir, open_event_store
from turnlog.storage.migrations import available_migrations
from turnlog.storage.port import NewEvent


async def test_embedded_store_persists_across_restarts(tmp_path: Path) -> None:
    settings = Settings(database_url=None, data_dir=tmp_path / "turnlog", listen="127.0.0.1:0")
    event = NewEvent(event_id=uuid.uuid4(), type="Created", data={"title": "kept"})
    async with open_event_store(settings) as opened:
        assert opened.applied_migrations == [
            f"{m.version:04d}_{m.name}" for m in available_migrations()
        ]
        assert opened.applied_migrations[:2] == ["0001_event_log", "0002_tenant"]
        await opened.store.append("conv", [event], expected_version=0)
        with psycopg.connect(opened.conninfo) as conn:
            row = conn.execute("SHOW server_encoding").fetchone()
            assert row == ("UTF8",)
    assert (embedded_data_dir(settings) / "PG_VERSION").exists()
    assert not (embedded_data_dir(settings) / "postmaster.pid").exists(), "server not stopped"

    async with open_event_store(settings) as reopened:
        assert reopened.applied_migrations == []
        (read,) = await reopened.store.read_stream("conv")
        assert read.event_id == event.event_id
        assert read.data == {"title": "kept"}
