"""
What an HTTP server protocol (HTTP/1 or HTTP/2) needs from the assembly, bundled once per listener.
"""

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class HttpSettings:
    """
    Shared by every HTTP connection of one direction.

    @ivar direction: C{"inbound"} or C{"outbound"} (the metrics label).
    @ivar router: an L{linkproxy.interfaces.IRouter}; the inbound one routes everything to the app.
    @ivar connector: a L{linkproxy.net.connect.Connector}.
    @ivar metrics: the L{linkproxy.admin.metrics.Metrics}.
    @ivar reactor: an C{IReactorTime} (and C{IReactorTCP} for connecting).
    @ivar response_timeout: seconds from dispatch to the response head before a 504.
    @ivar max_header_bytes: a request head larger than this gets 431.
    @ivar pool_idle_timeout: seconds an idle pooled client connection is kept.
    @ivar pool_max_idle: idle client connections kept per endpoint.
    @ivar tracker: a L{linkproxy.net.tracker.ConnectionTracker}, or C{None}; server connections register with it
        so a drain can close them when idle.
    @ivar h1_pool: the HTTP/1 client pool shared by this direction's connections (from L{endpoints}).
    @ivar h2_pool: the HTTP/2 client connections shared by this direction (from L{endpoints}, on first use).
    @ivar h2_upgrade: carry HTTP/1 to meshed endpoints as HTTP/2 (C{--h2-upgrade}, outbound only).
    @ivar endpoints: the direction's L{linkproxy.layers.endpoint.EndpointLayer}, the one owner of its pools;
        built when not given, and shared by copies of the settings.
    @ivar dst_override: route by a request's C{l5d-dst-override} header when it has one (C{--dst-override},
        outbound only).
    @ivar profiles: the live L{linkproxy.discovery.profiles.Profiles}, or C{None}.
    @ivar stack: the direction's L{linkproxy.layers.stack.RequestStack} over C{router}; built from the fields
        above when not given (or when a copy of the settings has another router).
    """

    direction: str
    router: Any
    connector: Any
    metrics: Any
    reactor: Any
    response_timeout: float = 10.0
    max_header_bytes: int = 65536
    pool_idle_timeout: float = 3.0
    pool_max_idle: int = 256
    tracker: Optional[Any] = None
    dst_override: bool = False
    h2_upgrade: bool = False
    profiles: Optional[Any] = None
    stack: Optional[Any] = None
    endpoints: Optional[Any] = None

    @property
    def h1_pool(self):
        return self.endpoints.h1

    @h1_pool.setter
    def h1_pool(self, pool):
        self.endpoints.h1 = pool

    @property
    def h2_pool(self):
        return self.endpoints.h2

    @h2_pool.setter
    def h2_pool(self, pool):
        self.endpoints.h2 = pool

    def __post_init__(self):
        if self.endpoints is None:
            from linkproxy.layers.endpoint import EndpointLayer
            self.endpoints = EndpointLayer(self, h2_upgrade=self.h2_upgrade)
        stack = self.stack
        if stack is None or stack.balance.router is not self.router:
            from linkproxy.layers.stack import RequestStack
            self.stack = RequestStack(self.direction, self.router, self.metrics, self.response_timeout,
                                      profiles=self.profiles, tap=stack.tap if stack is not None else None)


@dataclass(frozen=True)
class PeerInfo:
    """
    What is known about the client of one accepted connection.

    @ivar tls: the metric label: C{"true"} when the connection is mTLS between proxies, else C{"false"}.
    @ivar client_id: the verified client identity (meshed clients only), else C{None}.
    @ivar server_id: this proxy's own identity when it terminated mTLS, else C{None}.
    """

    tls: str = "false"
    client_id: Optional[str] = None
    server_id: Optional[str] = None


PLAIN = PeerInfo()


def route_metrics(settings, peer, authority, endpoint):
    """
    The bound HTTP metrics for one (authority, endpoint) on one connection.

    Outbound, the TLS labels describe the hop to the endpoint (C{tls="true"} and its identity as
    C{server_id} when it is reached over mTLS); inbound, they describe the client (C{client_id} when meshed).

    @param endpoint: the chosen L{linkproxy.core.endpoint.Endpoint}, or C{None} when none was chosen.
    @return: a L{linkproxy.admin.metrics.HttpRouteMetrics}.
    """
    target_addr = endpoint.addr_str if endpoint is not None else ""
    if settings.direction == "outbound":
        meshed = endpoint is not None and endpoint.meshed and getattr(settings.connector, "meshed", None)
        tls, client_id, server_id = ("true", "", endpoint.identity) if meshed else ("false", "", "")
    else:
        tls, client_id, server_id = peer.tls, peer.client_id or "", peer.server_id or ""
    return settings.metrics.http_route(settings.direction, authority, target_addr, tls, client_id, server_id)
