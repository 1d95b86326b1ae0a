"""
Discovery backends: C{dns} (the zero-config default), C{file:PATH}, C{static:...}, and plugins that provide
L{linkproxy.interfaces.IDiscoveryFactory}.
"""

BUILTIN = ("dns", "file", "static")


def spec_name(spec):
    """
    The backend name of a C{--discovery} spec: the text before the first C{:}.
    """
    return spec.split(":", 1)[0]


def find_discovery(spec):
    """
    Find the discovery backend a spec names.

    @return: the backend name for built-ins, or the plugin's L{IDiscoveryFactory}.
    @raise KeyError: with a message listing what is available.
    """
    from twisted.plugin import getPlugins
    import twisted.plugins
    from linkproxy.interfaces import IDiscoveryFactory

    name = spec_name(spec)
    if name in BUILTIN:
        return name
    plugins = {p.name: p for p in getPlugins(IDiscoveryFactory, twisted.plugins)}
    if name in plugins:
        return plugins[name]
    available = ", ".join(list(BUILTIN) + sorted(plugins))
    raise KeyError(f"unknown discovery backend {name!r}; available: {available}")
