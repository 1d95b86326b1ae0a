"""
The HTTP layer one direction's listener hands detected HTTP connections to.
"""

from linkproxy.core.detect import Protocol
from linkproxy.net.context import HttpSettings


def http_layer(runtime, direction, stack):
    """
    Build the settings, client pools and server protocols for one direction's HTTP traffic.

    @param runtime: the L{linkproxy.runtime.Runtime}.
    @param direction: C{"inbound"} or C{"outbound"}.
    @param stack: the direction's L{linkproxy.layers.stack.RequestStack} (its balance layer holds the router).
    @return: C{(settings, servers)} where C{servers} maps a detected L{Protocol} to a callable building the
        server protocol as C{server(settings, peer)}.
    """
    from linkproxy.net.http1 import Http1ServerProtocol
    from linkproxy.net.tcp import MeteredConnector
    config = runtime.config
    # HTTP client connections count in the TCP metrics (peer="dst") too.
    connector = MeteredConnector(runtime.connector, runtime.metrics, direction)
    settings = HttpSettings(
        direction=direction, router=stack.balance.router, connector=connector, metrics=runtime.metrics,
        reactor=runtime.reactor, response_timeout=config.response_timeout,
        max_header_bytes=config.max_header_bytes, pool_idle_timeout=config.pool_idle_timeout,
        pool_max_idle=config.pool_max_idle, tracker=runtime.tracker,
        dst_override=config.dst_override and direction == "outbound",
        # HTTP/1 to meshed endpoints goes to their proxy as HTTP/2 streams (l5d-orig-proto).
        h2_upgrade=config.h2_upgrade and direction == "outbound",
        profiles=stack.profiles, stack=stack)

    def h2_server(conn_settings, peer):
        # h2 is imported with the first HTTP/2 client: a sidecar that never sees one keeps ~1.5 MiB.
        from linkproxy.net.h2 import H2ServerProtocol
        # Per-connection copies of the settings (inbound authorization) share the direction's pools.
        server = H2ServerProtocol(conn_settings, peer)
        if direction == "inbound" and peer.tls == "true":
            # Streams marked l5d-orig-proto by a peer proxy go to the app as HTTP/1 (trusted from meshed peers only).
            from linkproxy.net.orig_proto import downgrading_streams
            server.new_stream = downgrading_streams
        return server

    return settings, {Protocol.HTTP1: Http1ServerProtocol, Protocol.H2: h2_server}
