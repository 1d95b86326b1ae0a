"""
Inbound authorization: may this client reach the local application?

The decision is pure: it takes the configured mode (C{--policy}) and what is known of the client, and says
yes or no with a short reason fit for a metric label. The mesh layer (L{linkproxy.net.mesh}) counts the
decisions and the assembly enforces them (closing an opaque connection, answering HTTP with 403).

Modes (C{linkproxy.config.POLICY_MODES}):
  - C{unauthenticated}: everyone, meshed or not, plaintext or not.
  - C{authenticated}: only clients that came over mTLS with a verified client certificate.
  - C{allow}: only authenticated clients whose identity is in the allow list.
  - C{deny}: no one.

A client identity only counts when it came with TLS: an identity without TLS cannot have been verified by
this proxy, so it is treated as absent rather than trusted.
"""

from typing import Collection, Optional, Tuple

__all__ = ["MODES", "REASONS", "authorize", "requires_client_cert"]

#: The policy modes, as in C{linkproxy.config.POLICY_MODES}.
MODES = ("unauthenticated", "authenticated", "allow", "deny")

#: Every reason L{authorize} can give; a closed set, so it is safe as a metric label.
REASONS = ("unauthenticated", "authenticated", "allowed", "no_tls", "no_client_id", "not_allowed", "deny")


def _is_tls(tls) -> bool:
    # PeerInfo carries the metric label ("true"/"false"); callers may also pass a bool.
    return tls is True or tls == "true"


def authorize(policy: str, allow: Collection[str], client_id: Optional[str], tls) -> Tuple[bool, str]:
    """
    Decide whether a client may reach the application.

    @param policy: one of L{MODES}.
    @param allow: the identities the C{allow} mode admits (ignored by the other modes).
    @param client_id: the client's verified identity from its certificate, or L{None}.
    @param tls: C{True} or C{"true"} when the connection was mTLS terminated by this proxy.
    @return: C{(allowed, reason)}; C{reason} is one of L{REASONS}.
    @raise ValueError: for an unknown mode (the configuration rejects those before anything runs).
    """
    if policy == "unauthenticated":
        return True, "unauthenticated"
    if policy == "deny":
        return False, "deny"
    if policy not in ("authenticated", "allow"):
        raise ValueError(f"unknown policy mode {policy!r}; expected one of {', '.join(MODES)}")
    if not _is_tls(tls):
        return False, "no_tls"
    if not client_id:
        return False, "no_client_id"
    if policy == "authenticated":
        return True, "authenticated"
    if client_id in allow:
        return True, "allowed"
    return False, "not_allowed"


def requires_client_cert(policy: str) -> bool:
    """
    Whether the inbound TLS server should demand a client certificate in the handshake under C{policy}.

    Only C{unauthenticated} lets a TLS client without a certificate through; under every other mode such a
    client would be refused anyway, and refusing it in the handshake tells it why (a TLS alert).

    @raise ValueError: for an unknown mode.
    """
    if policy not in MODES:
        raise ValueError(f"unknown policy mode {policy!r}; expected one of {', '.join(MODES)}")
    return policy != "unauthenticated"
