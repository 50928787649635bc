-- 0002: tenants. Every event belongs to one tenant, named in its metadata.
--
-- Applied by turnlog.storage.migrations.migrate(); docs/event-log.md,
-- "Tenants", explains the design.
--
-- The column is generated from the metadata, which the hash chain covers, so
-- it can never disagree with what was hashed: moving an event to another
-- tenant means editing its metadata, and verify() names that event as edited.
-- Events recorded before tenancy have no tenant in their metadata and belong
-- to the tenant 'default' (turnlog.storage.port.DEFAULT_TENANT, which reads
-- the metadata the same way in Python).
--
-- `->>` de-escapes the whole metadata text: a \u0000 escape or an unpaired
-- surrogate escape anywhere in it fails the insert (it cannot become text).
-- Both stores refuse such metadata, and a tenant that is not a JSON string,
-- before writing (turnlog.storage.checks), so they reject the same input.
--
-- Adding a stored generated column rewrites the table, holding an ACCESS
-- EXCLUSIVE lock until the migration commits: on a large log, appends and
-- reads wait for the rewrite and the index build.
ALTER TABLE turnlog.events
    ADD COLUMN tenant text GENERATED ALWAYS AS (coalesce(metadata->>'tenant', 'default')) STORED;

-- One tenant's all-stream read in the read order (transaction_id,
-- global_position) is a range scan of this index: it never visits another
-- tenant's rows, however many there are.
--
-- What it costs an append: one more index entry per event, beside the
-- column's own JSON parse. Server time per single-event append_events call
-- (20,000 in a server-side loop, 9 paired rounds, PostgreSQL 18.6 on the
-- 2-core development machine): 44 us before; paired medians +4.2 us for
-- the column, +3.0 us more for this index, +8.6 us (+18%) for both (an
-- earlier 8-round run: +6.2 us, +14%). From the client it is lost in the
-- noise of a shared machine: bench/event_store.py
-- before/after (3 runs each, medians of their medians) append_1 1,983 ->
-- 2,045 events/s, append_16 5,309 -> 5,736, append_16_vs_plain_insert 0.67
-- -> 0.71; alternating appends into a 0001-only and a 0002 database on one
-- server (30 paired runs), after/before = 1.02 (1 writer), 0.99 (16
-- writers), 0.95 (16 writers, 10-event batches).
CREATE INDEX events_tenant_read_order_idx
    ON turnlog.events (tenant, transaction_id, global_position);
