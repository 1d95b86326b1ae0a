"""
The endpoint type every stage shares: what discovery produces and what a balancer picks.
"""

from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple

Address = Tuple[str, int]


@dataclass(frozen=True)
class Endpoint:
    """
    One concrete place a logical target can be served from.

    @ivar address: C{(host, port)} where the application listens.
    @ivar weight: relative weight for balancing; C{0} drains the endpoint.
    @ivar labels: free-form metadata from discovery (pod name, zone, ...).
    @ivar identity: the endpoint's workload identity; present means meshed (mTLS to C{proxy}).
    @ivar proxy: C{(host, port)} of the endpoint's inbound proxy, for meshed endpoints.
    @ivar protocol: an optional hint: C{"http1"}, C{"h2"} or C{"opaque"}.
    """

    address: Address
    weight: float = 1.0
    labels: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    identity: Optional[str] = None
    proxy: Optional[Address] = None
    protocol: Optional[str] = None
    pool_key: tuple = field(init=False, compare=False, hash=False, repr=False)

    def __post_init__(self):
        # Everything that makes a connection to this endpoint what it is: where it goes and whether it is mTLS
        # to a peer proxy with which identity. Pools key by it, so a plain and a meshed entry for one address
        # never share a connection (a shared one would silently bypass, or wrongly use, the peer's proxy).
        object.__setattr__(self, "pool_key", (self.address, self.identity, self.proxy))

    @property
    def meshed(self) -> bool:
        """
        C{True} when traffic to this endpoint goes through its inbound proxy with mTLS.
        """
        return self.identity is not None and self.proxy is not None

    @property
    def addr_str(self) -> str:
        """
        The address as C{host:port}, bracketing IPv6 literals; used as the C{target_addr} metric label.
        """
        return format_address(self.address)


def format_address(address: Address) -> str:
    """
    Render C{(host, port)} as C{host:port}, with IPv6 hosts in brackets.
    """
    host, port = address
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def parse_host_port(text: str, default_port: Optional[int] = None) -> Address:
    """
    Parse C{host:port} (or C{[v6]:port}) into C{(host, port)}.

    @raise ValueError: with a message fit for an operator when C{text} is not a valid address.
    """
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unterminated IPv6 literal in {text!r}")
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError(f"expected ':port' after IPv6 literal in {text!r}")
        port_text = rest[1:] if rest else ""
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
    if not host:
        raise ValueError(f"missing host in {text!r}")
    if not port_text:
        if default_port is None:
            raise ValueError(f"missing port in {text!r} (expected host:port)")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"invalid port {port_text!r} in {text!r} (expected 1-65535)")
    return host, int(port_text)
