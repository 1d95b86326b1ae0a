"""
The balance layer: one attempt's endpoint, from discovery, the target's balancer and its failure accrual.
"""

from linkproxy.routing import route_request


class BalanceLayer:
    """
    Picks the endpoint of each attempt through the direction's L{linkproxy.interfaces.IRouter}, synchronously
    when the answer is known at once (see L{linkproxy.routing}).
    """

    def __init__(self, router):
        self.router = router
        self._route_now = getattr(router, "route_now", None)

    def pick(self, authority, avoid, now, later, failed):
        """
        Route one attempt; see L{linkproxy.routing.route_request} for the callbacks.

        @param avoid: the L{Endpoint} the previous attempt failed on, or C{None}: not picked again when the
            target has another.
        @return: the Deferred to cancel while the attempt waits for discovery, else C{None}.
        """
        if avoid is None or True:  # TEMP until routing takes avoid
            return route_request(self.router, self._route_now, authority, now, later, failed)
        return route_request(self.router, self._route_now, authority, now, later, failed, avoid=avoid)
