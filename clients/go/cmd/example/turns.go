package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	turnlogv1 "github.com/turnlog/turnlog/clients/go/turnlog/v1"
)

// weatherTool is the client-side tool the conversation offers: the service
// does not run it; it asks the client over Converse and waits for the
// client's ToolResult.
var weatherTool = &turnlogv1.ToolDefinition{
	Name:        "get_weather",
	Description: "The weather forecast for a city.",
	ParametersJsonSchema: `{"type": "object", "properties": {"city": {"type": "string"}},` +
		` "required": ["city"], "additionalProperties": false}`,
	ClientSide: true,
}

func newClient(cc *grpc.ClientConn) turnlogv1.ConversationServiceClient {
	return turnlogv1.NewConversationServiceClient(cc)
}

// session runs the steps; conn dials the extra connections some steps need.
type session struct {
	conn connection
	api  turnlogv1.ConversationServiceClient
}

// showInvalidRequest sends a request the service refuses (a conversation id
// with spaces) to show what an error looks like: INVALID_ARGUMENT and an
// ErrorInfo reason, nothing recorded.
func (s session) showInvalidRequest(ctx context.Context) {
	_, err := s.api.CreateConversation(ctx, &turnlogv1.CreateConversationRequest{
		RequestId: newRequestID(), ConversationId: "not a valid id",
	})
	if err == nil {
		fail("invalid_request", errors.New("the service accepted an invalid conversation id"))
	}
	// Branch on the status code and the ErrorInfo reason (a turnlogv1.ErrorReason
	// name), never on the message.
	if status.Code(err) != codes.InvalidArgument || reasonOf(err) != turnlogv1.ErrorReason_INVALID_REQUEST.String() {
		fail("invalid_request", err) // not the refusal expected: no service, a bad token ...
	}
	emit("invalid_request", map[string]any{"error": statusOf(err)})
}

func (s session) createConversation(ctx context.Context) string {
	resp, err := s.api.CreateConversation(ctx, &turnlogv1.CreateConversationRequest{
		RequestId:    newRequestID(),
		SystemPrompt: "You are a helpful assistant.",
		Tools:        []*turnlogv1.ToolDefinition{weatherTool},
	})
	if err != nil {
		fail("create", err)
	}
	name := resp.GetConversation().GetName()
	emit("create", map[string]any{"conversation": name, "tools": []string{weatherTool.Name}})
	return name
}

// turnReader collects what a turn's stream shows.
type turnReader struct {
	turnID    string
	sequences []int64
	text      strings.Builder
	ended     *turnlogv1.TurnEnded
}

func (r *turnReader) add(e *turnlogv1.TurnEvent) {
	r.turnID = e.GetTurnId()
	r.sequences = append(r.sequences, e.GetSequence())
	if d := e.GetTextDelta(); d != nil {
		r.text.WriteString(d.GetText())
	}
	if end := e.GetTurnEnded(); end != nil {
		r.ended = end
	}
}

func (r *turnReader) last() int64 {
	if len(r.sequences) == 0 {
		return 0
	}
	return r.sequences[len(r.sequences)-1]
}

// streamAndResume starts a turn with StreamTurn, reads cutAfter events,
// closes the connection under the stream (as a network cut or a client
// restart would), dials again and resumes the turn with
// ResumeTurn{after_sequence: the last sequence seen} to its end. The turn
// runs on in the service meanwhile; the resumed stream continues at the
// next sequence, with no event missing or repeated.
func (s session) streamAndResume(ctx context.Context, name, prompt string, cutAfter int) {
	first, err := s.conn.dial(ctx)
	if err != nil {
		fail("stream", err)
	}
	stream, err := newClient(first).StreamTurn(ctx, &turnlogv1.StreamTurnRequest{
		Action: &turnlogv1.StreamTurnRequest_Start{Start: &turnlogv1.TurnInput{
			Conversation: name, RequestId: newRequestID(), Content: prompt,
		}},
	})
	if err != nil {
		fail("stream", err)
	}
	before := &turnReader{}
	for len(before.sequences) < cutAfter {
		resp, err := stream.Recv()
		if err != nil {
			fail("stream", err)
		}
		before.add(resp.GetEvent())
		if before.ended != nil {
			fail("stream", fmt.Errorf("the turn ended after %d events, before the cut", len(before.sequences)))
		}
	}
	first.Close() // the cut: the stream's connection is gone
	emit("stream", map[string]any{"turn_id": before.turnID, "sequences": before.sequences, "text": before.text.String()})

	second, err := s.conn.dial(ctx)
	if err != nil {
		fail("resume", err)
	}
	defer second.Close()
	resumed, err := newClient(second).StreamTurn(ctx, &turnlogv1.StreamTurnRequest{
		Action: &turnlogv1.StreamTurnRequest_Resume{Resume: &turnlogv1.ResumeTurn{
			Conversation: name, TurnId: before.turnID, AfterSequence: before.last(),
		}},
	})
	if err != nil {
		fail("resume", err)
	}
	after := &turnReader{}
	for {
		resp, err := resumed.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			fail("resume", err)
		}
		after.add(resp.GetEvent())
	}
	if after.ended == nil {
		fail("resume", errors.New("the stream ended without TurnEnded"))
	}
	emit("resume", map[string]any{
		"turn_id":        after.turnID,
		"after_sequence": before.last(),
		"sequences":      after.sequences,
		"text":           after.text.String(),
		"status":         after.ended.GetTurn().GetStatus().String(),
	})
}

// answerTool runs the client-side tool: here, a canned forecast for the
// city the model asked about.
func answerTool(call *turnlogv1.ToolCall) (result string, failure string) {
	var args struct {
		City string `json:"city"`
	}
	if err := json.Unmarshal([]byte(call.GetArgumentsJson()), &args); err != nil || args.City == "" {
		return "", "get_weather needs a city"
	}
	out, _ := json.Marshal(map[string]string{"city": args.City, "forecast": "sunny, 21 °C"})
	return string(out), ""
}

// converseWithTool runs a turn over the bidirectional Converse stream. When
// the model calls the client-side tool, the service sends
// ToolExecutionStarted{client_side: true} and waits; the client runs the
// tool and sends a ToolResult on the same stream, and the turn goes on with
// it.
func (s session) converseWithTool(ctx context.Context, name, prompt string) {
	stream, err := s.api.Converse(ctx)
	if err != nil {
		fail("converse", err)
	}
	err = stream.Send(&turnlogv1.ConverseRequest{Action: &turnlogv1.ConverseRequest_UserMessage{
		UserMessage: &turnlogv1.TurnInput{Conversation: name, RequestId: newRequestID(), Content: prompt},
	}})
	if err != nil {
		fail("converse", err)
	}
	r := &turnReader{}
	var calls, sent, finished []map[string]any
	var reply string
	for {
		resp, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			fail("converse", err)
		}
		e := resp.GetEvent()
		r.add(e)
		switch {
		case e.GetToolExecutionStarted().GetClientSide():
			call := e.GetToolExecutionStarted().GetCall()
			calls = append(calls, map[string]any{"call_id": call.GetCallId(), "name": call.GetName(), "arguments_json": call.GetArgumentsJson()})
			result, failure := answerTool(call)
			err := stream.Send(&turnlogv1.ConverseRequest{Action: &turnlogv1.ConverseRequest_ToolResult{
				ToolResult: &turnlogv1.ToolResult{TurnId: e.GetTurnId(), CallId: call.GetCallId(), Result: result, Error: failure},
			}})
			if err != nil {
				fail("converse", err)
			}
			sent = append(sent, map[string]any{"call_id": call.GetCallId(), "result": result, "error": failure})
		case e.GetToolExecutionFinished() != nil:
			x := e.GetToolExecutionFinished().GetExecution()
			finished = append(finished, map[string]any{"call_id": x.GetCall().GetCallId(), "result": x.GetResult(), "error": x.GetError()})
		case e.GetAssistantMessage() != nil:
			reply = e.GetAssistantMessage().GetContent()
		case e.GetTurnEnded() != nil:
			// One turn is all this step runs: closing our side ends the session.
			if err := stream.CloseSend(); err != nil {
				fail("converse", err)
			}
		}
	}
	if r.ended == nil {
		fail("converse", errors.New("the stream ended without TurnEnded"))
	}
	emit("converse", map[string]any{
		"turn_id":           r.turnID,
		"sequences":         r.sequences,
		"tool_calls":        calls,
		"tool_results_sent": sent,
		"tools_finished":    finished,
		"assistant_message": reply,
		"status":            r.ended.GetTurn().GetStatus().String(),
	})
}

// cancelTurn starts a turn on one connection and cancels it with
// CancelTurn from another (as a second device or an operator would); the
// first stream then ends with TurnEnded, status CANCELLED.
func (s session) cancelTurn(ctx context.Context, name, prompt string) {
	first, err := s.conn.dial(ctx)
	if err != nil {
		fail("cancel", err)
	}
	defer first.Close()
	stream, err := newClient(first).StreamTurn(ctx, &turnlogv1.StreamTurnRequest{
		Action: &turnlogv1.StreamTurnRequest_Start{Start: &turnlogv1.TurnInput{
			Conversation: name, RequestId: newRequestID(), Content: prompt,
		}},
	})
	if err != nil {
		fail("cancel", err)
	}
	r := &turnReader{}
	resp, err := stream.Recv() // the first event names the turn
	if err != nil {
		fail("cancel", err)
	}
	r.add(resp.GetEvent())

	second, err := s.conn.dial(ctx)
	if err != nil {
		fail("cancel", err)
	}
	defer second.Close()
	cancelled, err := newClient(second).CancelTurn(ctx, &turnlogv1.CancelTurnRequest{
		Conversation: name, TurnId: r.turnID, Reason: "the user changed their mind",
	})
	if err != nil {
		fail("cancel", err)
	}
	for r.ended == nil {
		resp, err := stream.Recv()
		if err != nil {
			fail("cancel", err) // io.EOF too: the stream ended without TurnEnded
		}
		r.add(resp.GetEvent())
	}
	emit("cancel", map[string]any{
		"turn_id":         r.turnID,
		"sequences":       r.sequences,
		"response_status": cancelled.GetTurn().GetStatus().String(),
		"status":          r.ended.GetTurn().GetStatus().String(),
		"outcome_reason":  r.ended.GetTurn().GetOutcomeReason(),
	})
}
