"""
Which responses count against an endpoint's health: the classification failure accrual uses.

This is narrower than the golden metrics' C{classification} label (L{linkproxy.admin.metrics.classify}), which
also counts gRPC UNKNOWN, DEADLINE_EXCEEDED, PERMISSION_DENIED and DATA_LOSS as failures. Those say something
about the request or the application's logic as often as about the endpoint; UNAVAILABLE and INTERNAL, like a
5xx, say the endpoint could not serve. Linkerd's consecutive-failures breaker likewise trips on 5xx.

The protocol glue turns every outcome into one of three values for L{linkproxy.interfaces.ILease.release}:

  - L{SUCCESS} (C{True}): the endpoint answered, and L{is_failure} says the answer is not a failure;
  - L{FAILURE} (C{False}): a connect failure, a reset before the response head, a response timeout, or a
    response L{is_failure} classifies as one;
  - L{NEUTRAL} (C{None}): not the endpoint's doing: the client reset or cancelled, or the proxy refused the
    request itself. It frees the request's pending slot and counts neither way.

Pure: no I/O, no clock.
"""

from typing import Optional, Union

__all__ = ["SUCCESS", "FAILURE", "NEUTRAL", "FAILURE_GRPC_STATUSES", "is_failure", "outcome"]

#: L{linkproxy.interfaces.ILease.release} values, named.
SUCCESS = True
FAILURE = False
NEUTRAL = None

#: gRPC statuses that count against the endpoint: INTERNAL (13) and UNAVAILABLE (14).
FAILURE_GRPC_STATUSES = frozenset({"13", "14"})


def is_failure(status: int, grpc_status: Union[str, int, None]) -> bool:
    """
    Whether a response counts as a failure of the endpoint that sent it.

    @param status: the HTTP status code (for gRPC, the HTTP/2 C{:status}, normally 200).
    @param grpc_status: the C{grpc-status} as text (C{""} or C{None} when absent); an C{int} is accepted too.
    @return: C{True} for any 5xx, and for gRPC status 13 (INTERNAL) or 14 (UNAVAILABLE); C{False} otherwise,
        including every 4xx and every other gRPC status.
    """
    if status >= 500:
        return True
    if not grpc_status:
        # Absent, or 0 (OK).
        return False
    if grpc_status.__class__ is not str:
        grpc_status = str(grpc_status)
    return grpc_status.strip() in FAILURE_GRPC_STATUSES


def outcome(status: int, grpc_status: Union[str, int, None]) -> Optional[bool]:
    """
    The L{linkproxy.interfaces.ILease.release} value for a response the endpoint sent: L{FAILURE} when
    L{is_failure}, else L{SUCCESS}. (A response never gives L{NEUTRAL}: that is for outcomes without one.)
    """
    return not is_failure(status, grpc_status)
