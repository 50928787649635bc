// A conversation's hash chain, verified on the client: every LogEvent's
// hash recomputed from its own fields with the documented encoding
// (docs/event-log.md, "Hash chain (encoding v1)"), and the links between
// them. Needs the events with their raw data_json (EVENT_VIEW_RAW or
// EVENT_VIEW_BOTH): the hash covers the stored text, not the typed form.
//
//   hash = sha256("turnlog.event.v1" || prev_hash || f(stream_id) || int8(version)
//                 || event_id (16 bytes) || f(type) || f(data_json) || f(metadata_json)
//                 || int8(record_time in µs since the Unix epoch))
//   f(s) = int8(UTF-8 byte length of s) || UTF-8 s;  int8 = 8 bytes big-endian, signed

import { createHash } from "node:crypto";

const HASH_DOMAIN = Buffer.from("turnlog.event.v1", "utf8");
/** The prev_hash of a stream's first event. */
export const GENESIS_HASH = Buffer.alloc(32);

/** int8 of the encoding: 8 bytes, big-endian, signed. */
function int8(value) {
  const out = Buffer.alloc(8);
  out.writeBigInt64BE(BigInt(value));
  return out;
}

/** f(s) of the encoding: int8(UTF-8 byte length) || UTF-8 bytes. */
function field(text) {
  const raw = Buffer.from(text, "utf8");
  return Buffer.concat([int8(raw.length), raw]);
}

/** The 16 bytes of a UUID written as text ("8-4-4-4-12" hex). */
function uuidBytes(text) {
  const hex = text.replaceAll("-", "");
  if (!/^[0-9a-fA-F]{32}$/.test(hex)) throw new Error(`not a UUID: ${text}`);
  return Buffer.from(hex, "hex");
}

/**
 * Microseconds since the Unix epoch of a Timestamp, as a BigInt: seconds
 * already is one (int64), and seconds * 10^6 passes 2^53 for any date after
 * 2255, so plain numbers would round it.
 */
function micros(timestamp) {
  return timestamp.seconds * 1_000_000n + BigInt(timestamp.nanos) / 1000n;
}

/**
 * An event's chain hash recomputed from its LogEvent fields (encoding v1).
 *
 * @param {import("./gen/turnlog/v1/history_pb.js").LogEvent} event
 * @returns {Buffer}
 */
export function eventHash(event) {
  return createHash("sha256")
    .update(HASH_DOMAIN)
    .update(event.prevHash)
    .update(field(event.streamId))
    .update(int8(event.version))
    .update(uuidBytes(event.eventId))
    .update(field(event.type))
    .update(field(event.dataJson))
    .update(field(event.metadataJson))
    .update(int8(micros(event.recordTime)))
    .digest();
}

/**
 * Checks a stream's events, read from its start in version order.
 *
 * @param {import("./gen/turnlog/v1/history_pb.js").LogEvent[]} events
 * @returns {{intact: boolean, hashOk: boolean[], headHash: string}}
 *   `hashOk[i]`: event i's hash recomputes; `intact`: all do, versions run
 *   1, 2, 3 ... and each prev_hash is the previous hash (zeros first);
 *   `headHash`: the last event's hash in hex ("" for none).
 */
export function verifyChain(events) {
  let intact = true;
  let expectedPrev = GENESIS_HASH;
  const hashOk = events.map((event, index) => {
    const ok = eventHash(event).equals(Buffer.from(event.hash));
    const linked = Buffer.from(event.prevHash).equals(expectedPrev);
    intact = intact && ok && linked && event.version === BigInt(index + 1);
    expectedPrev = Buffer.from(event.hash);
    return ok;
  });
  const last = events.at(-1);
  return { intact, hashOk, headHash: last ? Buffer.from(last.hash).toString("hex") : "" };
}
