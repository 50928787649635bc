"""The conversation application layer: turns, conversation state, listing and recovery (no gRPC)."""
