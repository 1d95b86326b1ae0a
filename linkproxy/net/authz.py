"""
Inbound authorization: the policy decision per connection, its metrics, and a router that enforces it per
request. Needs no TLS library, so processes without identity load it too.
"""

import weakref

from twisted.internet.defer import fail
from zope.interface import implementer

from linkproxy.admin.metrics import policy_name
from linkproxy.core.errors import Forbidden
from linkproxy.core.policy import authorize
from linkproxy.interfaces import ISyncRouter


#: Distinct values kept per label chosen by clients; the rest fold into C{"overflow"}.
MAX_AUTHZ_CLIENT_IDS = 1000
MAX_AUTHZ_TARGETS = 100

_AUTHZ_BY_REGISTRY = weakref.WeakKeyDictionary()
_AUTHZ_LABELS = ("target_addr", "policy", "tls", "client_id", "srv_group", "srv_kind", "srv_name", "srv_port")
_ALLOW_LABELS = _AUTHZ_LABELS + ("authz_group", "authz_kind", "authz_name")


class AuthzDecision:
    """
    One policy decision for one connection, with its counter bound.

    @ivar allowed: whether the client may proceed.
    @ivar reason: why (see L{linkproxy.core.policy.REASONS}).
    """

    __slots__ = ("allowed", "reason", "_counter")

    def __init__(self, allowed, reason, counter):
        self.allowed = allowed
        self.reason = reason
        self._counter = counter

    def count(self):
        """Count this decision once more: once per TCP connection, or once per HTTP request."""
        self._counter.inc()


class AuthzMetrics:
    """
    C{inbound_tcp_authz_allow_total}, C{inbound_tcp_authz_deny_total}, C{inbound_http_authz_allow_total} and
    C{inbound_http_authz_deny_total}, labelled C{target_addr}, C{policy}, C{tls}, C{client_id}, Linkerd's
    C{srv_group}/C{srv_kind}/C{srv_name}/C{srv_port}, C{authz_group}/C{authz_kind}/C{authz_name} on allows and
    C{reason} on denials, on one registry. linkproxy has no Server or AuthorizationPolicy resources: the server
    and the authorization are the process's one policy mode, named as Linkerd names its default policies
    (C{srv_kind="default"}, C{srv_name="all-unauthenticated"}, see L{linkproxy.admin.metrics.policy_name}).
    """

    def __init__(self, registry):
        from prometheus_client import Counter
        self._families = {}
        for kind in ("tcp", "http"):
            unit = "connections" if kind == "tcp" else "requests"
            self._families[kind] = (
                Counter(f"inbound_{kind}_authz_allow", f"Inbound {kind.upper()} {unit} the policy allowed",
                        _ALLOW_LABELS, registry=registry),
                Counter(f"inbound_{kind}_authz_deny", f"Inbound {kind.upper()} {unit} the policy denied",
                        _AUTHZ_LABELS + ("reason",), registry=registry),
            )
        self._client_ids = set()
        self._targets = set()

    @staticmethod
    def _bounded(seen, value, limit):
        if value in seen:
            return value
        if len(seen) >= limit:
            return "overflow"
        seen.add(value)
        return value

    def decide(self, kind, policy, allow, peer, target_addr=""):
        """
        Apply the policy to a client and bind the counter for the outcome; the caller calls
        L{AuthzDecision.count} and enforces it.

        @param kind: C{"tcp"} or C{"http"}.
        @param policy: the mode (C{config.policy}).
        @param allow: the allow list (C{config.policy_allow}).
        @param peer: the client's L{PeerInfo}.
        @param target_addr: where the connection goes, C{host:port}.
        @return: an L{AuthzDecision}.
        """
        allowed, reason = authorize(policy, allow, peer.client_id, peer.tls)
        allow_family, deny_family = self._families[kind]
        target = self._bounded(self._targets, target_addr, MAX_AUTHZ_TARGETS)
        name = policy_name(policy)
        labels = (target, policy, peer.tls, self._bounded(self._client_ids, peer.client_id or "", MAX_AUTHZ_CLIENT_IDS),
                  "", "default", name, target.rpartition(":")[2])
        if allowed:
            counter = allow_family.labels(*labels, "", "default", name)
        else:
            counter = deny_family.labels(*labels, reason)
        return AuthzDecision(allowed, reason, counter)


def authz_metrics(metrics):
    """
    The L{AuthzMetrics} on C{metrics}' registry, created on first use and shared afterwards.

    @param metrics: a L{linkproxy.admin.metrics.Metrics} (or anything with a C{registry}).
    """
    registry = metrics.registry
    found = _AUTHZ_BY_REGISTRY.get(registry)
    if found is None:
        found = _AUTHZ_BY_REGISTRY[registry] = AuthzMetrics(registry)
    return found


@implementer(ISyncRouter)
class AuthorizingRouter:
    """
    An C{IRouter} for one inbound HTTP connection: counts its policy decision on every request, and answers
    403 (C{l5d-proxy-error: unauthorized}, gRPC PERMISSION_DENIED) instead of routing when it is a denial.
    """

    def __init__(self, router, decision):
        """
        @param router: the inbound router to use when allowed.
        @param decision: the connection's L{AuthzDecision}.
        """
        self._router = router
        self._decision = decision

    def route(self, authority, avoid=None):
        """
        @return: the wrapped router's Deferred, or a failure with L{Forbidden}.
        """
        self._decision.count()
        if self._decision.allowed:
            return self._router.route(authority, avoid)
        return fail(Forbidden(f"unauthorized: {self._decision.reason}"))

    def route_now(self, authority, avoid=None):
        """
        The synchronous form of L{route} (see L{ISyncRouter}); the decision is counted once either way.

        @raise Forbidden: when the connection's decision is a denial.
        """
        decision = self._decision
        if not decision.allowed:
            decision.count()
            raise Forbidden(f"unauthorized: {decision.reason}")
        lease = self._router.route_now(authority, avoid)
        if lease is not None:
            decision.count()
        return lease
