"""
The inbound path, assembled top to bottom:

    accept → detect → (mTLS: terminate → transport header) → authorize ─ HTTP ─▶ timeout → balance (the app)
                                                                      └ TCP ──▶ the app
"""

from dataclasses import replace

from linkproxy.core.detect import Protocol
from linkproxy.core.endpoint import Endpoint
from linkproxy.core.policy import requires_client_cert
from linkproxy.layers.stack import RequestStack
from linkproxy.admin.metrics import TcpConnection
from linkproxy.net.context import PLAIN, PLAIN_NO_IDENTITY
from linkproxy.net.l7 import http_layer
from linkproxy.net.authz import AuthorizingRouter, authz_metrics
from linkproxy.net.sniff import SniffingProtocol
from linkproxy.net.tcp import opaque_proxy
from linkproxy.routing import FixedRouter

DIRECTION = "inbound"


def app_address(description):
    """
    The C{(host, port)} a C{tcp:} client endpoint description names, e.g. C{tcp:host=127.0.0.1:port=8080}
    or C{tcp:127.0.0.1:8080}.

    @raise ValueError: for descriptions that are not plain TCP.
    """
    parts = description.split(":")
    if parts[0] != "tcp":
        raise ValueError(f"the app address must be a tcp: endpoint, got {description!r}")
    positional, named = [], {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if eq:
            named[key] = value
        else:
            positional.append(part)
    host = named.get("host", positional[0] if positional else None)
    port = named.get("port", positional[1] if len(positional) > 1 else None)
    if not host or not port or not port.isdigit():
        raise ValueError(f"the app address needs a host and a port, got {description!r}")
    return host, int(port)


def build_inbound(runtime):
    """
    Assemble the inbound listener's per-connection pipeline.

    Plaintext (and TLS for another SNI) is detected and forwarded to the app. TLS whose SNI is this proxy's
    identity is terminated; the transport header then names the local port and the session protocol, and
    the client's verified identity is what authorization and C{l5d-client-id} use.

    @param runtime: the L{linkproxy.runtime.Runtime}.
    @return: a callable taking the peer address and returning the protocol for the accepted connection.
    """
    config, metrics, reactor = runtime.config, runtime.metrics, runtime.reactor
    app = Endpoint(address=app_address(config.app))
    app_router = FixedRouter(app)
    # No profiles inbound: route and split have nothing to do, and the app is the one endpoint (one attempt).
    # Profiles inbound give route metrics (route_*{direction="inbound"}, as Linkerd's inbound ServiceProfile
    # routes); the app is still the one endpoint, so there is nothing to retry or split.
    plain = PLAIN if runtime.identity is not None else PLAIN_NO_IDENTITY
    stack = RequestStack(DIRECTION, app_router, metrics, config.response_timeout, profiles=runtime.profiles,
                         tls=plain.tls, tap=runtime.tap)
    settings, http = http_layer(runtime, DIRECTION, stack)
    authz = authz_metrics(metrics)
    local_ports = _LocalPorts(app, app_router)
    mesh = None
    if runtime.identity is not None:
        from linkproxy.net.mesh import MeshServer
        mesh = MeshServer(runtime.identity, metrics=metrics, reactor=reactor,
                          require_client_cert=requires_client_cert(config.policy),
                          header_timeout=config.detect_timeout)

    def src_metrics(peer, endpoint):
        tls = peer.tls
        return metrics.tcp(DIRECTION, "src", tls, endpoint.addr_str, peer_id=peer.client_id or "",
                           no_tls_reason=peer.no_tls_reason if tls != "true" else "")

    undecided = src_metrics(plain, app)

    def serve(peer, protocol, endpoint, router, conn):
        if protocol in http:
            conn.bind(src_metrics(peer, endpoint))
            decision = authz.decide("http", config.policy, config.policy_allow, peer, endpoint.addr_str)
            if decision.allowed and router is app_router and peer is plain:
                # The common unmeshed case: no per-connection settings, allows counted per connection.
                decision.count()
                return http[protocol](settings, peer)
            return http[protocol](replace(settings, router=AuthorizingRouter(router, decision), route_tls=peer.tls),
                                  peer)
        decision = authz.decide("tcp", config.policy, config.policy_allow, peer, endpoint.addr_str)
        decision.count()
        if not decision.allowed:
            conn.bind(src_metrics(peer, endpoint))
            return None
        # The opaque splice counts its own side (the plaintext, under mTLS).
        conn.skip()
        return opaque_proxy(runtime, router, endpoint.addr_str, DIRECTION, src_metrics(peer, endpoint))

    def on_meshed(peer, header, conn):
        endpoint, router = local_ports.get(header.port if header is not None else 0)
        if header is None:
            # mTLS without a transport header: the client did not say, so sniff the plaintext.
            return SniffingProtocol(lambda detection, _: serve(peer, detection.protocol, endpoint, router, conn),
                                    reactor=reactor, timeout=config.detect_timeout, metrics=metrics,
                                    direction=DIRECTION)
        return serve(peer, _SESSION.get(header.session_protocol, Protocol.OPAQUE), endpoint, router, conn)

    def on_detected(detection, transport, conn):
        if mesh is not None and mesh.accepts(detection):
            return mesh.protocol(lambda peer, header: on_meshed(peer, header, conn))
        return serve(plain, detection.protocol, app, app_router, conn)

    skip = app.address[1] in config.opaque_ports

    def accept(addr):
        conn = TcpConnection(undecided)
        return SniffingProtocol(lambda detection, transport: on_detected(detection, transport, conn),
                                reactor=reactor, timeout=config.detect_timeout, metrics=metrics,
                                direction=DIRECTION, skip=skip, tcp=conn)

    return accept


_SESSION = {"http1": Protocol.HTTP1, "http2": Protocol.H2}


class _LocalPorts:
    """
    The local endpoint (and its router) for each target port a transport header names; port 0 means the
    configured app. Bounded, since the port comes from the peer.
    """

    limit = 1024

    def __init__(self, app, app_router):
        self._app = (app, app_router)
        self._ports = {app.address[1]: self._app}

    def get(self, port):
        if not port:
            return self._app
        found = self._ports.get(port)
        if found is None:
            endpoint = Endpoint(address=(self._app[0].address[0], port))
            found = (endpoint, FixedRouter(endpoint))
            if len(self._ports) < self.limit:
                self._ports[port] = found
        return found
