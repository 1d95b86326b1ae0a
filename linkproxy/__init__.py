"""
linkproxy: a service-mesh sidecar proxy on Twisted.

Sniffs each connection's protocol, carries it with mutual TLS between proxies, balances HTTP per request with
P2C over peak-EWMA, and exports Linkerd-compatible golden metrics.
"""

__version__ = "0.1.0.dev0"
