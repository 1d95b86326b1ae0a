"""
Every implementation of the exchange interfaces (L{linkproxy.net.exchange}) provides them, checked with
C{verifyObject} on live objects of a real exchange: HTTP/1 both sides, HTTP/2 both sides, and the
l5d-orig-proto bridge both ways.
"""

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from linkproxy.net import orig_proto
from linkproxy.net.exchange import IHttp1Downstream, IHttp1Upstream, IStreamDownstream, IStreamEnd
from tests import test_h2, test_http1, test_orig_proto


def recording(cls, seen):
    """
    A subclass of C{cls} that appends each new instance to C{seen}.
    """

    class Recording(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self)

    Recording.__name__ = cls.__name__
    return Recording


class ExchangeInterfaceTests(SynchronousTestCase):
    """
    C{verifyObject} for each side of each codec.
    """

    def test_http1(self):
        """
        The HTTP/1 server is an L{IHttp1Downstream}; its upstream connection an L{IHttp1Upstream}.
        """
        h = test_http1._Harness()
        h.server.dataReceived(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        self.assertTrue(verifyObject(IHttp1Downstream, h.server))
        self.assertTrue(verifyObject(IHttp1Upstream, h.up()))

    def test_h2(self):
        """
        An HTTP/2 stream is an L{IStreamDownstream}; both connections it joins are L{IStreamEnd}s.
        """
        h = test_h2.Harness(mode="hold")
        h.pump()
        h.client.request()
        h.pump()
        [stream] = h.proxy._streams.values()
        self.assertTrue(verifyObject(IStreamDownstream, stream))
        self.assertTrue(verifyObject(IStreamEnd, h.proxy))
        [upstream] = h.pool._all
        self.assertTrue(verifyObject(IStreamEnd, upstream))

    def test_orig_proto(self):
        """
        The bridge: the HTTP/1 request carried as an HTTP/2 stream (an L{IHttp1Upstream} that is an
        L{IStreamDownstream}), and the downgraded stream's HTTP/1 connection to the app (an L{IStreamEnd}
        that is an L{IHttp1Downstream}).
        """
        exchanges, upstreams = [], []
        self.patch(orig_proto, "H2Exchange", recording(orig_proto.H2Exchange, exchanges))
        self.patch(orig_proto, "_H1Upstream", recording(orig_proto._H1Upstream, upstreams))
        h = test_orig_proto.Harness(self)
        client = h.client()
        h.send(client, test_orig_proto.GET)
        self.assertEqual(client.responses[0][0], 200)
        [exchange] = exchanges
        self.assertTrue(verifyObject(IHttp1Upstream, exchange))
        self.assertTrue(verifyObject(IStreamDownstream, exchange))
        [upstream] = upstreams
        self.assertTrue(verifyObject(IHttp1Downstream, upstream))
        self.assertTrue(verifyObject(IStreamEnd, upstream))
