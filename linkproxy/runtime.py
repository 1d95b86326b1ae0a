"""
What every stage of one proxy process shares, built once by the tap and passed to each assembly function.
"""

from dataclasses import dataclass
from typing import Any


@dataclass
class Runtime:
    """
    @ivar reactor: the reactor (time, TCP, resolver).
    @ivar config: the frozen L{linkproxy.config.Config}.
    @ivar metrics: the L{linkproxy.admin.metrics.Metrics}.
    @ivar tracker: the L{linkproxy.net.tracker.ConnectionTracker} a drain walks.
    @ivar connector: the L{linkproxy.net.connect.Connector} every upstream connection goes through.
    @ivar log_level: the L{linkproxy.admin.loglevel.LogLevelControl}.
    @ivar identity: the L{linkproxy.identity.store.IdentityStore}, or C{None} when identity is off.
    @ivar tap: the L{linkproxy.layers.tap.TapLayer} every request stack reports finished requests to.
    @ivar profiles: the L{linkproxy.discovery.profiles.Profiles} requests look their target's routes, budget
        and split up in; always one (empty when the discovery backend has no profiles), whatever is passed.
    """

    reactor: Any
    config: Any
    metrics: Any
    tracker: Any
    connector: Any
    log_level: Any = None
    identity: Any = None
    profiles: Any = None
    tap: Any = None

    def __post_init__(self):
        if self.tap is None:
            # One for the process: /tap and the access log watch both directions through it.
            from linkproxy.layers.tap import TapLayer

            self.tap = TapLayer()
        if self.profiles is None:
            # The request path asks every request's target; it must never have to check for None.
            from linkproxy.discovery.profiles import Profiles

            self.profiles = Profiles()
