// Package hashchain verifies turnlog's per-conversation hash chain on the
// client, from the LogEvent messages that ReadEvents returns with data_json
// (EVENT_VIEW_RAW or EVENT_VIEW_BOTH).
//
// The encoding is the service's "turnlog.event.v1" (docs/event-log.md, "Hash
// chain (encoding v1)"):
//
//	hash = sha256( "turnlog.event.v1" || prev_hash (32 bytes, zeros for version 1)
//	             || f(stream_id) || int8(stream_version) || event_id (16 bytes)
//	             || f(type) || f(data_json) || f(metadata_json)
//	             || int8(recorded_at in µs since the Unix epoch) )
//	f(s) = int8(byte length of UTF-8 s) || UTF-8 s;  int8 = 8 bytes big-endian
//
// It is written here from that description, not translated from the
// server's code, so that the conformance tests (clients/conformance) check
// the description as much as this code.
package hashchain

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"strings"

	turnlogv1 "github.com/turnlog/turnlog/clients/go/turnlog/v1"
)

// Domain is the encoding's name, hashed first.
const Domain = "turnlog.event.v1"

// Genesis is the prev_hash of a stream's first event.
var Genesis = make([]byte, sha256.Size)

func int8be(h []byte, n int64) []byte {
	return binary.BigEndian.AppendUint64(h, uint64(n))
}

func field(h []byte, s string) []byte {
	return append(int8be(h, int64(len(s))), s...)
}

// parseUUID returns the 16 bytes of a UUID in its canonical text form
// (8-4-4-4-12 hex digits).
func parseUUID(text string) ([]byte, error) {
	raw, err := hex.DecodeString(strings.ReplaceAll(text, "-", ""))
	if err != nil || len(raw) != 16 || len(text) != 36 {
		return nil, fmt.Errorf("event_id %q is not a UUID", text)
	}
	return raw, nil
}

// EventHash recomputes an event's chain hash from its fields and its
// prev_hash. record_time counts in whole microseconds (the server records no
// finer). It needs the event's data_json: under EVENT_VIEW_TYPED the payload
// is not sent and no hash can be checked.
func EventHash(e *turnlogv1.LogEvent) ([]byte, error) {
	id, err := parseUUID(e.GetEventId())
	if err != nil {
		return nil, err
	}
	t := e.GetRecordTime()
	micros := t.GetSeconds()*1_000_000 + int64(t.GetNanos())/1000
	buf := []byte(Domain)
	buf = append(buf, e.GetPrevHash()...)
	buf = field(buf, e.GetStreamId())
	buf = int8be(buf, e.GetVersion())
	buf = append(buf, id...)
	buf = field(buf, e.GetType())
	buf = field(buf, e.GetDataJson())
	buf = field(buf, e.GetMetadataJson())
	buf = int8be(buf, micros)
	sum := sha256.Sum256(buf)
	return sum[:], nil
}

// HashOK says whether an event's recomputed hash equals the hash it carries.
func HashOK(e *turnlogv1.LogEvent) bool {
	h, err := EventHash(e)
	return err == nil && bytes.Equal(h, e.GetHash())
}

// Report is the outcome of checking one stream's events.
type Report struct {
	// Intact: every hash matches, versions run 1, 2, 3 ... and each
	// prev_hash is the previous event's hash (Genesis for the first).
	Intact bool
	// HashOK holds, per event in order, whether its own hash matches.
	HashOK []bool
	// Problem describes the first break, "" when intact.
	Problem string
}

// Verify checks the events of one stream, given in version order from
// version 1. It checks the chain as received; that the chain's head is the
// one the service holds needs a hash recorded elsewhere.
func Verify(events []*turnlogv1.LogEvent) Report {
	r := Report{Intact: true, HashOK: make([]bool, len(events))}
	prev := Genesis
	fail := func(format string, args ...any) {
		if r.Intact {
			r.Problem = fmt.Sprintf(format, args...)
		}
		r.Intact = false
	}
	for i, e := range events {
		r.HashOK[i] = HashOK(e)
		switch {
		case e.GetVersion() != int64(i+1):
			fail("version gap: expected %d, found %d", i+1, e.GetVersion())
		case !bytes.Equal(e.GetPrevHash(), prev):
			fail("version %d: prev_hash is not the previous event's hash", e.GetVersion())
		case !r.HashOK[i]:
			fail("version %d: hash mismatch: the event's content was changed", e.GetVersion())
		}
		prev = e.GetHash()
	}
	return r
}
