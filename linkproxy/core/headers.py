"""
Header rules the proxy applies whatever the HTTP version: hop-by-hop stripping, authority, l5d-client-id.
"""

from linkproxy.core.endpoint import parse_host_port

#: Headers that describe one hop, never forwarded (RFC 9110 7.6.1), plus the legacy proxy ones.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
})

CLIENT_ID = b"l5d-client-id"
PROXY_ERROR = b"l5d-proxy-error"
ORIG_PROTO = b"l5d-orig-proto"
DST_OVERRIDE = b"l5d-dst-override"


def connection_tokens(headers):
    """
    The lower-cased tokens of every C{Connection} header; each names a further hop-by-hop header.

    @param headers: a sequence of C{(name, value)} byte pairs, names lower-case.
    """
    tokens = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def strip_hop_by_hop(headers):
    """
    Remove hop-by-hop headers, including those named by C{Connection}.

    @param headers: a list of C{(name, value)} byte pairs with lower-case names.
    @return: a new list.
    """
    extra = connection_tokens(headers)
    return [(n, v) for n, v in headers if n not in HOP_BY_HOP and n not in extra]


def set_client_id(headers, client_id):
    """
    Apply the l5d-client-id rule: drop any the client sent, then add the verified one for meshed clients.

    @param client_id: the peer's verified identity, or C{None} for clients that are not meshed.
    @return: a new list of C{(name, value)} pairs.
    """
    out = [(n, v) for n, v in headers if n != CLIENT_ID]
    if client_id:
        out.append((CLIENT_ID, client_id.encode("ascii")))
    return out


def normalize_authority(authority, default_port):
    """
    Turn a Host header or C{:authority} into the logical target C{host:port} that discovery keys on.

    @param authority: bytes or str such as C{b"web.default:8080"} or C{b"Web.Default"}.
    @param default_port: 80 for C{http}, 443 for C{https}.
    @return: C{"host:port"} with a lower-case host, or C{None} when C{authority} is not a valid host.
    """
    if isinstance(authority, bytes):
        try:
            authority = authority.decode("ascii")
        except UnicodeDecodeError:
            return None
    if "@" in authority:
        authority = authority.rsplit("@", 1)[1]
    try:
        host, port = parse_host_port(authority, default_port)
    except ValueError:
        return None
    host = host.lower().rstrip(".")
    if not host or any(c in host for c in " /\\?#"):
        return None
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"
