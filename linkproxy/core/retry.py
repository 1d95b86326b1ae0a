"""
When a failed attempt of a request may go again: the pure rule the retry layer applies.

Kinds of failure, from safest to retry to least:

  - L{CONNECT}: the connection attempt failed (refused, connect timeout, a reset before a byte was written).
    Nothing reached the endpoint, so it is always retried (on another endpoint while the attempts last).
  - L{RESET}: the request was sent, then the connection or stream was lost before the response head. The
    endpoint may have acted on it, so it goes again only when that is harmless: an idempotent method or no
    body (RFC 9110 9.2.2), or a route its operator marked C{retryable} (the client would have got a 502 or
    UNAVAILABLE, which such a route retries anyway); and only with the body still held for replay.
  - L{RESPONSE}: the endpoint answered with a failure (5xx, gRPC UNAVAILABLE). Retried only on a route marked
    C{retryable}, with the body held, and within the target's retry budget.
"""

CONNECT = "connect"
RESET = "reset"
RESPONSE = "response"

#: Attempts one request may make in all (the first included).
MAX_ATTEMPTS = 3


def may_retry(kind, attempts, safe, replayable, retryable_route, max_attempts=MAX_ATTEMPTS):
    """
    @param kind: L{CONNECT}, L{RESET} or L{RESPONSE}.
    @param attempts: attempts made so far, the failed one included.
    @param safe: the method is idempotent, or the request has no body.
    @param replayable: the request (head and body) can be sent again as it was.
    @param retryable_route: the matched route is marked C{retryable}.
    @return: C{True} when another attempt may be made (the budget is checked separately, for budgeted kinds).
    """
    if attempts >= max_attempts:
        return False
    if kind == CONNECT:
        return replayable
    if kind == RESET:
        return (safe or retryable_route) and replayable
    return retryable_route and replayable


def budgeted(kind):
    """
    C{True} when retries of C{kind} draw on the target's retry budget: every kind but L{CONNECT}, whose
    attempts reached no endpoint.
    """
    return kind != CONNECT
