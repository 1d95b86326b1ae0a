"""
C{GET /tap}: finished requests as server-sent events, from the process's L{linkproxy.layers.tap.TapLayer}.

Each subscriber is a L{TapStream}: a watcher that filters an event and queues it (bounded), and a producer
that writes what is queued to its client a few times a second, as the client reads. A subscriber that
reads too slowly loses events rather than holding the data path or the proxy's memory: the loss is counted
and reported in the stream as an C{event: lost} with the running total.

Query parameters (all optional): C{authority} (exact), C{path} (prefix), C{method}, C{direction},
C{status} (C{503}, or a class such as C{5xx}), C{limit} (stop after that many events).
"""

import json
from collections import deque

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

#: Events queued for one subscriber before new ones are dropped (and counted as lost).
MAX_QUEUED = 1000
#: How often queued events are written, in seconds.
FLUSH_INTERVAL = 0.1
#: Comment lines keep idle streams alive through intermediaries and let a gone client be noticed.
KEEPALIVE_INTERVAL = 15.0

_FILTERS = ("authority", "path", "method", "direction", "status")


class TapFilterError(ValueError):
    """
    A query parameter that cannot be a filter; its message is the 400's text.
    """


def parse_filters(args):
    """
    @param args: the request's query arguments, C{{bytes: [bytes, ...]}} as twisted.web gives them.
    @return: C{(filters, limit)}: a dict of the filters given, by name, and the limit or C{None}.
    @raise TapFilterError: for an unknown parameter or a bad value.
    """
    filters = {}
    limit = None
    for raw_name, values in args.items():
        name = raw_name.decode("utf-8", "replace")
        value = values[-1].decode("utf-8", "replace")
        if name == "limit":
            if not value.isdigit() or int(value) < 1:
                raise TapFilterError(f"limit must be a positive whole number, got {value!r}")
            limit = int(value)
        elif name == "status":
            if not (len(value) == 3 and (value.isdigit() or (value[0] in "12345" and value[1:] == "xx"))):
                raise TapFilterError(f"status must be a code such as 503 or a class such as 5xx, got {value!r}")
            filters[name] = value
        elif name in _FILTERS:
            filters[name] = value
        else:
            raise TapFilterError(f"unknown tap parameter {name!r}; use {', '.join(_FILTERS + ('limit',))}")
    if "method" in filters:
        filters["method"] = filters["method"].upper()
    return filters, limit


def matches(filters, event):
    """
    C{True} when C{event} passes every filter in C{filters}.
    """
    for name, wanted in filters.items():
        if name == "path":
            if not event["path"].startswith(wanted):
                return False
        elif name == "status":
            status = str(event["status"])
            if wanted.endswith("xx") and status[:1] != wanted[0] or not wanted.endswith("xx") and status != wanted:
                return False
        elif event[name] != wanted:
            return False
    return True


@implementer(IPushProducer)
class TapStream:
    """
    One C{/tap} subscriber: a watcher of the tap layer, and the producer of its response body.

    @ivar lost: events dropped so far because the client read too slowly.
    @ivar sent: events written so far.
    @ivar finished: fires (with C{b""}, the rest of the body) when the stream reaches its limit; cancelling it
        (Klein does when the client goes away) stops the stream.
    """

    def __init__(self, request, tap, reactor, filters, limit, max_queued=MAX_QUEUED):
        self._request = request
        self._tap = tap
        self._reactor = reactor
        self._filters = filters
        self._limit = limit
        self._max = max_queued
        self._queue = deque()
        self._paused = False
        self._timer = None
        self._keepalive = None
        self._reported = 0
        self._done = False
        self.lost = 0
        self.sent = 0
        self.finished = Deferred(lambda _: self._stop())

    def start(self):
        """
        Send the stream's head and start watching.

        @return: C{False} when the tap has as many watchers as it takes (the caller answers 429).
        """
        if not self._tap.watch(self):
            return False
        request = self._request
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.registerProducer(self, True)
        request.write(b": linkproxy tap\n\n")
        request.notifyFinish().addBoth(self._gone)
        self._keepalive = self._reactor.callLater(KEEPALIVE_INTERVAL, self._ping)
        return True

    # -- the watcher: on the data path, O(1) and never blocking --------------------------------------------

    def __call__(self, event):
        if self._done or (self._filters and not matches(self._filters, event)):
            return
        if len(self._queue) >= self._max:
            self.lost += 1
        else:
            self._queue.append(event)
        if self._timer is None and not self._paused:
            self._timer = self._reactor.callLater(FLUSH_INTERVAL, self._flush)

    # -- writing ------------------------------------------------------------------------------------------

    def _flush(self):
        self._timer = None
        if self._done or self._paused:
            return
        out = []
        if self.lost != self._reported:
            self._reported = self.lost
            out.append(b"event: lost\ndata: " + json.dumps({"lost": self.lost}).encode() + b"\n\n")
        queue = self._queue
        while queue:
            event = queue.popleft()
            out.append(b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")
            self.sent += 1
            if self._limit is not None and self.sent >= self._limit:
                break
        if out:
            self._request.write(b"".join(out))
        if self._limit is not None and self.sent >= self._limit:
            self._finish()

    def _ping(self):
        self._keepalive = None
        if not self._done:
            self._request.write(b": keepalive\n\n")
            self._keepalive = self._reactor.callLater(KEEPALIVE_INTERVAL, self._ping)

    def _finish(self):
        if not self._done:
            self._stop()
            self._request.unregisterProducer()
            self.finished.callback(b"")

    def _gone(self, result):
        self._stop()
        return None

    def _stop(self):
        self._done = True
        self._tap.unwatch(self)
        self._queue.clear()
        for name in ("_timer", "_keepalive"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)

    # -- IPushProducer: the client's transport --------------------------------------------------------------

    def pauseProducing(self):
        """The client reads too slowly: queue (bounded) instead of writing."""
        self._paused = True

    def resumeProducing(self):
        """The client caught up: write what is queued."""
        self._paused = False
        if self._timer is None and not self._done:
            self._timer = self._reactor.callLater(0, self._flush)

    def stopProducing(self):
        """The client went away."""
        self._stop()
