"""
Fakes shared by linkproxy's tests and by plugin authors' tests.
"""

from twisted.internet.defer import fail, succeed
from zope.interface import implementer

from linkproxy.core.endpoint import Endpoint
from linkproxy.core.errors import NoEndpoints
from linkproxy.interfaces import ILease, IRouter


@implementer(ILease)
class RecordingLease:
    """
    A lease that records what it was told.

    @ivar outcomes: the C{success} values passed to L{release}, in order (only the first counts in real leases).
    """

    def __init__(self, endpoint):
        self.endpoint = endpoint
        self.outcomes = []

    def release(self, success):
        self.outcomes.append(success)


@implementer(IRouter)
class FakeRouter:
    """
    A router over a fixed mapping of authority to endpoint address, recording every lease it hands out.

    @ivar leases: every L{RecordingLease} returned, in order.
    @ivar authorities: every authority asked for, in order.
    """

    def __init__(self, routes=None, default=None):
        """
        @param routes: C{{authority: (host, port)}}.
        @param default: C{(host, port)} for authorities not in C{routes}; C{None} means 503 (no endpoints).
        """
        self.routes = dict(routes or {})
        self.default = default
        self.leases = []
        self.authorities = []

    def route(self, authority):
        self.authorities.append(authority)
        address = self.routes.get(authority, self.default)
        if address is None:
            return fail(NoEndpoints(f"no endpoints for {authority}"))
        lease = RecordingLease(Endpoint(address=address))
        self.leases.append(lease)
        return succeed(lease)
