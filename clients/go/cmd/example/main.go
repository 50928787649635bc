// Command example is a small turnlog client to start from: it creates a
// conversation offering one client-side tool, streams a turn and resumes it
// on a new connection after cutting the first, runs a turn over Converse in
// which it answers the model's tool call itself, cancels a running turn from
// a second connection, reads the conversation's typed history page by page
// and verifies its hash chain on the client. Each step prints one JSON line of what it saw; an error prints the
// gRPC status with its ErrorInfo reason and exits 1.
//
//	TURNLOG_TOKEN=... example -addr 127.0.0.1:50051 -plaintext
//
// `turnlog serve` prints a token for its local key at start-up; -plaintext
// is for a service on loopback (its default), TLS otherwise (-ca FILE).
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"os"
	"time"
)

// options are the example's flags.
type options struct {
	conn         connection
	cutAfter     int
	storyPrompt  string
	toolPrompt   string
	cancelPrompt string
	cancel       bool
	pageSize     int
	timeout      time.Duration
}

func parseFlags() options {
	var o options
	flag.StringVar(&o.conn.target, "addr", "127.0.0.1:50051", "the service's host:port")
	flag.BoolVar(&o.conn.plaintext, "plaintext", false, "no TLS (loopback only)")
	flag.StringVar(&o.conn.caFile, "ca", "", "PEM file of the roots that verify the service (default: the system's)")
	flag.IntVar(&o.cutAfter, "cut-after", 3, "events of the first turn to read before cutting the connection")
	flag.StringVar(&o.storyPrompt, "story", "Tell me a story.", "the first turn's message (streamed, cut and resumed)")
	flag.StringVar(&o.toolPrompt, "tool-prompt", "What is the weather in Paris?", "the second turn's message (the model should call get_weather)")
	flag.StringVar(&o.cancelPrompt, "cancel-prompt", "Count slowly to one hundred.", "the message of the turn that is cancelled")
	flag.BoolVar(&o.cancel, "cancel", true, "run the CancelTurn step")
	flag.IntVar(&o.pageSize, "page-size", 10, "events per ReadEvents page")
	flag.DurationVar(&o.timeout, "timeout", 2*time.Minute, "the whole run's deadline")
	flag.Parse()
	o.conn.token = os.Getenv("TURNLOG_TOKEN")
	return o
}

// newRequestID returns a random id for a request_id field: the service
// makes creates and turns idempotent by it, so a client retrying after a
// lost reply sends the same id again.
func newRequestID() string {
	raw := make([]byte, 16)
	if _, err := rand.Read(raw); err != nil {
		panic(err)
	}
	return hex.EncodeToString(raw)
}

func main() {
	o := parseFlags()
	if o.conn.token == "" {
		fmt.Fprintln(os.Stderr, "example: set TURNLOG_TOKEN (turnlog serve prints one; `turnlog token` makes one)")
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()

	cc, err := o.conn.dial(ctx)
	if err != nil {
		fail("connect", err)
	}
	defer cc.Close()
	s := session{conn: o.conn, api: newClient(cc)}

	s.showInvalidRequest(ctx)
	name := s.createConversation(ctx)
	s.streamAndResume(ctx, name, o.storyPrompt, o.cutAfter)
	s.converseWithTool(ctx, name, o.toolPrompt)
	if o.cancel {
		s.cancelTurn(ctx, name, o.cancelPrompt)
	}
	s.readTypedHistory(ctx, name, o.pageSize)
	s.verifyChain(ctx, name, o.pageSize)
}
