"""
The plugin contracts: discovery backends and balancers, plus the routing seam the HTTP and TCP layers call.

Third parties ship a balancer or discovery backend by installing a module into a C{twisted/plugins/} directory
that provides L{IBalancerFactory} or L{IDiscoveryFactory}; linkproxy finds it with L{twisted.plugin.getPlugins}.
"""

from zope.interface import Attribute, Interface


class IResolutionReceiver(Interface):
    """
    What an L{IResolution} reports endpoint-set updates to.
    """

    def reset(endpoints):
        """
        Replace the whole endpoint set.

        @param endpoints: a sequence of L{linkproxy.core.endpoint.Endpoint}; empty means "no endpoints".
        """

    def add(endpoints):
        """
        Add (or replace, by address) endpoints.
        """

    def remove(addresses):
        """
        Remove endpoints by their C{(host, port)} address.
        """


class IResolution(Interface):
    """
    A live, cancellable stream of endpoint-set updates for one logical target.
    """

    def cancel():
        """
        Stop watching; no more updates are delivered after this returns.
        """


class IDiscovery(Interface):
    """
    A discovery backend: turns a logical target (C{"host:port"}) into endpoint-set updates.
    """

    def resolve(target, receiver):
        """
        Start watching C{target}.

        @param target: the logical target, C{"host:port"}.
        @param receiver: an L{IResolutionReceiver}; the first update may be delivered synchronously.
        @return: an L{IResolution}.
        """


class IDiscoveryFactory(Interface):
    """
    A named discovery backend, found with C{getPlugins(IDiscoveryFactory)}.
    """

    name = Attribute("The name used with C{--discovery NAME[:ARG]}.")

    def build(argument, reactor, log):
        """
        @param argument: the text after C{NAME:} in the discovery spec, or C{""}.
        @param log: a L{twisted.logger.Logger} for the backend's own events.
        @return: an L{IDiscovery}.
        """


class IBalancer(Interface):
    """
    Picks one endpoint of a set for each request (HTTP) or connection (TCP), and learns from outcomes.

    All methods take the current time C{now} (seconds, monotonic) so the math stays pure.

    This is the contract every balancer plugin meets. L{IResilientBalancer} adds what the built-in balancers
    also offer (C{avoid} for retries, panic mode, transition reports); the router uses each of those when a
    balancer has it and does without otherwise, so plugins written against this interface keep working.
    """

    def update(endpoints, now):
        """
        Replace the endpoint set. State (EWMA, accrual) survives for endpoints that remain.
        """

    def pick(now):
        """
        Choose an endpoint.

        A balancer may also accept C{pick(now, avoid)}, see L{IResilientBalancer.pick}; the router finds out
        once, from the method's signature, when it builds the balancer.

        @return: an L{linkproxy.core.endpoint.Endpoint}, or C{None} when none is available (empty set, all
            ejected or zero weight).
        """

    def start(endpoint, now):
        """
        A request to C{endpoint} begins (pending + 1). Call it straight after L{pick}: for a probing endpoint
        this is what claims the one probe.
        """

    def finish(endpoint, now, rtt, success):
        """
        The request to C{endpoint} that L{start} counted has its outcome.

        @param now: when the outcome became known (for gRPC, at the trailers).
        @param rtt: seconds to the response head (HTTP) or to connect (TCP), when the endpoint answered and
            the answer was a success; C{None} otherwise.
        @param success: C{True} when the endpoint answered and the answer is not a failure; C{False} for a
            connect failure, a reset before the response, a response timeout, or a response that
            L{linkproxy.core.classify.is_failure} classifies as a failure (any 5xx, gRPC INTERNAL or
            UNAVAILABLE); C{None} when the outcome was not the endpoint's doing (the client cancelled or reset,
            or the proxy refused the request itself): it frees the pending slot and counts neither way.
        """

    def snapshot(now):
        """
        @return: a list of C{(endpoint, state, cost)} for metrics, with C{state} one of C{"ready"},
            C{"ejected"} or C{"probing"} (ejected, with its one probe request allowed).
        """


class IResilientBalancer(IBalancer):
    """
    An L{IBalancer} with the optional extras the built-in balancers provide. The router looks for each one
    separately, once per balancer, so a plugin may offer any of them.
    """

    def pick(now, avoid=None):
        """
        Choose an endpoint, never C{avoid} while another endpoint is available.

        @param avoid: an L{linkproxy.core.endpoint.Endpoint} (compared by address) or C{None}: the endpoint a
            retried request just failed on. The router passes it positionally, and only for retries.
        @return: as for L{IBalancer.pick}.
        """

    def panic_pick(now, avoid=None):
        """
        Called when L{pick} returned C{None}: the endpoint to use anyway, because every endpoint that has a
        weight is ejected (panic mode). The built-in balancers return the one that failed least recently.

        @param avoid: as for L{pick}.
        @return: an L{linkproxy.core.endpoint.Endpoint}, or C{None} when there is nothing to fall back to
            (no endpoints, or only weight-0 ones): the request then fails with 503.
        """

    def listen(listener):
        """
        Report health transitions, as they happen, to C{listener(endpoint, event, reason)}: C{event} is
        C{"ejected"} or C{"recovered"}, C{reason} a short text (C{"7 consecutive failures"},
        C{"probe succeeded"}). The router logs them with the target's name. Called at most once per balancer,
        before any other method but L{update}.

        @param listener: the callable, or C{None} to stop.
        """


class IBalancerFactory(Interface):
    """
    A named balancer, found with C{getPlugins(IBalancerFactory)}.
    """

    name = Attribute("The name used with C{--balancer NAME}.")

    def build(random):
        """
        @param random: a L{random.Random} the balancer owns (seeded in tests).
        @return: a fresh L{IBalancer} for one target.
        """


class ILease(Interface):
    """
    One request's hold on an endpoint, from routing until its outcome is known.
    """

    endpoint = Attribute("The chosen L{linkproxy.core.endpoint.Endpoint}.")

    def release(success, at=None):
        """
        Report the outcome once; further calls are ignored.

        @param success: C{True} when the endpoint answered and the answer is not a failure; C{False} on a
            connect failure, a reset before the response, a response timeout, or a response that
            L{linkproxy.core.classify.is_failure} classifies as a failure (5xx, gRPC INTERNAL or UNAVAILABLE);
            C{None} when it was not the endpoint's doing: the client cancelled or reset, or the proxy refused
            the request itself. C{None} frees the pending slot and counts neither way.
        @param at: the reactor time the response head arrived, or C{None} for now. The RTT is measured to it,
            so that an outcome known only later (gRPC's, at the trailers) still measures the time to the head.
        """


class IRouter(Interface):
    """
    The seam between the protocol layers and discovery/balancing: one per direction.

    Routers from L{linkproxy.routing} also offer the synchronous C{route_now(authority, avoid=None)} and take
    C{avoid} in C{route}; see L{ISyncRouter}, which they provide. Callers that may be given any L{IRouter}
    should use L{linkproxy.routing.route_request}, which copes with both.
    """

    def route(authority):
        """
        Pick an endpoint for one request to C{authority} (C{"host:port"}).

        @return: a L{twisted.internet.defer.Deferred} firing with an L{ILease}, or failing with a
            L{linkproxy.core.errors.ProxyError} (L{NoEndpoints} and so on).
        """


class ISyncRouter(IRouter):
    """
    An L{IRouter} that can answer at once, and steer retries away from the endpoint that just failed.

    C{route_now}'s contract, for callers on the data path (nearly every request is answered without waiting,
    and a Deferred per request is a measurable part of a hop's CPU):

      - it returns the L{ILease} that L{route} would fire with, when that is known at once;
      - it raises the L{linkproxy.core.errors.ProxyError} that L{route} would fail with at once;
      - it returns C{None} when L{route} would have to wait (discovery has not answered yet): the caller then
        calls L{route}, which redoes whatever C{route_now} did before giving up, so nothing is counted twice.

    C{avoid}, in both, is an L{linkproxy.core.endpoint.Endpoint} or C{None}: when the target has another
    endpoint available, the lease is not on C{avoid} (matched by address). Retries pass the endpoint the
    previous attempt failed on. Routers with a single endpoint ignore it.
    """

    def route(authority, avoid=None):
        """
        As L{IRouter.route}, steering away from C{avoid}.
        """

    def route_now(authority, avoid=None):
        """
        The synchronous form of L{route} (see above).

        @return: an L{ILease}, or C{None} when L{route} would have to wait.
        @raise linkproxy.core.errors.ProxyError: when L{route} would fail at once.
        """
