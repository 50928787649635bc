package main

import (
	"encoding/json"
	"fmt"
	"os"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/status"
)

// emit prints one step's outcome as a JSON line on stdout (the test that
// runs this example reads these lines).
func emit(step string, fields map[string]any) {
	line := map[string]any{"step": step}
	for k, v := range fields {
		line[k] = v
	}
	text, err := json.Marshal(line)
	if err != nil {
		panic(err) // only plain values are emitted
	}
	fmt.Println(string(text))
}

// reasonOf returns the ErrorInfo reason of an error from the service ("" if
// it carries none).
func reasonOf(err error) string {
	for _, detail := range status.Convert(err).Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok {
			return info.GetReason()
		}
	}
	return ""
}

// statusOf describes an error as the service reports it: the gRPC status
// code and message, and the google.rpc.ErrorInfo detail that every turnlog
// error carries (reason, domain, metadata). A client branches on the reason,
// not on the message.
func statusOf(err error) map[string]any {
	st, ok := status.FromError(err)
	if !ok {
		return map[string]any{"code": "UNKNOWN", "message": err.Error()}
	}
	out := map[string]any{"code": st.Code().String(), "message": st.Message()}
	for _, detail := range st.Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok {
			out["reason"] = info.GetReason()
			out["domain"] = info.GetDomain()
			out["metadata"] = info.GetMetadata()
		}
	}
	return out
}

// fail prints the step's error with its status and exits.
func fail(step string, err error) {
	emit(step, map[string]any{"error": statusOf(err)})
	os.Exit(1)
}
