"""
The outbound path, assembled top to bottom:

    accept → detect ─ HTTP ─▶ route → split → timeout → retry → balance → endpoint   (per request)
                    └ TCP ──▶ balance → connect                                      (per connection)

The main listener serves HTTP (the target is the request's authority) and transparently redirected TCP (the
target is the connection's original destination). Each configured TCP route is its own listener with a fixed
target, forwarded as opaque bytes without detection.
"""

import socket
import struct

from linkproxy.core.endpoint import format_address
from linkproxy.layers.stack import RequestStack
from linkproxy.net.context import PLAIN
from linkproxy.net.l7 import http_layer
from linkproxy.admin.metrics import TcpConnection
from linkproxy.net.sniff import SniffingProtocol
from linkproxy.net.tcp import opaque_proxy

DIRECTION = "outbound"
_SO_ORIGINAL_DST = 80


def original_destination(transport):
    """
    The pre-NAT destination of a connection redirected to the proxy by iptables, or C{None}.

    @return: C{(host, port)}, or C{None} when the connection was not redirected (or the platform cannot say).
    """
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    sock = get_handle()
    try:
        raw = sock.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
    except (OSError, AttributeError):
        return None
    port, packed = struct.unpack_from("!2xH4s", raw)
    address = (socket.inet_ntoa(packed), port)
    host = transport.getHost()
    if (host.host, host.port) == address:
        return None
    return address


def build_outbound(runtime, router):
    """
    Assemble the main outbound listener's per-connection pipeline.

    @param runtime: the L{linkproxy.runtime.Runtime}.
    @param router: the outbound L{linkproxy.interfaces.IRouter} (discovery + balancer).
    @return: a callable taking the peer address and returning the protocol for the accepted connection.
    """
    config, metrics, reactor = runtime.config, runtime.metrics, runtime.reactor
    # route (profiles) → split → timeout → retry → balance (router), the tap watching what finishes; the
    # endpoint layer is the settings' pools.
    stack = RequestStack(DIRECTION, router, metrics, config.response_timeout, profiles=runtime.profiles,
                         tap=runtime.tap)
    settings, http = http_layer(runtime, DIRECTION, stack)
    # The application's connections reach this proxy over loopback: Linkerd labels them so.
    undecided = metrics.tcp(DIRECTION, "src", "no_identity", "", no_tls_reason="loopback")

    def on_detected(detection, transport, conn):
        server = http.get(detection.protocol)
        if server is not None:
            host = transport.getHost()
            conn.bind(metrics.tcp(DIRECTION, "src", "no_identity", format_address((host.host, host.port)),
                                  no_tls_reason="loopback"))
            return server(settings, PLAIN)
        # The opaque splice counts its own side, under the target's authority.
        conn.skip()
        target = original_destination(transport)
        if target is None:
            metrics.tcp_protocol_error_total.labels(DIRECTION, detection.protocol.value, "no_target").inc()
            return None
        authority = format_address(target)
        return opaque_proxy(runtime, router, authority, DIRECTION,
                            metrics.tcp(DIRECTION, "src", "no_identity", authority, authority=authority,
                                        no_tls_reason="loopback"))

    def accept(addr):
        conn = TcpConnection(undecided)
        return SniffingProtocol(lambda detection, transport: on_detected(detection, transport, conn),
                                reactor=reactor, timeout=config.detect_timeout, metrics=metrics,
                                direction=DIRECTION, tcp=conn)

    return accept


def build_tcp_route(runtime, router, target):
    """
    Assemble one TCP route's listener pipeline: every connection goes to C{target}, as opaque bytes.

    @param target: C{(host, port)}, the logical target that discovery resolves.
    """
    authority = format_address(target)
    src_metrics = runtime.metrics.tcp(DIRECTION, "src", "no_identity", authority, authority=authority,
                                      no_tls_reason="loopback")

    def accept(addr):
        return opaque_proxy(runtime, router, authority, DIRECTION, src_metrics)

    return accept

