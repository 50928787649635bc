// The Go client's module path (the protos' go_package). This repository
// builds it offline in GOPATH mode against Debian's Go sources (go.sh), which
// ignores this file; outside, with a module proxy, `go mod tidy` adds the
// requirements (google.golang.org/grpc, google.golang.org/protobuf,
// google.golang.org/genproto) and go.sum.
module github.com/turnlog/turnlog/clients/go

go 1.19
