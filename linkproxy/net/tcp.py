"""
Opaque TCP proxying: route once per connection, connect, splice.
"""

import sys

from twisted.internet import error
from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from linkproxy.core.errors import ProxyError
from linkproxy.net.splice import AcceptedSplice, SpliceSide

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
            dst_tls = "true" if endpoint.meshed and runtime.connector.meshed is not None else "false"
            upstream = SpliceSide(metrics.tcp(direction, "dst", dst_tls, endpoint.addr_str))

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
