"""
Loggers for linkproxy's own modules, gated by the runtime log level (C{--log-level}, C{PUT /proxy-log-level}).

C{twist} owns the global log observers and their level filter; linkproxy cannot insert a filter there. So
linkproxy's loggers publish through L{gate}, which drops events below the runtime level before they reach the
global publisher. Until a service installs a L{LogLevelControl}, everything passes (tests, library use).
"""

from twisted.logger import Logger, PredicateResult, globalLogPublisher
from zope.interface import implementer
from twisted.logger import ILogObserver


@implementer(ILogObserver)
class _Gate:
    """
    The observer every linkproxy logger publishes to.

    @ivar control: the L{linkproxy.admin.loglevel.LogLevelControl} in force, or C{None}.
    """

    control = None

    def __call__(self, event):
        control = self.control
        if control is not None and control.predicate(event) == PredicateResult.no:
            return
        globalLogPublisher(event)


gate = _Gate()


def logger(namespace):
    """
    A L{Logger} for a linkproxy module, subject to the runtime log level.
    """
    return Logger(namespace=namespace, observer=gate)
