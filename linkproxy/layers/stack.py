"""
One direction's request layers, and the per-request L{Call} the protocol glue drives.

The glue's side of the contract, for each request::

    call = stack.begin(authority, method, target, now, grpc_timeout)   # route, split, timeout; counted
    call.pick(now_cb, later_cb, failed_cb)                              # balance: one attempt's endpoint
    ... the attempt fails before a response head ...
    if call.retry(kind, now, safe, replayable): call.pick(...)          # retry: another endpoint, or not
    ... the response head arrives ...
    call.answered(status, grpc_status, latency_ms)                      # route metrics, once per attempt

A target without a profile costs one dictionary lookup and one small object per request.
"""

from linkproxy.core import retry as rules
from linkproxy.core.profile import DEFAULT_ROUTE
from linkproxy.layers.balance import BalanceLayer
from linkproxy.layers.retry import RetryLayer
from linkproxy.layers.route import RouteLayer
from linkproxy.layers.split import SplitLayer
from linkproxy.layers.timeout import TimeoutLayer
from linkproxy.routing import route_request

CONNECT, RESET, RESPONSE = rules.CONNECT, rules.RESET, rules.RESPONSE


class RequestStack:
    """
    route → split → timeout → retry → balance, for one direction, with the tap watching what finishes (the endpoint layer sits with the codecs'
    pools, see L{linkproxy.layers.endpoint}).
    """

    def __init__(self, direction, router, metrics, response_timeout, profiles=None, rng=None, tls=None,
                 tap=None):
        """
        @param direction: C{"inbound"} or C{"outbound"}, the metrics label.
        @param router: the direction's L{linkproxy.interfaces.IRouter}.
        @param metrics: the L{linkproxy.admin.metrics.Metrics}.
        @param response_timeout: the listener's response timeout, in seconds.
        @param profiles: the live L{linkproxy.discovery.profiles.Profiles}, or C{None}.
        @param rng: the L{random.Random} splits pick with (seeded in tests).
        @param tls: the C{tls} label of the route metrics: inbound, the TLS of the client connection this stack
            serves; C{None} (no label) outbound, where a route is counted before an endpoint is chosen.
        @param tap: the process's L{linkproxy.layers.tap.TapLayer}; a private one (never watched) when not given.
        """
        if rng is None:
            from random import Random
            rng = Random()
        self.direction = direction
        self.profiles = profiles
        self.metrics = metrics
        self.tls = tls
        self.route = RouteLayer(profiles)
        self.split = SplitLayer(profiles, rng)
        self.timeout = TimeoutLayer(response_timeout)
        # Inbound, the one endpoint is the local app: a failure there is answered at once, and the client's
        # own proxy decides whether to retry elsewhere.
        self.retry = RetryLayer(max_attempts=1 if direction == "inbound" else rules.MAX_ATTEMPTS)
        self.balance = BalanceLayer(router)
        self._default_timeout = self.timeout.limit(DEFAULT_ROUTE)
        if tap is None:
            from linkproxy.layers.tap import TapLayer
            tap = TapLayer()
        self.tap = tap

    def begin(self, authority, method, target, now, grpc_timeout=None):
        """
        A new request: its profile and route, its concrete target, its deadline.

        @param authority: the logical target the client named.
        @param target: the request-target (HTTP/1) or C{:path} (HTTP/2).
        @param grpc_timeout: seconds from C{grpc-timeout}, or C{None}.
        @return: a L{Call}.
        """
        profiles = self.profiles
        if grpc_timeout is None and (profiles is None or profiles.get(authority) is None):
            # The common case, kept to one lookup: no profile, so no route, split or budget, and the
            # listener's timeout (the route layer would answer the same).
            return Call(self, authority, DEFAULT_ROUTE, self._default_timeout)
        profile, route = self.route.classify(authority, method, target)
        call = Call(self, authority, route, self.timeout.limit(route, grpc_timeout))
        if profile is not None:
            call.concrete = self.split.concrete(profile, authority)
            call.budget = self.profiles.budget(profile.target)
            call.budget.deposit(now)
            metrics = call.metrics = self.metrics.route(self.direction, profile.target, route.name,
                                                              self.tls)
            metrics.requests.inc()
        return call


class Call:
    """
    One request's passage through the layers: its targets, its attempts and its deadline.

    @ivar authority: the logical target the client named.
    @ivar concrete: the target balanced over (a split leg's, or C{authority}).
    @ivar route: the matched L{linkproxy.core.profile.Route}.
    @ivar metrics: the route's L{linkproxy.admin.metrics.RouteMetrics}, or C{None} without a profile.
    @ivar budget: the target's L{linkproxy.core.retry_budget.RetryBudget}, or C{None} without a profile.
    @ivar timeout: seconds from the request's start before it is answered with a timeout.
    @ivar timeout_reason: the C{l5d-proxy-error} text of that timeout.
    @ivar attempts: attempts made so far.
    @ivar avoid: the endpoint the last attempt failed on, or C{None}.
    """

    __slots__ = ("_stack", "authority", "concrete", "route", "metrics", "budget", "timeout", "timeout_reason",
                 "attempts", "avoid")

    def __init__(self, stack, authority, route, timeout):
        self._stack = stack
        self.authority = authority
        self.concrete = authority
        self.route = route
        self.timeout, self.timeout_reason = timeout
        self.metrics = None
        self.budget = None
        self.attempts = 0
        self.avoid = None

    def pick(self, now, later, failed):
        """
        Route the next attempt (see L{linkproxy.layers.balance.BalanceLayer.pick}).
        """
        self.attempts += 1
        metrics = self.metrics
        if metrics is not None:
            metrics.actual_requests.inc()
        balance = self._stack.balance
        return route_request(balance.router, balance.route_now, self.concrete, now, later, failed,
                             self.avoid if balance.avoids else None)

    def retry(self, kind, now, endpoint, safe, replayable):
        """
        The attempt on C{endpoint} failed with C{kind} before its response reached the client.

        @return: C{True} when the glue should call L{pick} again (the next attempt avoids C{endpoint}).
        """
        self.avoid = endpoint
        return self._stack.retry.decide(self, kind, now, safe, replayable)

    def answered(self, status, grpc_status, latency_ms):
        """
        An attempt ended with a response (or the proxy's own error): count it in the route's actual responses.
        """
        metrics = self.metrics
        if metrics is not None:
            metrics.actual_response(status, grpc_status, latency_ms)

    def finished(self, status, grpc_status, latency_ms):
        """
        The response the client got: count it in the route's responses.
        """
        metrics = self.metrics
        if metrics is not None:
            metrics.response(status, grpc_status, latency_ms)
