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
        # Routers written before route_now and avoid joined IRouter may lack them: they still route, and a
        # retry then goes wherever they send it.
        self._route_now = getattr(router, "route_now", None)
        self._avoids = _takes_avoid(router.route) and (self._route_now is None or _takes_avoid(self._route_now))

    def pick(self, authority, avoid, now, later, failed):
        """
        Route one attempt; see L{linkproxy.routing.route_request} for the callbacks.

        @param avoid: the L{Endpoint} the previous attempt failed on, or C{None}: not picked again when the
            target has another.
        @return: the Deferred to cancel while the attempt waits for discovery, else C{None}.
        """
        return route_request(self.router, self._route_now, authority, now, later, failed,
                             avoid if self._avoids else None)


def _takes_avoid(method):
    import inspect
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return "avoid" in parameters or any(p.kind == p.VAR_POSITIONAL for p in parameters.values())
