package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/local"
)

// bearerToken sends a token as "authorization: Bearer <token>" with every
// call, as the service's credentials are checked per call (docs/security.md).
type bearerToken struct {
	token string
	// requireTLS keeps the token off plain-text connections except where
	// the caller chose loopback plain text explicitly.
	requireTLS bool
}

func (b bearerToken) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

func (b bearerToken) RequireTransportSecurity() bool { return b.requireTLS }

// connection says how to reach the service.
type connection struct {
	target string
	token  string
	// plaintext: no TLS, for a service on loopback (`turnlog serve` listens
	// in plain text on 127.0.0.1 by default). grpc's local credentials
	// refuse any connection that is not loopback, so the token never
	// crosses a network unencrypted.
	plaintext bool
	// caFile: the PEM roots that verify the service's certificate; empty:
	// the system's roots.
	caFile string
}

// dial opens a client connection. Each call to it is a new TCP connection,
// which is how the example "cuts" a stream: it closes the connection the
// stream runs on and dials again.
func (c connection) dial(ctx context.Context) (*grpc.ClientConn, error) {
	var transport credentials.TransportCredentials
	if c.plaintext {
		transport = local.NewCredentials()
	} else {
		config := &tls.Config{MinVersion: tls.VersionTLS12}
		if c.caFile != "" {
			pem, err := os.ReadFile(c.caFile)
			if err != nil {
				return nil, err
			}
			config.RootCAs = x509.NewCertPool()
			if !config.RootCAs.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("%s holds no PEM certificate", c.caFile)
			}
		}
		transport = credentials.NewTLS(config)
	}
	return grpc.DialContext(ctx, c.target,
		grpc.WithTransportCredentials(transport),
		grpc.WithPerRPCCredentials(bearerToken{token: c.token, requireTLS: !c.plaintext}),
		grpc.WithBlock(),
	)
}
