"""
C{static:} discovery: fixed endpoint sets from the configuration (C{static:NAME=ADDR,...} on the command line,
or C{static_endpoints} in YAML). A target with no entries has no endpoints.
"""

from typing import Dict, Iterable, List, Tuple

from zope.interface import implementer

from linkproxy.core.endpoint import Address, Endpoint, parse_host_port
from linkproxy.discovery import normalize_target
from linkproxy.interfaces import IDiscovery, IResolution

__all__ = ["StaticDiscovery", "parse_static_spec"]


@implementer(IResolution)
class _Done:
    """
    The resolution of a set that never changes: nothing to cancel.
    """

    def cancel(self):
        pass


_DONE = _Done()


def parse_static_spec(text) -> Tuple[Tuple[str, Address], ...]:
    """
    Parse the body of a C{static:} spec, C{NAME=ADDR,NAME=ADDR,...} with both as C{host:port}.

    L{linkproxy.config} already does this for the configuration; this is for callers without a Config.

    @raise ValueError: naming every bad entry.
    """
    entries: List[Tuple[str, Address]] = []
    bad = []
    for item in text.split(","):
        name, sep, addr = item.partition("=")
        try:
            if not sep:
                raise ValueError("expected NAME=ADDR")
            entries.append((normalize_target(name), parse_host_port(addr)))
        except ValueError as e:
            bad.append(f"static entry {item.strip()!r}: {e}")
    if bad:
        raise ValueError("; ".join(bad))
    return tuple(entries)


@implementer(IDiscovery)
class StaticDiscovery:
    """
    Fixed endpoint sets by logical target; every resolution is answered at once and never changes.

    @ivar backend: the C{backend} metric label.
    """

    backend = "static"

    def __init__(self, entries: Iterable[Tuple[str, object]]):
        """
        @param entries: C{(target "host:port", address)} pairs, where the address is C{(host, port)} or an
            L{Endpoint}; a target named several times has several endpoints.
        @raise ValueError: when a target is not C{host:port}.
        """
        sets: Dict[str, List[Endpoint]] = {}
        for name, address in entries:
            endpoint = address if isinstance(address, Endpoint) else Endpoint(address=tuple(address))
            sets.setdefault(normalize_target(name), []).append(endpoint)
        self._sets = {name: tuple(endpoints) for name, endpoints in sets.items()}

    @property
    def targets(self):
        """
        The configured targets, canonical (lower-case host), sorted.
        """
        return sorted(self._sets)

    def resolve(self, target, receiver):
        """
        Deliver C{target}'s fixed set (empty when it is not configured) synchronously.
        """
        try:
            key = normalize_target(target)
        except ValueError:
            key = None
        receiver.reset(self._sets.get(key, ()))
        return _DONE
