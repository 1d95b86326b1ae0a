"""
The timeout layer: how long a request may wait for its response head, and what the answer says after that.

Three limits apply, the shortest wins: the listener's C{--response-timeout}, the matched route's C{timeout}
(the whole request, retries included) and a gRPC client's C{grpc-timeout}. Each names itself in the 504's
C{l5d-proxy-error} (a gRPC request gets DEADLINE_EXCEEDED as a trailers-only answer instead).
"""


class TimeoutLayer:
    """
    @ivar response_timeout: the listener's limit in seconds, applied to every request.
    """

    def __init__(self, response_timeout):
        self.response_timeout = response_timeout
        self._default = (response_timeout, f"response timeout after {response_timeout:g}s")

    def limit(self, route, grpc_timeout=None):
        """
        @param route: the matched L{linkproxy.core.profile.Route}.
        @param grpc_timeout: seconds from the request's C{grpc-timeout}, or C{None}.
        @return: C{(seconds, reason)}: the limit from the request's start, and the C{l5d-proxy-error} text.
        """
        best = self._default
        timeout = route.timeout
        if timeout is not None and timeout < best[0]:
            best = (timeout, f"route {route.name} timed out after {timeout:g}s")
        if grpc_timeout is not None and grpc_timeout < best[0]:
            best = (grpc_timeout, f"grpc-timeout of {grpc_timeout:g}s exceeded")
        return best
