-- 0001: the event log, its append function and snapshots.
--
-- Applied by turnlog.storage.migrations.migrate() inside one transaction that
-- holds an advisory lock; never run by hand. docs/event-log.md explains the
-- design; the hash encoding below is mirrored, byte for byte, by
-- turnlog.storage.hashchain.event_hash (tests keep the two in agreement).

CREATE TABLE turnlog.events (
    -- Ordering across all streams. Allocated before commit, so concurrent
    -- transactions may commit out of position order: all-stream readers order
    -- by (transaction_id, global_position) below a snapshot's xmin instead.
    global_position bigint GENERATED ALWAYS AS IDENTITY,
    -- The writing transaction (xid8: epoch-extended, never wraps). Written by
    -- the INSERT itself, which costs nothing measurable (NOTES-postgres.md).
    transaction_id  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    stream_id       text        NOT NULL CHECK (stream_id <> ''),
    stream_version  bigint      NOT NULL CHECK (stream_version > 0),
    event_id        uuid        NOT NULL,
    type            text        NOT NULL CHECK (type <> ''),
    -- json, not jsonb: the text is kept verbatim, so it is exactly what the
    -- hash covers, and readers can pass it on without decoding.
    data            json        NOT NULL,
    metadata        json        NOT NULL,
    recorded_at     timestamptz NOT NULL,
    prev_hash       bytea       NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash            bytea       NOT NULL CHECK (octet_length(hash) = 32),
    -- The primary key is the all-stream read order (docs/event-log.md, "No
    -- skipped events"). global_position is unique on its own (an identity
    -- column nobody may set); a separate index on it would cost every append
    -- an index insert that no query uses.
    CONSTRAINT events_pkey PRIMARY KEY (transaction_id, global_position),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version)
);

CREATE TABLE turnlog.snapshots (
    stream_id      text        NOT NULL,
    -- What the state is (its schema name and version): a reader asks for the
    -- kind it understands, so a changed state shape never loads old bytes.
    kind           text        NOT NULL CHECK (kind <> ''),
    stream_version bigint      NOT NULL CHECK (stream_version > 0),
    state          bytea       NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, kind, stream_version)
);

-- The hash chain, encoding v1 (mirrored byte for byte by
-- turnlog.storage.hashchain.event_hash):
-- sha256("turnlog.event.v1" || prev_hash || f(stream_id) || int8(version)
--        || event_id (16 bytes) || f(type) || f(data) || f(metadata)
--        || int8(recorded_at in microseconds since the Unix epoch))
-- where f(x) = int8(octet length of UTF-8 x) || UTF-8 x, ints big-endian.
-- A one-expression SQL function: the planner inlines it into the statements
-- that call it, so it costs what the expression costs.
CREATE FUNCTION turnlog.event_hash(
    prev_hash bytea, stream_id text, stream_version bigint, event_id uuid,
    type text, data text, metadata text, recorded_at timestamptz
) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN sha256(
    'turnlog.event.v1'::bytea || prev_hash
    || int8send(octet_length(convert_to(stream_id, 'UTF8'))::bigint) || convert_to(stream_id, 'UTF8')
    || int8send(stream_version)
    || uuid_send(event_id)
    || int8send(octet_length(convert_to(type, 'UTF8'))::bigint) || convert_to(type, 'UTF8')
    || int8send(octet_length(convert_to(data, 'UTF8'))::bigint) || convert_to(data, 'UTF8')
    || int8send(octet_length(convert_to(metadata, 'UTF8'))::bigint) || convert_to(metadata, 'UTF8')
    || int8send((extract(epoch FROM recorded_at) * 1000000)::bigint));

-- Appends a batch to one stream in one statement (one round trip).
--
-- p_expected_version: NULL appends at the end whatever the version; otherwise
-- the stream must be at exactly that version (0: the stream must not exist).
-- Raises SQLSTATE TL001 (DETAIL: the actual version) on a version mismatch and
-- TL002 (DETAIL: the event id) when an event id is stored with other content
-- or in another stream. A batch whose ids are all stored already, in this
-- stream, in this order, with this content, is an idempotent retry: it writes
-- nothing and returns the original result.
--
-- The idempotency lookup runs only where a stored id is possible without a
-- unique violation: when the version check fails (a retry of a committed
-- append names a now stale version), for NULL (any version), or when the
-- caller asks (p_check_ids). Otherwise a reused id surfaces as unique_violation
-- on events_event_id_key, and the client runs the call again with
-- p_check_ids; it does the same for unique_violation on
-- events_stream_version_key (a concurrent append won the race), and the rerun
-- then reports the conflict with the winner's version. This keeps the common
-- path to one index probe and the inserts: in a server-side loop this function
-- costs about 31 us per single-event append against 65 us for a variant that
-- always looked ids up and inserted through RETURN QUERY / unnest.
CREATE FUNCTION turnlog.append_events(
    p_stream_id        text,
    p_expected_version bigint,
    p_event_ids        uuid[],
    p_types            text[],
    p_data             text[],
    p_metadata         text[],
    p_check_ids        boolean,
    OUT first_version  bigint,
    OUT last_version   bigint,
    OUT positions      bigint[],
    OUT recorded_at    timestamptz
)
LANGUAGE plpgsql
AS $fn$
#variable_conflict use_column
DECLARE
    v_count    int := cardinality(p_event_ids);
    v_now      timestamptz := now();
    v_actual   bigint;
    v_prev     bytea;
    v_hash     bytea;
    v_position bigint;
    v_found    int;
    v_matching int;
BEGIN
    IF v_count IS NULL OR v_count = 0 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'an append needs at least one event';
    END IF;

    SELECT e.stream_version, e.hash INTO v_actual, v_prev
    FROM turnlog.events e
    WHERE e.stream_id = p_stream_id
    ORDER BY e.stream_version DESC
    LIMIT 1;
    IF NOT FOUND THEN
        v_actual := 0;
        v_prev := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
    END IF;

    IF p_check_ids OR p_expected_version IS NULL OR p_expected_version <> v_actual THEN
        -- Idempotency: the unique event_id index is the durable record.
        SELECT count(*) INTO v_found FROM turnlog.events e WHERE e.event_id = ANY (p_event_ids);
        IF v_found > 0 THEN
            SELECT count(*) INTO v_matching
            FROM unnest(p_event_ids, p_types, p_data, p_metadata) WITH ORDINALITY
                     AS n (event_id, type, data, metadata, ord)
            JOIN turnlog.events e ON e.event_id = n.event_id
            WHERE e.stream_id = p_stream_id
              AND e.type = n.type
              AND e.data::text = n.data
              AND e.metadata::text = n.metadata
              AND e.stream_version = (
                    SELECT f.stream_version FROM turnlog.events f
                    WHERE f.event_id = p_event_ids[1]) + n.ord - 1;
            IF v_matching = v_count THEN
                SELECT min(e.stream_version), max(e.stream_version),
                       array_agg(e.global_position ORDER BY e.stream_version),
                       min(e.recorded_at)
                INTO first_version, last_version, positions, recorded_at
                FROM turnlog.events e WHERE e.event_id = ANY (p_event_ids);
                RETURN;
            END IF;
            RAISE EXCEPTION USING
                ERRCODE = 'TL002',
                MESSAGE = 'an event id of this batch is stored already with other content or stream',
                DETAIL = (SELECT e.event_id::text FROM turnlog.events e
                          WHERE e.event_id = ANY (p_event_ids) LIMIT 1);
        END IF;
        IF p_expected_version IS NOT NULL AND p_expected_version <> v_actual THEN
            RAISE EXCEPTION USING
                ERRCODE = 'TL001', MESSAGE = 'stream version conflict', DETAIL = v_actual::text;
        END IF;
    END IF;

    positions := '{}';
    FOR i IN 1 .. v_count LOOP
        v_hash := turnlog.event_hash(v_prev, p_stream_id, v_actual + i, p_event_ids[i],
                                     p_types[i], p_data[i], p_metadata[i], v_now);
        -- Inserting one row at a time keeps positions in version order.
        INSERT INTO turnlog.events
            (stream_id, stream_version, event_id, type, data, metadata,
             recorded_at, prev_hash, hash)
        VALUES (p_stream_id, v_actual + i, p_event_ids[i], p_types[i], p_data[i]::json,
                p_metadata[i]::json, v_now, v_prev, v_hash)
        RETURNING global_position INTO v_position;
        positions := positions || v_position;
        v_prev := v_hash;
    END LOOP;
    first_version := v_actual + 1;
    last_version := v_actual + v_count;
    recorded_at := v_now;
END
$fn$;
