"""
What an HTTP server protocol (HTTP/1 or HTTP/2) needs from the assembly, bundled once per listener.
"""

from dataclasses import dataclass
from typing import Any, Optional

from linkproxy.admin.metrics import dst_labels


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
    @ivar route_tls: the C{tls} label of the route metrics of a stack built here (see the stack's C{tls}).
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
    route_tls: Optional[str] = None

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
                                      profiles=self.profiles, tls=self.route_tls,
                                      tap=stack.tap if stack is not None else None)


@dataclass(frozen=True)
class PeerInfo:
    """
    What is known about the client of one accepted connection.

    @ivar tls: the metric label: C{"true"} when the connection is mTLS between proxies, else
        C{"no_identity"} (Linkerd's values).
    @ivar client_id: the verified client identity (meshed clients only), else C{None}.
    @ivar server_id: this proxy's own identity when it terminated mTLS, else C{None}.
    @ivar no_tls_reason: why there is no TLS, Linkerd's C{no_tls_reason} label: C{"not_provided_by_remote"}
        (the client sent plaintext), C{"disabled"} (this proxy has no identity); C{""} under TLS.
    """

    tls: str = "no_identity"
    client_id: Optional[str] = None
    server_id: Optional[str] = None
    no_tls_reason: str = "not_provided_by_remote"


PLAIN = PeerInfo()
#: A plaintext client of a proxy that has no identity configured.
PLAIN_NO_IDENTITY = PeerInfo(no_tls_reason="disabled")


def route_metrics(settings, peer, authority, endpoint):
    """
    The bound HTTP metrics for one (authority, endpoint) on one connection.

    Outbound, the TLS labels describe the hop to the endpoint (C{tls="true"} and its identity as
    C{server_id} when it is reached over mTLS, else C{tls="no_identity"} with Linkerd's C{no_tls_reason}), and
    the endpoint's discovery labels become C{dst_*}; inbound, they describe the client (C{client_id} when
    meshed).

    @param endpoint: the chosen L{linkproxy.core.endpoint.Endpoint}, or C{None} when none was chosen.
    @return: a L{linkproxy.admin.metrics.HttpRouteMetrics}.
    """
    target_addr = endpoint.addr_str if endpoint is not None else ""
    metrics = settings.metrics
    if settings.direction == "outbound":
        tls, reason, server_id = endpoint_tls(settings.connector, endpoint)
        return metrics.http_route("outbound", authority, target_addr, tls, "", server_id, no_tls_reason=reason,
                                  dst=dst_labels(endpoint))
    return metrics.http_route(settings.direction, authority, target_addr, peer.tls, peer.client_id or "",
                              peer.server_id or "", no_tls_reason=peer.no_tls_reason if peer.tls != "true" else "")


def endpoint_tls(connector, endpoint):
    """
    The TLS labels of a connection to C{endpoint}: C{("true", "", identity)} over mTLS, else
    C{("no_identity", reason, "")} with Linkerd's reason: C{"not_provided_by_service_discovery"} for an endpoint
    discovery gave no identity, C{"disabled"} when this proxy has none.
    """
    if endpoint is None:
        return "no_identity", "not_provided_by_service_discovery", ""
    if endpoint.meshed:
        if getattr(connector, "meshed", None) is not None:
            return "true", "", endpoint.identity
        return "no_identity", "disabled", ""
    return "no_identity", "not_provided_by_service_discovery", ""
