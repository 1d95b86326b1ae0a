"""
Tests for L{linkproxy.service.ProxyService}'s start-up (the heap is frozen once, after the start) and the logging
of its drain.
"""

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from linkproxy.net.tracker import ConnectionTracker
from linkproxy.service import ProxyService, freeze_startup_heap


class FreezeHeapTests(SynchronousTestCase):
    def test_frozen_once_after_start(self):
        """
        Starting the service schedules the freeze for the next reactor turn, not during C{startService}.
        """
        clock = Clock()
        calls = []
        service = ProxyService(reactor=clock, tracker=ConnectionTracker(), grace_period=1.0,
                               freeze_heap=lambda: calls.append(clock.seconds()))
        service.startService()
        self.assertEqual(calls, [])
        clock.advance(0)
        self.assertEqual(calls, [0])
        clock.advance(10)
        self.assertEqual(calls, [0])

    def test_default_is_gc_freeze(self):
        service = ProxyService(reactor=Clock(), tracker=ConnectionTracker(), grace_period=1.0)
        self.assertIs(service._freeze_heap, freeze_startup_heap)


class _Conn:
    """
    A tracked connection that stays open until told otherwise.
    """

    def __init__(self, tracker):
        self.tracker = tracker
        self.drained = self.aborted = False

    def drain(self):
        self.drained = True

    def abort(self):
        self.aborted = True
        self.tracker.discard(self)


class DrainLogTests(SynchronousTestCase):
    """
    A drain is logged when it starts, with the open connections, and when it ends.
    """

    def stop(self, connections, close_after):
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        clock = Clock()
        tracker = ConnectionTracker()
        conns = [_Conn(tracker) for _ in range(connections)]
        for conn in conns:
            tracker.add(conn)
        service = ProxyService(reactor=clock, tracker=tracker, grace_period=5.0, freeze_heap=lambda: None)
        service.startService()
        stopped = service.stopService()
        if close_after is not None:
            clock.advance(close_after)
            for conn in conns:
                tracker.discard(conn)
        else:
            clock.advance(5.0)
        self.successResultOf(stopped)
        return [(e["log_level"].name, e["log_format"].format(**e)) for e in logged
                if e.get("log_namespace") == "linkproxy.service"]

    def test_finished(self):
        """
        Connections that close within the grace period: the start names how many were open, the end how long
        the drain took and that nothing was aborted.
        """
        self.assertEqual(self.stop(2, close_after=1.5), [
            ("info", "draining 2 open connections (grace period 5.0 s)"),
            ("info", "drain finished after 1.5 s (0 connections aborted)"),
        ])

    def test_aborted(self):
        """
        Connections still open when the grace period ends are aborted, and the end says how many.
        """
        self.assertEqual(self.stop(1, close_after=None), [
            ("info", "draining 1 open connections (grace period 5.0 s)"),
            ("warn", "grace period over; aborting 1 connections"),
            ("info", "drain finished after 5.0 s (1 connections aborted)"),
        ])
