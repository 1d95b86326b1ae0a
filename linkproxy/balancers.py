"""
Balancer factories by name: the four built-ins, and any L{IBalancerFactory} plugin installed into a
C{twisted/plugins/} directory (see C{docs/plugins.md}).
"""

from random import Random
from typing import Callable, Dict, Iterator, List

from twisted.plugin import IPlugin, getPlugins
from zope.interface import implementer

from linkproxy.core.balancer import (
    LeastRequestBalancer,
    P2CEwmaBalancer,
    RandomBalancer,
    RoundRobinBalancer,
)
from linkproxy.interfaces import IBalancer, IBalancerFactory

__all__ = [
    "BalancerFactory",
    "UnknownBalancer",
    "p2c_ewma",
    "round_robin",
    "least_request",
    "weighted_random",
    "BUILTIN_BALANCERS",
    "find_balancer",
    "available_balancers",
]


@implementer(IPlugin, IBalancerFactory)
class BalancerFactory:
    """
    An L{IBalancerFactory} that calls C{constructor(random)}.

    @ivar name: the name used with C{--balancer NAME}.
    """

    def __init__(self, name: str, constructor: Callable[[Random], IBalancer]):
        self.name = name
        self._constructor = constructor

    def __repr__(self) -> str:
        return f"<BalancerFactory {self.name!r}>"

    def build(self, random: Random) -> IBalancer:
        """
        @param random: a L{Random} the balancer owns (seeded in tests).
        @return: a fresh balancer for one target.
        """
        return self._constructor(random)


class UnknownBalancer(KeyError):
    """
    No built-in or plugin balancer has the requested name.
    """

    def __str__(self) -> str:
        # KeyError's own str() is the repr of its argument, which would quote the whole message.
        return str(self.args[0]) if self.args else ""


p2c_ewma = BalancerFactory("p2c-ewma", P2CEwmaBalancer)
round_robin = BalancerFactory("round-robin", RoundRobinBalancer)
least_request = BalancerFactory("least-request", LeastRequestBalancer)
weighted_random = BalancerFactory("random", RandomBalancer)

#: The built-in factories by name; these win over plugins of the same name.
BUILTIN_BALANCERS: Dict[str, IBalancerFactory] = {
    factory.name: factory for factory in (p2c_ewma, round_robin, least_request, weighted_random)
}


def _plugins() -> Iterator[IBalancerFactory]:
    # Imported here: loading the plugin package scans every plugin directory, which only a lookup of a
    # non-built-in name (or a listing) should pay for.
    from twisted import plugins

    return getPlugins(IBalancerFactory, plugins)


def find_balancer(name: str) -> IBalancerFactory:
    """
    The balancer factory called C{name}: a built-in, or else the first installed plugin with that name.

    @raise UnknownBalancer: (a L{KeyError}) when there is none; the message lists the available names.
    """
    factory = BUILTIN_BALANCERS.get(name)
    if factory is not None:
        return factory
    found: List[str] = []
    for plugin in _plugins():
        plugin_name = getattr(plugin, "name", None)
        if plugin_name == name:
            return plugin
        if isinstance(plugin_name, str):
            found.append(plugin_name)
    names = ", ".join(_names(found))
    raise UnknownBalancer(f"unknown balancer {name!r}; available: {names}")


def available_balancers() -> List[str]:
    """
    The names C{--balancer} accepts: the built-ins first, then plugins in alphabetical order.
    """
    return _names(
        plugin_name
        for plugin_name in (getattr(plugin, "name", None) for plugin in _plugins())
        if isinstance(plugin_name, str)
    )


def _names(plugin_names) -> List[str]:
    extra = sorted(set(plugin_names) - set(BUILTIN_BALANCERS))
    return list(BUILTIN_BALANCERS) + extra
