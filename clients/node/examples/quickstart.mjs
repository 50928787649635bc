#!/usr/bin/env node
// turnlog from Node, start to end: the program to copy.
//
//   TURNLOG_TOKEN=... node examples/quickstart.mjs [host:port]
//
// It creates a conversation offering one client-side tool (get_weather),
// then:
//   1. streams a turn with StreamTurn and, after a few events, cuts the
//      connection (aborts the call and closes the HTTP/2 session);
//   2. connects again and resumes the turn with ResumeTurn{after_sequence}
//      to its end: turnlog numbers a turn's events 1, 2, 3 ... and a resume
//      sends exactly those after the given number;
//   3. runs a second turn over Converse: when the model calls get_weather
//      the service asks this program (ToolExecutionStarted client_side) and
//      the program answers with a ToolResult on the same stream;
//   4. starts a turn and cancels it with CancelTurn from a second
//      connection, then sees its TurnEnded CANCELLED;
//   5. reads the conversation's typed history with ReadEvents
//      (EVENT_VIEW_TYPED), page by page to the end;
//   6. verifies the conversation's hash chain here, from its raw events
//      (EVENT_VIEW_RAW: the hash covers the stored JSON text), and asks the
//      service to verify it too (VerifyConversation).
// Each step prints one JSON line. A failed call prints its gRPC code and
// the ErrorInfo reason turnlog attaches, and the program exits 1.
//
// Options: --cut-after N (events read before cutting, default 3),
//          --page-size N (ReadEvents page size, default 10),
//          --skip-cancel (for a server older than CancelTurn).

import { randomUUID } from "node:crypto";
import { parseArgs } from "node:util";

import { toJson } from "@bufbuild/protobuf";

import {
  EventView,
  LogEventSchema,
  RequestQueue,
  TurnStatus,
  connectTurnlog,
  describeError,
  grpcCodeName,
  typedMemberName,
  verifyChain,
} from "../index.js";

const { values: options, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    "cut-after": { type: "string", default: "3" },
    "page-size": { type: "string", default: "10" },
    "skip-cancel": { type: "boolean", default: false },
  },
});
const target = positionals[0] ?? process.env.TURNLOG_TARGET ?? "127.0.0.1:50051";
const token = process.env.TURNLOG_TOKEN ?? "";
const cutAfter = Number(options["cut-after"]);
const pageSize = Number(options["page-size"]);

/** One JSON line per step on stdout (bigint values as strings). */
function report(step, fields) {
  const line = JSON.stringify({ step, ...fields }, (_, v) =>
    typeof v === "bigint" ? v.toString() : v,
  );
  process.stdout.write(`${line}\n`);
}

/** A TurnStatus value as its proto name, e.g. "TURN_STATUS_COMPLETED". */
const statusName = (status) => `TURN_STATUS_${TurnStatus[status]}`;

/** What a program usually keeps of a turn event: its number and kind. */
function brief(event) {
  return { sequence: Number(event.sequence), kind: event.kind.case };
}

// The client-side tool this program offers and runs.
const WEATHER_TOOL = {
  name: "get_weather",
  description: "The current weather in a city.",
  parametersJsonSchema: JSON.stringify({
    type: "object",
    properties: { city: { type: "string" } },
    required: ["city"],
  }),
  clientSide: true,
};

function getWeather(argumentsJson) {
  const { city } = JSON.parse(argumentsJson);
  return JSON.stringify({ city, forecast: "sunny", celsius: 21 });
}

/** Every event of a conversation, reading ReadEvents page by page to the end. */
async function readAllEvents(client, conversation, view) {
  const events = [];
  let pages = 0;
  let pageToken = "";
  do {
    const page = await client.readEvents({ conversation, view, pageSize, pageToken });
    pages += 1;
    events.push(...page.events);
    pageToken = page.nextPageToken;
  } while (pageToken !== "");
  return { events, pages };
}

let step = "create";
try {
  // ---- create a conversation offering the client-side tool ----------------
  let session = connectTurnlog({ target, token });
  const { conversation } = await session.client.createConversation({
    requestId: randomUUID(),
    systemPrompt: "You are a concise assistant.",
    tools: [WEATHER_TOOL],
  });
  const name = conversation.name;
  report(step, { conversation: name, version: conversation.version });

  // ---- 1. stream a turn, then cut the connection --------------------------
  step = "stream";
  const cut = new AbortController();
  const seen = [];
  let turnId = "";
  let ended = null;
  try {
    const stream = session.client.streamTurn(
      {
        action: {
          case: "start",
          value: {
            conversation: name,
            requestId: randomUUID(),
            content: "Tell me a story about the sea.",
          },
        },
      },
      { signal: cut.signal },
    );
    for await (const { event } of stream) {
      turnId = event.turnId;
      seen.push(brief(event));
      if (event.kind.case === "turnEnded") ended = event.kind.value.turn;
      if (seen.length >= cutAfter) {
        cut.abort(); // stop reading this call ...
        session.close(); // ... and drop the connection under it
        break;
      }
    }
  } catch (err) {
    if (!cut.signal.aborted) throw err; // the abort is ours; anything else is not
  }
  const lastSeen = seen.at(-1)?.sequence ?? 0;
  report(step, { turn_id: turnId, events: seen, cut: ended === null, last_sequence: lastSeen });

  // ---- 2. reconnect and resume after the last event seen ------------------
  step = "resume";
  session = connectTurnlog({ target, token });
  const resumed = [];
  let text = "";
  for await (const { event } of session.client.streamTurn({
    action: {
      case: "resume",
      value: { conversation: name, turnId, afterSequence: BigInt(lastSeen) },
    },
  })) {
    resumed.push(brief(event));
    if (event.kind.case === "textDelta") text += event.kind.value.text;
    if (event.kind.case === "turnEnded") ended = event.kind.value.turn;
  }
  report(step, {
    turn_id: turnId,
    after_sequence: lastSeen,
    events: resumed,
    status: ended ? statusName(ended.status) : null,
    text_chars: text.length,
  });

  // ---- 3. a turn over Converse that calls the client-side tool ------------
  step = "converse";
  const requests = new RequestQueue();
  requests.push({
    action: {
      case: "userMessage",
      value: {
        conversation: name,
        requestId: randomUUID(),
        content: "What is the weather in Paris?",
      },
    },
  });
  const converse = {
    turn_id: "",
    events: [],
    tool_calls: [],
    tool_results: [],
    rejected: [],
    status: null,
  };
  for await (const { event, actionRejected } of session.client.converse(requests)) {
    if (actionRejected) {
      // One of our requests was refused (e.g. a result for a call not
      // awaited); the stream and a running turn go on.
      const { code, reason, message } = actionRejected.error;
      const index = Number(actionRejected.actionIndex);
      converse.rejected.push({ action_index: index, code: grpcCodeName(code), reason, message });
      continue;
    }
    converse.turn_id = event.turnId;
    converse.events.push(brief(event));
    const { case: kind, value } = event.kind;
    if (kind === "toolExecutionStarted" && value.clientSide) {
      const call = value.call;
      converse.tool_calls.push({
        call_id: call.callId,
        name: call.name,
        arguments: call.argumentsJson,
      });
      const result = getWeather(call.argumentsJson);
      requests.push({
        action: {
          case: "toolResult",
          value: { turnId: event.turnId, callId: call.callId, result },
        },
      });
    } else if (kind === "toolExecutionFinished") {
      const execution = value.execution;
      converse.tool_results.push({ call_id: execution.call.callId, result: execution.result });
    } else if (kind === "turnEnded") {
      converse.status = statusName(value.turn.status);
      requests.close(); // half-close: the service ends the stream once its turns have ended
    }
  }
  report(step, converse);

  // ---- 4. cancel a running turn from a second connection ------------------
  if (!options["skip-cancel"]) {
    step = "cancel";
    const watcher = connectTurnlog({ target, token });
    const canceller = connectTurnlog({ target, token });
    const cancel = { turn_id: "", events: [], cancel_status: null, status: null, reason: "" };
    for await (const { event } of watcher.client.streamTurn({
      action: {
        case: "start",
        value: {
          conversation: name,
          requestId: randomUUID(),
          content: "Count slowly to one thousand.",
        },
      },
    })) {
      cancel.events.push(brief(event));
      if (event.kind.case === "turnStarted") {
        cancel.turn_id = event.turnId;
        const { turn } = await canceller.client.cancelTurn({
          conversation: name,
          turnId: event.turnId,
          reason: "the quickstart cancels it",
        });
        cancel.cancel_status = statusName(turn.status);
      } else if (event.kind.case === "turnEnded") {
        cancel.status = statusName(event.kind.value.turn.status);
        cancel.reason = event.kind.value.turn.outcomeReason;
      }
    }
    watcher.close();
    canceller.close();
    report(step, cancel);
  }

  // ---- 5. the typed history, page by page ---------------------------------
  step = "history";
  const { events, pages } = await readAllEvents(session.client, name, EventView.TYPED);
  report(step, {
    conversation: name,
    pages,
    types: events.map((e) => e.type),
    members: events.map((e) => typedMemberName(e)),
    versions: events.map((e) => Number(e.version)),
    // The events as proto3 JSON (proto field names), for comparing with
    // what another client reads.
    events: events.map((e) => toJson(LogEventSchema, e, { useProtoFieldName: true })),
  });

  // ---- 6. the hash chain, verified here and by the service ----------------
  step = "verify";
  const raw = (await readAllEvents(session.client, name, EventView.RAW)).events;
  const chain = verifyChain(raw);
  const verified = await session.client.verifyConversation({ name });
  report(step, {
    intact: chain.intact,
    events: raw.length,
    head_hash: chain.headHash,
    service: { intact: verified.intact, last_version: Number(verified.lastVersion) },
  });
  session.close();
} catch (err) {
  report(step, { error: describeError(err) });
  process.exit(1); // now, without waiting for calls still open on other connections
}
