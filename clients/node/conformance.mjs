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
// v1)", hashchain.js), equals the one received; and whether the chain is
// intact.
// `clients/conformance/compare.py DIR` then compares them with Python's.

import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";
import { parseArgs } from "node:util";

import { fromBinary, toJson } from "@bufbuild/protobuf";

import { ReadEventsResponseSchema } from "./gen/turnlog/v1/conversation_service_pb.js";
import { LogEventSchema } from "./gen/turnlog/v1/history_pb.js";
import { verifyChain } from "./hashchain.js";

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
  const chain = verifyChain(response.events);
  return {
    file: name,
    chain: { intact: chain.intact, events: response.events.length, head_hash: chain.headHash },
    events: response.events.map((event, index) => ({
      version: Number(event.version),
      type: event.type,
      hash_ok: chain.hashOk[index],
      ...typedMember(event),
    })),
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
