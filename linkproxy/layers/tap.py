"""
The tap layer: each finished request (and each attempt a retry dropped) as one event, for whoever watches.

One L{TapLayer} serves the whole process, both directions, so one C{/tap} stream sees everything. It costs
nothing while no one watches: the glue checks L{TapLayer.watchers} (an empty list) and builds no event.
Watchers run on the data path, inside the request's event, so each must be quick and must never block: the
C{/tap} streams and the access log only queue the event (bounded) and write it later.

An event is a plain dict (see L{EVENT_FIELDS}); the glue fills it, the watchers only read it.
"""

#: The fields of every event, as C{/tap} streams them (DESIGN.md) plus C{attempt}/C{final}, which mark the
#: attempts of a retried request (the dropped ones are C{final: false}), and C{client_addr}/C{version} for the
#: access log.
EVENT_FIELDS = (
    "direction", "authority", "method", "path", "status", "grpc_status", "latency_ms", "duration_ms",
    "endpoint", "tls", "client_id", "request_bytes", "response_bytes", "route", "error", "attempt", "final",
    "client_addr", "version", "timestamp",
)

#: Watchers at most, C{/tap} streams and the access log together; C{/tap} answers 429 past it.
MAX_WATCHERS = 8


class TapLayer:
    """
    @ivar watchers: the callables C{watcher(event)} called with each event; empty while no one watches.
    """

    def __init__(self, clock=None, max_watchers=MAX_WATCHERS):
        """
        @param clock: a zero-argument callable for the events' C{timestamp} (wall-clock seconds); C{time.time}
            when not given.
        """
        if clock is None:
            import time
            clock = time.time
        self.clock = clock
        self.max_watchers = max_watchers
        self.watchers = []

    def watch(self, watcher):
        """
        Add C{watcher}.

        @return: C{False} (and nothing added) when L{max_watchers} already watch.
        """
        if len(self.watchers) >= self.max_watchers:
            return False
        # A new list, so an emit in progress keeps iterating the one it started with.
        self.watchers = self.watchers + [watcher]
        return True

    def unwatch(self, watcher):
        """
        Remove C{watcher} (no error when it is not there).
        """
        self.watchers = [w for w in self.watchers if w is not watcher]

    def emit(self, event):
        """
        Hand C{event} to every watcher; a watcher that raises is removed, so it cannot break the data path.
        """
        event["timestamp"] = self.clock()
        for watcher in self.watchers:
            try:
                watcher(event)
            except Exception:
                from twisted.logger import Logger
                Logger(namespace="linkproxy.tap").failure("a tap watcher failed and was removed")
                self.unwatch(watcher)
