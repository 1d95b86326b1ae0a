"""
Routers: the per-direction seam between the protocol layers and discovery/balancing (see L{IRouter}).
"""

from twisted.internet.defer import fail, succeed
from zope.interface import implementer

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
