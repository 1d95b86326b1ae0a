"""
Opening connections to endpoints: the one place the data path dials out.

Plain endpoints get a TCP connection to their address. Meshed endpoints (with an identity) get mTLS to their
inbound proxy; that path is added by the identity layer through L{Connector.meshed}.
"""

import ipaddress

from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory


class _OneShot(Factory):
    # connectProtocol's factory logs "Starting factory" twice per connection: far too loud for the data path.
    noisy = False

    def __init__(self, protocol):
        self._protocol = protocol

    def buildProtocol(self, addr):
        return self._protocol


def connect_protocol(endpoint, protocol):
    """
    Connect C{protocol} through C{endpoint} without per-connection log lines.

    @return: a Deferred firing with C{protocol} once connected.
    """
    return endpoint.connect(_OneShot(protocol))


def client_endpoint(reactor, address, timeout):
    """
    A client endpoint for C{(host, port)}: a direct TCP endpoint for IP literals (no resolver round trip), a
    L{HostnameEndpoint} otherwise.
    """
    host, port = address
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host.encode("idna"), port, timeout=timeout)
    if ip.version == 6:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


class Connector:
    """
    Connects protocols to endpoints with the configured connect timeout.

    @ivar meshed: an optional callable C{(endpoint, protocol) -> Deferred} that the identity layer installs to
        reach meshed endpoints through their proxy with mTLS and the transport header.
    """

    def __init__(self, reactor, connect_timeout, meshed=None):
        self._reactor = reactor
        self._timeout = connect_timeout
        self.meshed = meshed

    def connect(self, endpoint, protocol, session_protocol=None):
        """
        Connect C{protocol} to C{endpoint}.

        @param endpoint: a L{linkproxy.core.endpoint.Endpoint}.
        @param protocol: an unconnected L{twisted.internet.interfaces.IProtocol}.
        @param session_protocol: C{"http1"}, C{"http2"} or C{None} (opaque); carried in the transport header
            to meshed endpoints.
        @return: a Deferred firing with C{protocol} once connected; it fails with the connect error or
            L{twisted.internet.error.TimeoutError}.
        """
        if endpoint.meshed and self.meshed is not None:
            return self.meshed(endpoint, protocol, session_protocol)
        return connect_protocol(client_endpoint(self._reactor, endpoint.address, self._timeout), protocol)
