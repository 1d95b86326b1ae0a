"""
Discovery backends: C{dns} (the zero-config default), C{file:PATH}, C{static:...}, and plugins that provide
L{linkproxy.interfaces.IDiscoveryFactory}.

L{build_discovery} turns a C{--discovery} spec into an L{linkproxy.interfaces.IDiscovery}; backends are
imported only when the spec names them, so a proxy pays only for the backend it uses.
"""

import ipaddress
from typing import Tuple

from twisted.logger import Logger

BUILTIN = ("dns", "file", "static")

__all__ = [
    "BUILTIN",
    "spec_name",
    "find_discovery",
    "build_discovery",
    "normalize_target",
    "split_target",
    "is_ip_literal",
    "backend_name",
    "discovery_profiles",
]


def spec_name(spec):
    """
    The backend name of a C{--discovery} spec: the text before the first C{:}.
    """
    return spec.split(":", 1)[0]


def _plugins():
    # Imported here: loading the plugin package scans every plugin directory, which only a plugin spec (or a
    # listing for an error message) should pay for.
    from twisted.plugin import getPlugins
    import twisted.plugins
    from linkproxy.interfaces import IDiscoveryFactory

    return getPlugins(IDiscoveryFactory, twisted.plugins)


def find_discovery(spec):
    """
    Find the discovery backend a spec names.

    @return: the backend name for built-ins, or the plugin's L{IDiscoveryFactory}.
    @raise KeyError: with a message listing what is available.
    """
    name = spec_name(spec)
    if name in BUILTIN:
        return name
    plugins = {}
    for plugin in _plugins():
        plugin_name = getattr(plugin, "name", None)
        if isinstance(plugin_name, str):
            plugins.setdefault(plugin_name, plugin)
    if name in plugins:
        return plugins[name]
    available = ", ".join(list(BUILTIN) + sorted(set(plugins) - set(BUILTIN)))
    raise KeyError(f"unknown discovery backend {name!r}; available: {available}")


def build_discovery(spec, config, reactor, *, metrics=None, log=None):
    """
    Build the discovery backend a C{--discovery} spec names.

      - C{dns}, or C{dns:HOST:PORT} to query that server instead of the system resolv.conf;
      - C{file:PATH}, the watched endpoints file;
      - C{static:...}, the pairs in C{config.static_endpoints} (or, without a config, parsed from the spec);
      - any other name: the L{IDiscoveryFactory} plugin of that name, built with the text after C{NAME:}.

    @param config: a L{linkproxy.config.Config}, or C{None} (then only the spec is used).
    @param reactor: provides C{IReactorTime} (and C{IReactorUDP} for C{dns}).
    @param metrics: a L{linkproxy.admin.metrics.Metrics} to count errors on, or C{None}.
    @param log: a L{Logger} for the backend, or C{None} for the backend's own.
    @return: an L{linkproxy.interfaces.IDiscovery}.
    @raise KeyError: no backend has that name (the message lists the available ones).
    @raise ValueError: the argument is unusable (the message says why).
    """
    name = spec_name(spec)
    argument = spec[len(name) + 1:] if ":" in spec else ""
    if name == "static":
        from linkproxy.discovery.static import StaticDiscovery, parse_static_spec

        entries = getattr(config, "static_endpoints", ()) if config is not None else ()
        if not entries and argument:
            entries = parse_static_spec(argument)
        return StaticDiscovery(entries)
    if name == "file":
        from linkproxy.discovery.file import FileDiscovery

        if not argument.strip():
            raise ValueError("file discovery needs a path: file:PATH")
        return FileDiscovery(argument, reactor, metrics=metrics, log=log)
    if name == "dns":
        from linkproxy.discovery.dns import DnsDiscovery
        from linkproxy.core.endpoint import parse_host_port

        server = None
        if argument.strip():
            try:
                server = parse_host_port(argument, default_port=53)
            except ValueError as e:
                raise ValueError(f"dns discovery server: {e}") from None
            if not is_ip_literal(server[0]):
                raise ValueError(f"dns discovery server must be an IP address, got {server[0]!r}")
        return DnsDiscovery(reactor, server=server, metrics=metrics, log=log)
    factory = find_discovery(spec)
    return factory.build(argument, reactor, log if log is not None else Logger(namespace=f"linkproxy.discovery.{name}"))


def is_ip_literal(host):
    """
    C{True} when C{host} is an IPv4 or IPv6 address rather than a name.
    """
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def split_target(target) -> Tuple[str, int]:
    """
    Split a logical target C{"host:port"} into a lower-case host (no trailing dot, IPv6 without brackets) and a
    port.

    Port C{0} is accepted for SRV names (C{"_http._tcp.web.ns.svc.cluster.local:0"}), where the port comes
    from the records.

    @raise ValueError: with a message fit for an operator.
    """
    from linkproxy.core.endpoint import parse_host_port

    text = target.strip()
    if text.endswith(":0") and not text.endswith("]:0") and text[:-2] and ":" not in text[:-2]:
        host, port = text[:-2], 0
    else:
        host, port = parse_host_port(text)
    host = host.lower().rstrip(".")
    if not host or any(c in host for c in " /\\?#@"):
        raise ValueError(f"invalid host in target {target!r}")
    return host, port


def normalize_target(target) -> str:
    """
    The canonical form discovery keys on: C{"host:port"} with a lower-case host and brackets around IPv6.

    @raise ValueError: when C{target} is not C{host:port}.
    """
    host, port = split_target(target)
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def backend_name(discovery) -> str:
    """
    The C{backend} metric label for a discovery object: its C{backend} attribute, else its class name.
    """
    name = getattr(discovery, "backend", None)
    if isinstance(name, str) and name:
        return name
    return type(discovery).__name__.lower()


def discovery_profiles(discovery):
    """
    The live L{linkproxy.discovery.profiles.Profiles} a discovery backend keeps (its C{profiles} attribute:
    C{file:} reads them from the endpoints file), or a new empty one for a backend that has none.
    """
    from linkproxy.discovery.profiles import Profiles

    profiles = getattr(discovery, "profiles", None)
    if isinstance(profiles, Profiles):
        return profiles
    return Profiles()
