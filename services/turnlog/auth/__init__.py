"""Authentication: a call's credential becomes a verified `Principal`.

`authenticator.Authenticator` is the entry point (the gRPC interceptor's one
dependency), built from `settings.AuthSettings`. Beneath it, one module per
credential: `jwt_verifier` (bearer JWTs) over `jwks` (where signing keys
come from), `api_keys` (static keys stored as hashes), `mtls` (client
certificate names); `local` holds the data folder's own signing key, the
local default of `turnlog serve`; `principal` defines what every verifier
returns; `cli` adds `turnlog token` and `turnlog api-key`. docs/security.md
describes configuration and key formats.

Nothing is imported here, so `turnlog --help` (which registers `auth.cli`)
does not pay for PyJWT, cryptography and httpx; import from the modules.
"""
