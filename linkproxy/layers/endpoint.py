"""
The endpoint layer: the one place that owns a direction's connection pools and the connector they dial with.

Pools key their connections by L{linkproxy.core.endpoint.Endpoint.pool_key} (address, identity, proxy) and
hold one protocol each (HTTP/1 or HTTP/2), so a connection is never shared across any of those.
"""


class EndpointLayer:
    """
    The HTTP/1 pool (or, with C{--h2-upgrade}, the pool that carries HTTP/1 to meshed endpoints as HTTP/2) and
    the HTTP/2 pool, built once per direction; the HTTP/2 pool (and the h2 library) only when first needed.
    """

    def __init__(self, settings, h2_upgrade=False):
        from linkproxy.net.http1 import Http1Pool

        self._settings = settings
        self._h2 = None
        h1 = Http1Pool(settings)
        if h2_upgrade:
            from linkproxy.net.orig_proto import UpgradingPool
            h1 = UpgradingPool(h1, settings)
        self.h1 = h1

    @property
    def h2(self):
        """
        The HTTP/2 pool, created with the first HTTP/2 request: a sidecar that never sees one keeps ~1.5 MiB.
        """
        pool = self._h2
        if pool is None:
            from linkproxy.net.h2 import H2Pool
            pool = self._h2 = H2Pool(self._settings)
        return pool

    @h2.setter
    def h2(self, pool):
        self._h2 = pool

    def close(self):
        """
        Close every pooled connection (shutdown).
        """
        self.h1.close()
        if self._h2 is not None:
            self._h2.close()
