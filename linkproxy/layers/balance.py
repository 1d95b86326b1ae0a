"""
The balance layer: one attempt's endpoint, from discovery, the target's balancer and its failure accrual.
"""

from linkproxy.interfaces import ISyncRouter
from linkproxy.routing import route_request


class BalanceLayer:
    """
    Picks the endpoint of each attempt through the direction's L{linkproxy.interfaces.IRouter}, synchronously
    when the answer is known at once (see L{linkproxy.routing}).
    """

    def __init__(self, router):
        self.router = router
        # An ISyncRouter answers at once and steers retries; any other IRouter (a plugin's, written before
        # ISyncRouter existed) is asked through its Deferred, and a retry goes wherever it sends it.
        sync = ISyncRouter.providedBy(router)
        #: The router's synchronous form, or C{None}.
        self.route_now = router.route_now if sync else None
        #: Whether the router steers away from C{avoid}.
        self.avoids = sync

    def pick(self, authority, avoid, now, later, failed):
        """
        Route one attempt; see L{linkproxy.routing.route_request} for the callbacks.

        @param avoid: the L{Endpoint} the previous attempt failed on, or C{None}: not picked again when the
            target has another.
        @return: the Deferred to cancel while the attempt waits for discovery, else C{None}.
        """
        return route_request(self.router, self.route_now, authority, now, later, failed,
                             avoid if self.avoids else None)

