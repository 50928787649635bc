"""Event store throughput, with baselines measured in the same run on the same server.

Run: .venv/bin/python bench/event_store.py [--quick] [--dsn URL] [--events N] [--reps R]
     [--json PATH]

Without --dsn it starts an embedded PostgreSQL in a temporary folder (default
durability: fsync and synchronous_commit on). Every scenario runs once per
repetition, R repetitions in a rotated order (bench/paired.py), each from a
fresh CHECKPOINT; a figure is the median of its R runs. The baselines write
the same N events as `append_16` (each writer on its own stream, one event
per transaction):

- `plain_insert_16`: plain autocommit INSERTs of the same rows with no
  guarantees (psycopg async pool, like the store);
- `eventsourcing_16`: the `eventsourcing` library's PostgreSQL application
  recorder, 16 threads (it is synchronous). NOTE: that recorder takes an
  exclusive table lock in every insert transaction (`LOCK TABLE ... IN
  EXCLUSIVE MODE`, held through the commit, plus a NOTIFY), so that ids
  commit in order; its writers therefore run one at a time, whatever their
  number. turnlog's store takes no table lock (its readers skip nothing by
  other means, docs/event-log.md), so `append_16_vs_eventsourcing` compares
  two designs, not two implementations of one.

Ratios are paired: within each repetition, the two scenarios' events/s are
divided, and the median (min, max, every run) of those per-run ratios is
reported. The JSON output has `events_per_second`, `runs`, `events_per_scenario`
(events written by each run), `notes` and a top-level `ratios` object
({"median", "min", "max", "runs"} each). `--quick` is a smoke run (320
events, 2 repetitions: seconds, figures meaningless).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
from paired import format_paired, paired_ratio, rotated
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from turnlog.errors import VersionConflictError
from turnlog.storage.embedded import EmbeddedPostgres
from turnlog.storage.migrations import migrate
from turnlog.storage.port import START_POSITION, NewEvent
from turnlog.storage.postgres import PostgresEventStore

PAYLOAD = {"role": "user", "text": "x" * 240, "n": 0}  # about 300 bytes, as in NOTES
NOTES = {
    "eventsourcing_16": (
        "eventsourcing's PostgresApplicationRecorder runs LOCK TABLE ... IN EXCLUSIVE MODE"
        " (and a NOTIFY) in every insert transaction and holds the lock through the commit:"
        " its 16 writers insert one at a time. turnlog's store takes no table lock."
    ),
    "ratios": "paired: per repetition, one scenario's events/s over the other's; median,"
    " min and max over repetitions",
}


def event(n: int) -> NewEvent:
    return NewEvent(event_id=uuid.uuid4(), type="MessageAppended", data={**PAYLOAD, "n": n})


async def checkpoint(dsn: str) -> None:
    """Flush dirty buffers now, outside the timed part (needs a superuser)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("CHECKPOINT")


async def timed(run: Callable[[], Awaitable[int]]) -> tuple[float, int]:
    """Events per second of one run, and its events (`run` returns how many it handled)."""
    start = time.perf_counter()
    count = await run()
    return count / (time.perf_counter() - start), count


async def append_distinct(store: PostgresEventStore, writers: int, total: int, batch: int) -> int:
    tag = uuid.uuid4().hex[:8]
    per_writer = total // writers // batch

    async def writer(w: int) -> None:
        version = 0
        for i in range(per_writer):
            events = [event(i * batch + k) for k in range(batch)]
            result = await store.append(f"{tag}-{w}", events, expected_version=version)
            version = result.last_version

    await asyncio.gather(*(writer(w) for w in range(writers)))
    return per_writer * writers * batch


async def append_contended(store: PostgresEventStore, writers: int, total: int) -> int:
    stream = f"hot-{uuid.uuid4().hex[:8]}"
    written = 0

    async def writer() -> None:
        nonlocal written
        version = 0
        while written < total:
            try:
                result = await store.append(stream, [event(written)], expected_version=version)
                version = result.last_version
                written += 1
            except VersionConflictError as e:
                version = e.actual_version

    await asyncio.gather(*(writer() for _ in range(writers)))
    return written


async def plain_inserts(pool: AsyncConnectionPool[Any], writers: int, total: int) -> int:
    tag = uuid.uuid4().hex[:8]
    per_writer = total // writers
    metadata = json.dumps({})

    async def writer(w: int) -> None:
        for i in range(per_writer):
            async with pool.connection() as conn:
                await conn.execute(
                    "INSERT INTO plain_events (stream_id, stream_version, event_id, type, data,"
                    " metadata) VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
                    (
                        f"{tag}-{w}",
                        i + 1,
                        uuid.uuid4(),
                        "MessageAppended",
                        json.dumps({**PAYLOAD, "n": i}),
                        metadata,
                    ),
                )

    await asyncio.gather(*(writer(w) for w in range(writers)))
    return per_writer * writers


def eventsourcing_recorder(dsn: str) -> Any:
    from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore

    params = conninfo_to_dict(dsn)
    datastore = PostgresDatastore(
        dbname=str(params["dbname"]),
        host=str(params.get("host", "localhost")),
        port=str(params.get("port", 5432)),
        user=str(params.get("user", "postgres")),
        password=str(params.get("password", "")),
        pool_size=16,
    )
    recorder = PostgresApplicationRecorder(datastore, events_table_name="es_stored_events")
    recorder.create_table()
    return recorder


async def eventsourcing_appends(recorder: Any, writers: int, total: int) -> int:
    from eventsourcing.persistence import StoredEvent

    per_writer = total // writers

    def writer(w: int) -> None:
        originator = uuid.uuid4()
        for i in range(per_writer):
            state = json.dumps({**PAYLOAD, "n": i}).encode()
            recorder.insert_events(
                [
                    StoredEvent(
                        originator_id=originator,
                        originator_version=i + 1,
                        topic="MessageAppended",
                        state=state,
                    )
                ]
            )

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(writers) as executor:
        await asyncio.gather(*(loop.run_in_executor(executor, writer, w) for w in range(writers)))
    return per_writer * writers


async def read_one_stream(store: PostgresEventStore, stream: str, decode: bool) -> int:
    count, version = 0, 1
    while True:
        events = await store.read_stream(stream, from_version=version, limit=1000)
        for e in events:
            if decode:
                e.data  # noqa: B018 - decoding is what is measured
        count += len(events)
        if len(events) < 1000:
            return count
        version = events[-1].stream_version + 1


async def read_all_streams(store: PostgresEventStore) -> int:
    count, position = 0, START_POSITION
    while True:
        page = await store.read_all(after=position, limit=1000)
        count += len(page.events)
        position = page.next_position
        if page.reached_end:
            return count


async def bench(dsn: str, events: int, reps: int) -> dict[str, Any]:
    await migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS plain_events (id bigserial PRIMARY KEY,"
            " stream_id text NOT NULL, stream_version bigint NOT NULL, event_id uuid NOT NULL,"
            " type text NOT NULL, data json NOT NULL, metadata json NOT NULL,"
            " recorded_at timestamptz NOT NULL DEFAULT now())"
        )
    store = await PostgresEventStore.open(dsn, min_size=17, max_size=20)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        dsn, min_size=17, max_size=20, kwargs={"autocommit": True}, open=False
    )
    await pool.open(wait=True)
    recorder = eventsourcing_recorder(dsn)

    scenarios: dict[str, Callable[[], Awaitable[int]]] = {
        "append_1": lambda: append_distinct(store, 1, events // 2, 1),
        "append_4": lambda: append_distinct(store, 4, events, 1),
        "append_16": lambda: append_distinct(store, 16, events, 1),
        "plain_insert_16": lambda: plain_inserts(pool, 16, events),
        # The same events as append_16 and plain_insert_16 (it once had half).
        "eventsourcing_16": lambda: eventsourcing_appends(recorder, 16, events),
        "append_16_one_stream": lambda: append_contended(store, 16, events // 2),
        "append_16_batch10": lambda: append_distinct(store, 16, events * 2, 10),
    }
    results: dict[str, list[float]] = {name: [] for name in scenarios}
    counts: dict[str, set[int]] = {name: set() for name in scenarios}
    # Interleave repetitions and rotate their order, so that drift (table
    # growth) and the background work a heavy scenario leaves behind
    # (checkpoints, autovacuum) do not always land on the same scenario; and
    # start every run from a fresh checkpoint.
    for rep in range(reps):
        for name in rotated(list(scenarios), rep):
            await checkpoint(dsn)
            rate, count = await timed(scenarios[name])
            results[name].append(rate)
            counts[name].add(count)

    read_stream = f"read-{uuid.uuid4().hex[:8]}"
    for start in range(0, events, 100):
        await store.append(
            read_stream, [event(start + k) for k in range(100)], expected_version=start
        )
    reads: dict[str, Callable[[], Awaitable[int]]] = {
        "read_one_stream_raw": lambda: read_one_stream(store, read_stream, decode=False),
        "read_one_stream_decoded": lambda: read_one_stream(store, read_stream, decode=True),
        "read_all_streams_raw": lambda: read_all_streams(store),
    }
    for name in reads:
        results[name] = []
        counts[name] = set()
    for rep in range(reps):
        for name in rotated(list(reads), rep):
            rate, count = await timed(reads[name])
            results[name].append(rate)
            counts[name].add(count)

    await store.close()
    await pool.close()
    recorder.datastore.close()
    medians = {name: statistics.median(values) for name, values in results.items()}
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*), current_setting('server_version') FROM turnlog.events"
        ).fetchone()
    assert row is not None
    return {
        "events_per_run": events,
        "repetitions": reps,
        "server_version": row[1],
        "events_in_log_at_read_time": row[0],
        "events_per_second": {name: round(v) for name, v in medians.items()},
        "runs": {name: [round(v) for v in values] for name, values in results.items()},
        # Every run of a scenario handles the same number of events.
        "events_per_scenario": {name: max(c) for name, c in counts.items()},
        "notes": NOTES,
        "ratios": {
            "append_16_vs_plain_insert": paired_ratio(
                results["append_16"], results["plain_insert_16"]
            ),
            "append_16_vs_eventsourcing": paired_ratio(
                results["append_16"], results["eventsourcing_16"]
            ),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="use this database instead of an embedded server")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: --events 320 --reps 2 unless given")  # fmt: skip
    parser.add_argument("--events", type=int, help="events per run (default 4800)")
    parser.add_argument("--reps", type=int, help="repetitions (default 5)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    if args.events is None:
        args.events = 320 if args.quick else 4800
    if args.reps is None:
        args.reps = 2 if args.quick else 5
    if args.events % 160:
        parser.error("--events must be a multiple of 160 (16 writers, 10-event batches)")

    server: EmbeddedPostgres | None = None
    dsn = args.dsn
    if dsn is None:
        server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="turnlog-bench-")) / "pg")
        dsn = server.start()
    try:
        figures = asyncio.run(bench(dsn, args.events, args.reps))
    finally:
        if server is not None:
            server.stop()

    print(
        f"PostgreSQL {figures['server_version']}, {args.events} events/run, median of {args.reps}"
    )
    print(f"{'scenario':<28}{'events/s':>12}   runs")
    for name, value in figures["events_per_second"].items():
        print(f"{name:<28}{value:>12,}   {figures['runs'][name]}")
    print("eventsourcing_16:", NOTES["eventsourcing_16"])
    print(f"events per run: {figures['events_per_scenario']}")
    print("paired ratios, median (min-max) of per-repetition ratios:")
    for name, value in figures["ratios"].items():
        print(f"  {name:<36}{format_paired(value)}")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
