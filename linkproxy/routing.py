"""
Routers: the per-direction seam between the protocol layers and discovery/balancing (see L{IRouter}).
"""

import ipaddress

from twisted.internet.defer import fail, succeed
from zope.interface import implementer

from linkproxy.core.endpoint import Endpoint, parse_host_port
from linkproxy.core.errors import NoEndpoints
from linkproxy.interfaces import ILease, IRouter


@implementer(ILease)
class FixedLease:
    """
    A lease on an endpoint that no balancer tracks.
    """

    __slots__ = ("endpoint",)

    def __init__(self, endpoint):
        self.endpoint = endpoint

    def release(self, success):
        pass


@implementer(IRouter)
class FixedRouter:
    """
    Routes every request to one endpoint, whatever its authority: the inbound side's route to the local app.
    """

    def __init__(self, endpoint):
        self._lease = FixedLease(endpoint) if endpoint is not None else None

    def route(self, authority):
        if self._lease is None:
            return fail(NoEndpoints("no endpoint configured"))
        return succeed(self._lease)


@implementer(IRouter)
class ResolvingRouter:
    """
    Routes to the address an authority names: IP literals directly, host names through the reactor's resolver.

    This is the zero-config outbound router until discovery and balancing take over.
    """

    def __init__(self, reactor):
        self._reactor = reactor
        self._literal = {}

    def route(self, authority):
        lease = self._literal.get(authority)
        if lease is not None:
            return succeed(lease)
        try:
            host, port = parse_host_port(authority)
        except ValueError as e:
            return fail(NoEndpoints(f"invalid authority {authority!r}: {e}"))
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            lease = FixedLease(Endpoint(address=(host, port)))
            if len(self._literal) < 4096:
                self._literal[authority] = lease
            return succeed(lease)

        def resolved(ip):
            return FixedLease(Endpoint(address=(ip, port)))

        def unresolved(failure):
            raise NoEndpoints(f"no endpoints for {authority}: {failure.getErrorMessage()}")

        return self._reactor.resolve(host).addCallbacks(resolved, unresolved)
