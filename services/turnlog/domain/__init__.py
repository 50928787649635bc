"""The conversation domain: events, the state they fold into, and their codec.

Pure code: no I/O, no clock, no randomness, and no import of grpc or psycopg.
Ids and timestamps are inputs carried by the events themselves.
"""
