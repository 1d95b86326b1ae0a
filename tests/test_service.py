"""
Tests for L{linkproxy.service.ProxyService}'s start-up: the heap is frozen once, after the start.
"""

from twisted.internet.task import Clock
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
