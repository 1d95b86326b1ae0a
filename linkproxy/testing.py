"""
Fakes shared by linkproxy's tests and by plugin authors' tests.
"""

from twisted.internet.defer import fail, succeed
from zope.interface import implementer

from linkproxy.core.endpoint import Endpoint
from linkproxy.core.errors import NoEndpoints
from linkproxy.interfaces import IDiscovery, ILease, IResolution, ISyncRouter


@implementer(ILease)
class RecordingLease:
    """
    A lease that records what it was told.

    @ivar outcomes: the C{success} values passed to L{release}, in order (only the first counts in real leases).
    """

    def __init__(self, endpoint):
        self.endpoint = endpoint
        self.outcomes = []

    def release(self, success, at=None):
        self.outcomes.append(success)


@implementer(ISyncRouter)
class FakeRouter:
    """
    A router over a fixed mapping of authority to endpoint address, recording every lease it hands out.

    @ivar leases: every L{RecordingLease} returned, in order.
    @ivar authorities: every authority asked for, in order.
    @ivar avoided: the C{avoid} endpoint of every route call, in order (C{None} for first attempts).
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
        self.avoided = []

    def route_now(self, authority, avoid=None):
        """
        Never at once: every request takes L{route}'s Deferred (which has fired already).
        """
        return None

    def route(self, authority, avoid=None):
        self.authorities.append(authority)
        self.avoided.append(avoid)
        address = self.routes.get(authority, self.default)
        if address is None:
            return fail(NoEndpoints(f"no endpoints for {authority}"))
        lease = RecordingLease(Endpoint(address=address))
        self.leases.append(lease)
        return succeed(lease)


def _as_endpoints(endpoints):
    return tuple(e if isinstance(e, Endpoint) else Endpoint(address=tuple(e)) for e in endpoints)


@implementer(IResolution)
class _FakeResolution:
    def __init__(self, discovery, target, receiver):
        self._discovery = discovery
        self.target = target
        self.receiver = receiver

    def cancel(self):
        receivers = self._discovery.receivers.get(self.target, [])
        if self.receiver in receivers:
            receivers.remove(self.receiver)
            if not receivers:
                del self._discovery.receivers[self.target]
            self._discovery.cancelled.append(self.target)


@implementer(IDiscovery)
class FakeDiscovery:
    """
    An L{IDiscovery} whose updates the test pushes.

    A target with a set in L{sets} is answered synchronously on L{resolve}; any other target waits for
    L{push}.

    @ivar sets: C{{target: endpoints}} answered on resolve, and kept current by L{push}.
    @ivar receivers: C{{target: [receiver, ...]}} of live resolutions.
    @ivar resolved: every target resolved, in order (one entry per L{resolve} call).
    @ivar cancelled: every target whose resolution was cancelled, in order.
    """

    backend = "fake"

    def __init__(self, sets=None):
        """
        @param sets: C{{target: [Endpoint or (host, port), ...]}} answered at once.
        """
        self.sets = {target: _as_endpoints(endpoints) for target, endpoints in (sets or {}).items()}
        self.receivers = {}
        self.resolved = []
        self.cancelled = []

    def resolve(self, target, receiver):
        """
        Record the resolution; answer at once when C{target} has a set in L{sets}.
        """
        self.resolved.append(target)
        self.receivers.setdefault(target, []).append(receiver)
        if target in self.sets:
            receiver.reset(self.sets[target])
        return _FakeResolution(self, target, receiver)

    def push(self, target, endpoints):
        """
        Replace C{target}'s set and deliver it (C{reset}) to every live resolution of it.

        @param endpoints: L{Endpoint}s or C{(host, port)} pairs.
        """
        self.sets[target] = endpoints = _as_endpoints(endpoints)
        for receiver in list(self.receivers.get(target, ())):
            receiver.reset(endpoints)

    def add(self, target, endpoints):
        """
        Deliver an C{add} of C{endpoints} to every live resolution of C{target}.
        """
        endpoints = _as_endpoints(endpoints)
        for receiver in list(self.receivers.get(target, ())):
            receiver.add(endpoints)

    def remove(self, target, addresses):
        """
        Deliver a C{remove} of C{addresses} to every live resolution of C{target}.
        """
        for receiver in list(self.receivers.get(target, ())):
            receiver.remove(list(addresses))

    def watching(self, target):
        """
        C{True} while some resolution of C{target} is live.
        """
        return bool(self.receivers.get(target))
