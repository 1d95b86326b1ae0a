"""
Errors the proxy answers for itself, each with its status, its C{l5d-proxy-error} text and its gRPC status.
"""

# gRPC status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html) the proxy produces.
GRPC_UNAVAILABLE = 14
GRPC_DEADLINE_EXCEEDED = 4
GRPC_PERMISSION_DENIED = 7
GRPC_INTERNAL = 13
GRPC_RESOURCE_EXHAUSTED = 8


class ProxyError(Exception):
    """
    A failure the proxy turns into its own response.

    @ivar status: the HTTP status the proxy answers with.
    @ivar reason: the value of the C{l5d-proxy-error} header: short, specific, safe to show a client.
    @ivar grpc_status: the C{grpc-status} used instead for gRPC requests (trailers-only response).
    """

    status = 502
    grpc_status = GRPC_UNAVAILABLE

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class BadRequest(ProxyError):
    """The request could not be parsed (400)."""
    status = 400
    grpc_status = GRPC_INTERNAL


class Forbidden(ProxyError):
    """Inbound policy refused the client (403)."""
    status = 403
    grpc_status = GRPC_PERMISSION_DENIED


class HeadersTooLarge(ProxyError):
    """The request head exceeded the configured limit (431)."""
    status = 431
    grpc_status = GRPC_RESOURCE_EXHAUSTED


class Unreachable(ProxyError):
    """Connecting to the endpoint failed, or it reset before responding (502)."""
    status = 502


class NoEndpoints(ProxyError):
    """Discovery has no endpoints for the target, or all are ejected (503)."""
    status = 503


class ResponseTimeout(ProxyError):
    """The response did not start within the response timeout (504)."""
    status = 504
    grpc_status = GRPC_DEADLINE_EXCEEDED


REASON_PHRASES = {
    400: b"Bad Request",
    403: b"Forbidden",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def blames_endpoint(error):
    """
    C{True} when C{error} is the endpoint's failure (it could not be reached, reset, or was too slow), which
    failure accrual counts; the proxy's rejections of a client (400, 403, 431) and a target with no endpoints
    (503) say nothing about any endpoint.
    """
    return isinstance(error, (Unreachable, ResponseTimeout))
