#!/usr/bin/env node
// The Node side of the cross-language conformance check
// (clients/conformance/README.md has the format).
//
//   node conformance.mjs --out DIR ../conformance/golden/*.binpb
//
// Each input is a serialized turnlog.v1.ReadEventsResponse. For each, this
// writes DIR/<name>.json: every event's version, type, typed member as
// proto3 JSON (proto field names), and whether its hash, recomputed here
// from the documented encoding (docs/event-log.md, "Hash chain (encoding
// v1)"), equals the one received; and whether the chain is intact.
// `clients/conformance/compare.py DIR` then compares them with Python's.

import { createHash } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";
import { parseArgs } from "node:util";

import { fromBinary, toJson } from "@bufbuild/protobuf";

import { ReadEventsResponseSchema } from "./gen/turnlog/v1/conversation_service_pb.js";
import { LogEventSchema } from "./gen/turnlog/v1/history_pb.js";

const HASH_DOMAIN = Buffer.from("turnlog.event.v1", "utf8");
const GENESIS_HASH = Buffer.alloc(32);

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

/** An event's chain hash recomputed from its LogEvent fields (encoding v1). */
function eventHash(event) {
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

/** The typed oneof member as `{member, typed}` (proto field name, proto3 JSON). */
function typedMember(event) {
  const { case: localName, value } = event.event;
  if (localName === undefined) return { member: null, typed: null };
  const fieldDesc = LogEventSchema.fields.find((f) => f.localName === localName);
  return {
    member: fieldDesc.name,
    typed: toJson(fieldDesc.message, value, { useProtoFieldName: true }),
  };
}

/** The conformance summary of one ReadEventsResponse (README.md's format). */
function summarize(name, response) {
  const events = [];
  let intact = true;
  let expectedPrev = GENESIS_HASH;
  response.events.forEach((event, index) => {
    const hashOk = eventHash(event).equals(Buffer.from(event.hash));
    const linked = Buffer.from(event.prevHash).equals(expectedPrev);
    intact = intact && hashOk && linked && event.version === BigInt(index + 1);
    expectedPrev = Buffer.from(event.hash);
    events.push({
      version: Number(event.version),
      type: event.type,
      hash_ok: hashOk,
      ...typedMember(event),
    });
  });
  const last = response.events.at(-1);
  return {
    file: name,
    chain: {
      intact,
      events: events.length,
      head_hash: last ? Buffer.from(last.hash).toString("hex") : "",
    },
    events,
  };
}

function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: { out: { type: "string" } },
  });
  if (!values.out || positionals.length === 0) {
    process.stderr.write("usage: node conformance.mjs --out DIR FILE.binpb...\n");
    return 2;
  }
  mkdirSync(values.out, { recursive: true });
  for (const path of positionals) {
    const name = basename(path).replace(/\.binpb$/, "");
    const response = fromBinary(ReadEventsResponseSchema, readFileSync(path));
    const summary = summarize(name, response);
    writeFileSync(join(values.out, `${name}.json`), `${JSON.stringify(summary, null, 2)}\n`);
  }
  return 0;
}

process.exitCode = main();
