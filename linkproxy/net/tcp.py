"""
Opaque TCP proxying: route once per connection, connect, splice.
"""

import sys

from twisted.internet import error
from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from linkproxy.admin.metrics import dst_labels
from linkproxy.core.errors import ProxyError
from linkproxy.net.context import endpoint_tls
from linkproxy.net.splice import AcceptedSplice, SpliceSide
from linkproxy.net.twisted_private import on_tcp_close, tcp_connection

log = Logger(namespace="linkproxy.net.tcp")


def connect_error_label(failure):
    """
    A short, bounded label for why an upstream connect failed, for C{tcp_connect_error_total{error}}.
    """
    if failure.check(error.ConnectionRefusedError):
        return "refused"
    if failure.check(error.TimeoutError, error.UserError, CancelledError):
        return "timeout"
    if failure.check(error.DNSLookupError):
        return "dns"
    if failure.check(ProxyError):
        return "no_endpoints"
    # Only a process with identity has loaded the TLS modules (see linkproxy.tap.leave_out_tls).
    tls = sys.modules.get("linkproxy.net.tls")
    if tls is not None and failure.check(tls.PeerIdentityMismatch):
        return "identity_mismatch"
    ssl = sys.modules.get("OpenSSL.SSL")
    if ssl is not None and failure.check(ssl.Error):
        return "tls"
    return "other"


def opaque_proxy(runtime, router, authority, direction, src_metrics):
    """
    Build the accepted-side protocol for one opaque connection to C{authority}.

    The balancer picks once per connection; the RTT it learns is the time to connect.

    @param router: an L{linkproxy.interfaces.IRouter}.
    @param authority: the logical target C{host:port} (ignored by a fixed router).
    @param src_metrics: L{linkproxy.admin.metrics.TcpMetrics} for the client side.
    @return: an L{AcceptedSplice}.
    """
    metrics = runtime.metrics

    def connect():
        def routed(lease):
            endpoint = lease.endpoint
            tls, reason, server_id = endpoint_tls(runtime.connector, endpoint)
            upstream = SpliceSide(metrics.tcp(direction, "dst", tls, endpoint.addr_str, authority=authority or "",
                                              peer_id=server_id, no_tls_reason=reason,
                                              dst=dst_labels(endpoint)))

            def connected(_):
                lease.release(True)
                return upstream

            def failed(failure):
                lease.release(False)
                metrics.tcp_connect_error_total.labels(direction, endpoint.addr_str,
                                                       connect_error_label(failure)).inc()
                return failure

            return runtime.connector.connect(endpoint, upstream, None).addCallbacks(connected, failed)

        def unroutable(failure):
            if failure.check(ProxyError):
                metrics.tcp_connect_error_total.labels(direction, authority or "", "no_endpoints").inc()
            return failure

        return router.route(authority).addCallbacks(routed, unroutable)

    def connect_failed(failure):
        if not failure.check(CancelledError):
            log.info("{direction} connection to {authority} failed: {error}", direction=direction,
                     authority=authority, error=failure.getErrorMessage())

    return AcceptedSplice(src_metrics, connect, on_connect_error=connect_failed, tracker=runtime.tracker)


class MeteredConnector:
    """
    One direction's connector for HTTP client connections: a L{linkproxy.net.connect.Connector} that counts
    each connection it opens in the TCP metrics (C{peer="dst"}), with the endpoint's TLS and C{dst_*} labels.

    Bytes are the kernel's counts, read when the connection closes (Linkerd adds them at close too), so the
    data path does nothing per read or write. Pooled connections serve many authorities, so they carry no
    C{authority} label. (The opaque splice counts its upstream itself and connects with the plain connector.)
    """

    def __init__(self, connector, metrics, direction):
        self._connector = connector
        self._metrics = metrics
        self._direction = direction

    @property
    def meshed(self):
        """The wrapped connector's C{meshed} (see L{linkproxy.net.connect.Connector})."""
        return self._connector.meshed

    def connect(self, endpoint, protocol, session_protocol=None):
        """
        As L{linkproxy.net.connect.Connector.connect}, counting the connection once it is made.
        """
        return self._connector.connect(endpoint, protocol, session_protocol).addCallback(self._connected, endpoint)

    def _connected(self, protocol, endpoint):
        connection = tcp_connection(getattr(protocol, "transport", None))
        if connection is not None:
            if self._direction == "inbound":
                # To the local app, over loopback.
                tls, reason, server_id = "no_identity", "loopback", ""
            else:
                tls, reason, server_id = endpoint_tls(self._connector, endpoint)
            bundle = self._metrics.tcp(self._direction, "dst", tls, endpoint.addr_str, peer_id=server_id,
                                       no_tls_reason=reason, dst=dst_labels(endpoint))
            started = bundle.opened()
            on_tcp_close(connection, lambda why, read, written: bundle.closed(
                started=started, reason=why, read=read, written=written))
        return protocol
