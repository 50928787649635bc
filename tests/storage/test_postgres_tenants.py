"""One tenant's all-stream read in PostgreSQL: a range scan of the tenant index.

The contract (storage_contract.py) checks what a tenant read returns; this
checks how PostgreSQL gets it, with EXPLAIN on a log of 100 tenants of equal
size: an ordered scan of (tenant, transaction_id, global_position) that
visits no other tenant's row and sorts nothing, both as a one-off (custom)
plan and as the generic plan a prepared statement settles on after five
runs. (The planner may read a tenant holding a large share of the log
through the primary key instead, filtering: a few rows per hit, in heap
order, can cost less than random heap fetches. That is its call to make, by
the statistics; docs/event-log.md, "Tenants".)
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import psycopg
import pytest

from turnlog.storage.postgres import _READ_ALL_TENANT

TENANTS = 100
TRANSACTIONS = 10_000  # of 5 events each: 500 events per tenant
TENANT_INDEX = "events_tenant_read_order_idx"


@pytest.fixture
def log_of_many_tenants(database_url: str) -> Iterator[psycopg.Connection]:
    """The test's database holding 50,000 events of 100 tenants, interleaved, analyzed.

    Written by SQL, not the store (the plan depends on the rows, not on how
    they came): one transaction per 5 events, as appends of turns make them,
    each transaction another tenant's.
    """
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute(
            f"""
            DO $$ BEGIN
              FOR i IN 0..{TRANSACTIONS - 1} LOOP
                INSERT INTO turnlog.events (stream_id, stream_version, event_id, type, data,
                  metadata, recorded_at, prev_hash, hash)
                SELECT 's-' || (i % 1000), (i / 1000) * 5 + g, gen_random_uuid(), 'Happened',
                  '{{"text": "some text"}}',
                  json_build_object('tenant', 't' || (i % {TENANTS})), now(),
                  sha256('prev'), sha256('hash')
                FROM generate_series(1, 5) g;
                COMMIT;
              END LOOP;
            END $$
            """.encode()
        )
        conn.execute("VACUUM ANALYZE turnlog.events")
        yield conn


def params(conn: psycopg.Connection, *, after_index: int, limit: int = 100) -> dict[str, object]:
    """The store's parameters for tenant t7, after its `after_index`-th event (0: the start)."""
    tx, pos = "0", 0
    if after_index:
        row = conn.execute(
            "SELECT transaction_id::text, global_position FROM turnlog.events"
            " WHERE tenant = 't7' ORDER BY transaction_id, global_position"
            " OFFSET %s LIMIT 1",
            (after_index - 1,),
        ).fetchone()
        assert row is not None
        tx, pos = row
    return {"types": None, "prefix": None, "tenant": "t7", "tx": tx, "pos": pos, "limit": limit}


def assert_tenant_range_scan(plan: str, *, ordered: bool = True) -> None:
    """The read's scan is of the tenant index (in its order, unless `ordered` is False)."""
    scans = [s.strip() for s in plan.splitlines() if "Scan" in s and "Subquery Scan" not in s]
    main, tail = scans[-2], scans[-1]
    if ordered:
        assert main.startswith(f"->  Index Scan using {TENANT_INDEX}"), plan
        assert "Sort" not in plan, plan
    else:
        # Rows that fit one page may be fetched in heap order and sorted.
        assert TENANT_INDEX in main, plan
    assert "Seq Scan" not in plan, plan
    # The tail (the log's last readable row) is one backward probe of the primary key.
    assert tail.startswith("->  Index Only Scan Backward using events_pkey"), plan


def placeholders_in_order(query: bytes) -> list[str]:
    """psycopg's numbering of a query's named placeholders: order of first appearance."""
    names: list[str] = []
    for name in re.findall(rb"%\((\w+)\)s", query):
        if name.decode() not in names:
            names.append(name.decode())
    return names


def literal(value: object) -> str:
    return "NULL" if value is None else f"'{value}'"


@pytest.mark.parametrize(("after_index", "returned"), [(0, 100), (250, 100), (480, 20)])
async def test_one_tenants_read_is_a_range_scan_of_the_tenant_index(
    log_of_many_tenants: psycopg.Connection, after_index: int, returned: int
) -> None:
    conn = log_of_many_tenants
    values = params(conn, after_index=after_index)
    rows = conn.execute(b"EXPLAIN (ANALYZE, COSTS OFF) " + _READ_ALL_TENANT, values).fetchall()
    plan = "\n".join(r[0] for r in rows)
    # From the start and halfway: in index order, stopping at the limit; the
    # last 20 rows (fewer than the limit) may come in any order to be sorted.
    assert_tenant_range_scan(plan, ordered=returned == 100)
    # Every index entry visited is returned: no other tenant's row is read.
    assert "Rows Removed by Filter" not in plan, plan
    assert re.search(rf"Index Scan on {TENANT_INDEX}.*rows={returned}\b", plan) or re.search(
        rf"Index Scan using {TENANT_INDEX}.*rows={returned}\b", plan
    ), plan


async def test_the_generic_plan_of_the_prepared_read_is_the_same_range_scan(
    log_of_many_tenants: psycopg.Connection,
) -> None:
    conn = log_of_many_tenants
    conn.execute("SET plan_cache_mode = force_generic_plan")
    values: Mapping[str, object] = params(conn, after_index=500)
    conn.execute(_READ_ALL_TENANT, values, prepare=True).fetchall()
    row = conn.execute(
        "SELECT name FROM pg_prepared_statements WHERE statement LIKE '%%tenant%%'"
    ).fetchone()
    assert row is not None
    arguments = ", ".join(literal(values[n]) for n in placeholders_in_order(_READ_ALL_TENANT))
    rows = conn.execute(f"EXPLAIN (COSTS OFF) EXECUTE {row[0]}({arguments})".encode()).fetchall()
    plan = "\n".join(r[0] for r in rows)
    assert "$3" in plan or "$1" in plan, plan  # parameters, not constants: the generic plan
    assert_tenant_range_scan(plan)
