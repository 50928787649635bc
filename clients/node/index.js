// The few pieces every Node program talking to turnlog needs, kept apart
// from the example so that it can stay a straight story:
//
// - `connectTurnlog`: a ConversationService client over Connect's gRPC
//   transport (HTTP/2), sending `authorization: Bearer <token>` on every
//   call, with its own HTTP/2 connection that `close()` really closes (so a
//   program can cut a stream and reconnect, as the quickstart does).
// - `describeError`: a failed call as the gRPC code name and the
//   google.rpc.ErrorInfo reason turnlog puts in every error's details
//   (`grpc-status-details-bin`), the two things a program branches on.
// - `RequestQueue`: the request side of a bidirectional stream (Converse),
//   fed while the responses are being read.
// - `verifyChain` (from hashchain.js): a conversation's hash chain checked
//   on the client, from the documented encoding.

import { createClient, Code, ConnectError } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

import { LogEventSchema } from "./gen/turnlog/v1/history_pb.js";
import { ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";
import { ConversationService } from "./gen/turnlog/v1/conversation_service_pb.js";

export * from "./gen/turnlog/v1/conversation_pb.js";
export * from "./gen/turnlog/v1/conversation_service_pb.js";
export * from "./gen/turnlog/v1/errors_pb.js";
export * from "./gen/turnlog/v1/events_pb.js";
export * from "./gen/turnlog/v1/history_pb.js";
export { ErrorInfoSchema };
export { eventHash, verifyChain } from "./hashchain.js";

/**
 * The base URL of a target: "host:port" is plain-text HTTP/2 (what `turnlog
 * serve` speaks on loopback); a full "http://" or "https://" URL is kept.
 *
 * @param {string} target
 * @returns {string}
 */
export function baseUrlOf(target) {
  return /^https?:\/\//.test(target) ? target : `http://${target}`;
}

/**
 * A ConversationService client on a connection of its own.
 *
 * @param {{target: string, token?: string}} options `target` as "host:port"
 *   or a URL; `token` is sent as a bearer token on every call (turnlog
 *   answers calls without one UNAUTHENTICATED).
 * @returns {{client: import("@connectrpc/connect").Client<typeof ConversationService>, close: () => void}}
 *   `close()` ends the HTTP/2 connection and every call still on it.
 */
export function connectTurnlog({ target, token }) {
  const baseUrl = baseUrlOf(target);
  // One session manager per client: closing it closes this client's
  // connection only (the default would share none, but gives no handle).
  const sessionManager = new Http2SessionManager(baseUrl);
  const bearer = (next) => async (req) => {
    if (token) req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
  const transport = createGrpcTransport({
    baseUrl,
    httpVersion: "2",
    sessionManager,
    interceptors: [bearer],
  });
  return {
    client: createClient(ConversationService, transport),
    close: () => sessionManager.abort(),
  };
}

/**
 * A failed call as `{code, reason, message}`: the gRPC code's name
 * (e.g. "NOT_FOUND"), the ErrorInfo reason (e.g. "NOT_FOUND",
 * "" when the error carries none) and the server's safe message.
 *
 * @param {unknown} err
 * @returns {{code: string, reason: string, message: string, metadata?: Record<string, string>}}
 */
export function describeError(err) {
  const error = ConnectError.from(err);
  const [info] = error.findDetails(ErrorInfoSchema);
  const out = {
    code: grpcCodeName(error.code),
    reason: info?.reason ?? "",
    message: error.rawMessage,
  };
  if (info && Object.keys(info.metadata).length > 0) out.metadata = { ...info.metadata };
  return out;
}

/**
 * The gRPC name of a Connect code: Code.NotFound → "NOT_FOUND".
 *
 * @param {Code} code
 * @returns {string}
 */
export function grpcCodeName(code) {
  if (code === Code.Canceled) return "CANCELLED"; // gRPC spells it with two Ls
  return Code[code].replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

/**
 * The request side of a client or bidirectional stream: `push` messages
 * while the responses are read, `close` to half-close. Iterating it is what
 * Connect does to send them.
 */
export class RequestQueue {
  #items = [];
  #waiting = null;
  #closed = false;

  /** Queue a request message (or its init object). */
  push(message) {
    if (this.#closed) throw new Error("push after close");
    this.#items.push(message);
    this.#wake();
  }

  /** Half-close: the stream ends once the queued messages are sent. */
  close() {
    this.#closed = true;
    this.#wake();
  }

  #wake() {
    const wake = this.#waiting;
    this.#waiting = null;
    wake?.();
  }

  async *[Symbol.asyncIterator]() {
    for (;;) {
      if (this.#items.length > 0) {
        yield this.#items.shift();
      } else if (this.#closed) {
        return;
      } else {
        await new Promise((resolve) => (this.#waiting = resolve));
      }
    }
  }
}

/**
 * The proto name of the typed member a LogEvent carries (e.g.
 * "turn_completed" for a TurnCompleted event), or null when it came raw.
 * protobuf-es names oneof cases in lowerCamelCase; the proto, the docs and
 * other languages use the snake_case field name.
 *
 * @param {import("./gen/turnlog/v1/history_pb.js").LogEvent} event
 * @returns {string | null}
 */
export function typedMemberName(event) {
  const member = event.event.case;
  if (member === undefined) return null;
  return LogEventSchema.fields.find((f) => f.localName === member).name;
}
