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
    """

    def update(endpoints, now):
        """
        Replace the endpoint set. State (EWMA, accrual) survives for endpoints that remain.
        """

    def pick(now):
        """
        Choose an endpoint.

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

        @param rtt: seconds to the first response byte (HTTP) or to connect (TCP); C{None} on failure.
        @param success: C{True} when the endpoint answered; C{False} for a connect failure, a reset before the
            response, or a response timeout; C{None} when the client cancelled first (frees the pending slot,
            counts neither way).
        """

    def snapshot(now):
        """
        @return: a list of C{(endpoint, state, cost)} for metrics, with C{state} one of C{"ready"},
            C{"ejected"} or C{"probing"} (ejected, with its one probe request allowed).
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

    def release(success):
        """
        Report the outcome once: C{True} when the response head arrived (RTT is measured to now), C{False} on a
        connect failure, a reset before the response, or a timeout, C{None} when the client gave up before
        any of those (not the endpoint's fault). Further calls are ignored.
        """


class IRouter(Interface):
    """
    The seam between the protocol layers and discovery/balancing: one per direction.
    """

    def route(authority):
        """
        Pick an endpoint for one request to C{authority} (C{"host:port"}).

        @return: a L{twisted.internet.defer.Deferred} firing with an L{ILease}, or failing with a
            L{linkproxy.core.errors.ProxyError} (L{NoEndpoints} and so on).
        """
