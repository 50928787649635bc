"""The public gRPC API (`turnlog.v1.ConversationService`), above the conversation and history layers.

`servicer` implements the service from two handler groups, `conversations`
(over `ConversationApplication`) and `history` (over `HistoryService`);
`requests` validates and parses request messages, `messages` builds response
messages, `status` maps every error to a gRPC status once, and `server`
starts the `turnlog serve` process.
"""
