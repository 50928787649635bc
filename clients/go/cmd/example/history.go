package main

import (
	"context"
	"encoding/hex"
	"encoding/json"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/turnlog/turnlog/clients/go/hashchain"
	turnlogv1 "github.com/turnlog/turnlog/clients/go/turnlog/v1"
)

// typedJSON prints typed events in the proto3 JSON mapping with the proto
// field names (the form clients/conformance compares).
var typedJSON = protojson.MarshalOptions{UseProtoNames: true}

// readTypedHistory reads every event of the conversation with
// EVENT_VIEW_TYPED, following next_page_token to the end. Each LogEvent
// carries its payload as a typed message (the oneof member named after the
// event type) instead of JSON text; an event the service has no typed form
// for comes with data_json instead.
func (s session) readTypedHistory(ctx context.Context, name string, pageSize int) {
	var events []map[string]any
	pages, token := 0, ""
	for {
		resp, err := s.api.ReadEvents(ctx, &turnlogv1.ReadEventsRequest{
			Conversation: name, PageSize: int32(pageSize), PageToken: token,
			View: turnlogv1.EventView_EVENT_VIEW_TYPED,
		})
		if err != nil {
			fail("history", err)
		}
		pages++
		for _, e := range resp.GetEvents() {
			entry := map[string]any{"version": e.GetVersion(), "type": e.GetType(), "member": nil, "typed": nil}
			m := e.ProtoReflect()
			if fd := m.WhichOneof(m.Descriptor().Oneofs().ByName("event")); fd != nil {
				text, err := typedJSON.Marshal(m.Get(fd).Message().Interface())
				if err != nil {
					fail("history", err)
				}
				entry["member"], entry["typed"] = string(fd.Name()), json.RawMessage(text)
			} else {
				entry["data_json"] = e.GetDataJson()
			}
			events = append(events, entry)
		}
		if token = resp.GetNextPageToken(); token == "" {
			break
		}
	}
	emit("history", map[string]any{"conversation": name, "pages": pages, "events": events})
}

// verifyChain reads the conversation's stored events (EVENT_VIEW_RAW: the
// JSON text that the hash covers) and recomputes its hash chain on the
// client with package hashchain, independently of the service's own
// VerifyConversation. Keep the head hash it prints: a later read whose chain
// does not extend it shows that history was rewritten.
func (s session) verifyChain(ctx context.Context, name string, pageSize int) {
	var events []*turnlogv1.LogEvent
	token := ""
	for {
		resp, err := s.api.ReadEvents(ctx, &turnlogv1.ReadEventsRequest{
			Conversation: name, PageSize: int32(pageSize), PageToken: token,
			View: turnlogv1.EventView_EVENT_VIEW_RAW,
		})
		if err != nil {
			fail("verify", err)
		}
		events = append(events, resp.GetEvents()...)
		if token = resp.GetNextPageToken(); token == "" {
			break
		}
	}
	report := hashchain.Verify(events)
	head := ""
	if len(events) > 0 {
		head = hex.EncodeToString(events[len(events)-1].GetHash())
	}
	emit("verify", map[string]any{
		"intact": report.Intact, "events": len(events), "head_hash": head, "problem": report.Problem,
	})
}
