// Command conformance reads the conformance inputs (serialized
// ReadEventsResponse messages, clients/conformance/golden/*.binpb) with the
// generated Go code, verifies each hash chain with package hashchain, and
// writes the summary that clients/conformance/README.md defines, so that
// clients/conformance/compare.py can check it against the Python reference.
//
//	conformance -out DIR clients/conformance/golden/*.binpb   # DIR/<name>.json each
//	conformance clients/conformance/golden/plain.binpb        # JSON lines on stdout
package main

import (
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/turnlog/turnlog/clients/go/hashchain"
	turnlogv1 "github.com/turnlog/turnlog/clients/go/turnlog/v1"
)

// Summary is one golden log's summary; the field order follows the README.
type Summary struct {
	File   string  `json:"file"`
	Chain  Chain   `json:"chain"`
	Events []Event `json:"events"`
}

// Chain is the verdict on the whole chain.
type Chain struct {
	Intact   bool   `json:"intact"`
	Events   int    `json:"events"`
	HeadHash string `json:"head_hash"`
}

// Event is one event's entry.
type Event struct {
	Version int64           `json:"version"`
	Type    string          `json:"type"`
	HashOK  bool            `json:"hash_ok"`
	Member  *string         `json:"member"`
	Typed   json.RawMessage `json:"typed"`
}

// typedJSON: the proto3 JSON mapping with proto (snake_case) field names and
// default values omitted, as the README asks.
var typedJSON = protojson.MarshalOptions{UseProtoNames: true}

// typed returns the name of the set member of LogEvent's "event" oneof and
// that member as JSON; nil, nil when none is set.
func typed(e *turnlogv1.LogEvent) (*string, json.RawMessage, error) {
	m := e.ProtoReflect()
	fd := m.WhichOneof(m.Descriptor().Oneofs().ByName("event"))
	if fd == nil {
		return nil, nil, nil
	}
	name := string(fd.Name())
	text, err := typedJSON.Marshal(m.Get(fd).Message().Interface())
	if err != nil {
		return nil, nil, fmt.Errorf("version %d: %w", e.GetVersion(), err)
	}
	return &name, json.RawMessage(text), nil
}

// summarize builds the summary of one response's events.
func summarize(name string, resp *turnlogv1.ReadEventsResponse) (*Summary, error) {
	events := resp.GetEvents()
	report := hashchain.Verify(events)
	s := &Summary{File: name, Chain: Chain{Intact: report.Intact, Events: len(events)}}
	s.Events = make([]Event, 0, len(events))
	for i, e := range events {
		member, text, err := typed(e)
		if err != nil {
			return nil, err
		}
		s.Events = append(s.Events, Event{
			Version: e.GetVersion(), Type: e.GetType(), HashOK: report.HashOK[i],
			Member: member, Typed: text,
		})
	}
	if len(events) > 0 {
		s.Chain.HeadHash = hex.EncodeToString(events[len(events)-1].GetHash())
	}
	return s, nil
}

func summarizeFile(path string) (*Summary, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	resp := &turnlogv1.ReadEventsResponse{}
	if err := proto.Unmarshal(data, resp); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	name := strings.TrimSuffix(filepath.Base(path), filepath.Ext(path))
	s, err := summarize(name, resp)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return s, nil
}

func run(out string, paths []string) error {
	if len(paths) == 0 {
		return fmt.Errorf("no .binpb files given")
	}
	for _, path := range paths {
		s, err := summarizeFile(path)
		if err != nil {
			return err
		}
		if out == "" {
			line, err := json.Marshal(s)
			if err != nil {
				return err
			}
			fmt.Println(string(line))
			continue
		}
		text, err := json.MarshalIndent(s, "", "  ")
		if err != nil {
			return err
		}
		target := filepath.Join(out, s.File+".json")
		if err := os.WriteFile(target, append(text, '\n'), 0o644); err != nil {
			return err
		}
	}
	return nil
}

func main() {
	out := flag.String("out", "", "write DIR/<name>.json per file (default: JSON lines on stdout)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: conformance [-out DIR] FILE.binpb...\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if err := run(*out, flag.Args()); err != nil {
		fmt.Fprintln(os.Stderr, "conformance:", err)
		os.Exit(1)
	}
}
