"""
The retry layer: whether a failed attempt goes again, and the counting that goes with it.
"""

from linkproxy.core import retry as rules


class RetryLayer:
    """
    Applies L{linkproxy.core.retry.may_retry} and, for budgeted kinds, the target's retry budget.
    """

    def __init__(self, max_attempts=rules.MAX_ATTEMPTS):
        self.max_attempts = max_attempts

    def decide(self, call, kind, now, safe, replayable):
        """
        @param call: the L{linkproxy.layers.stack.Call} whose attempt failed.
        @return: C{True} when the call should make another attempt; the route metrics count it either way.
        """
        if not rules.may_retry(kind, call.attempts, safe, replayable, call.route.retryable, self.max_attempts):
            return False
        budget = call.budget
        metrics = call.metrics
        if budget is not None and rules.budgeted(kind) and not budget.withdraw(now):
            if metrics is not None:
                metrics.budget_exhausted.inc()
            return False
        if metrics is not None:
            metrics.retries.inc()
        return True
