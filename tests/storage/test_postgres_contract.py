"""PostgresEventStore against the EventStore contract (fixtures in tests/conftest.py)."""

from storage_contract import EventStoreContract


class TestPostgresEventStore(EventStoreContract):
    """Runs the contract on a fresh migrated PostgreSQL database per test."""
