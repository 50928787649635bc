"""Conversations rebuilt from the log: export, import and replay."""
