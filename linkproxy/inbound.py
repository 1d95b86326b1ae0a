"""
The inbound path, assembled top to bottom: accept → detect → (HTTP or opaque) → the local app.
"""

from linkproxy.core.endpoint import Endpoint
from linkproxy.net.context import PLAIN
from linkproxy.net.l7 import http_layer
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

    @param runtime: the L{linkproxy.runtime.Runtime}.
    @return: a callable taking the peer address and returning the protocol for the accepted connection.
    """
    config, metrics, reactor = runtime.config, runtime.metrics, runtime.reactor
    app = Endpoint(address=app_address(config.app))
    router = FixedRouter(app)
    settings, http = http_layer(runtime, DIRECTION, router)
    src_metrics = metrics.tcp(DIRECTION, "src", "false", app.addr_str)
    skip = app.address[1] in config.opaque_ports

    def on_detected(detection, transport):
        server = http.get(detection.protocol)
        if server is not None:
            return server(settings, PLAIN)
        return opaque_proxy(runtime, router, app.addr_str, DIRECTION, src_metrics)

    def accept(addr):
        return SniffingProtocol(on_detected, reactor=reactor, timeout=config.detect_timeout, metrics=metrics,
                                direction=DIRECTION, skip=skip)

    return accept

