"""Whether a host or a host:port is loopback only: the one test every "refuse beyond loopback" rule uses."""

from __future__ import annotations

import ipaddress


def is_loopback_host(host: str) -> bool:
    """Whether `host` ("localhost", an IPv4 or IPv6 address, brackets allowed) is loopback."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_address(address: str) -> bool:
    """Whether a listen address `host:port` binds loopback only."""
    return is_loopback_host(address.rsplit(":", 1)[0])


__all__ = ["is_loopback_address", "is_loopback_host"]
