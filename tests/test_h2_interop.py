"""
Interop tests for L{linkproxy.net.h2} over real loopback sockets: curl, Node's http2 client and grpcio talk to an
in-process proxy on 127.0.0.1, which forwards to a backend the test starts (a Twisted h2 backend, or a grpcio
server with raw-bytes handlers so no code generation is needed).
"""

import json
import shutil
from concurrent import futures

from twisted.internet import defer, reactor, threads
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from linkproxy.admin.metrics import Metrics
from linkproxy.net.connect import Connector
from linkproxy.net.context import HttpSettings
from linkproxy.net.h2 import H2Pool, H2ServerProtocol
from linkproxy.net.tracker import ConnectionTracker
from linkproxy.testing import FakeRouter
from tests.test_h2 import Backend

try:
    import grpc
except ImportError:  # pragma: no cover - grpcio is a test dependency
    grpc = None

CURL = shutil.which("curl")
NODE = shutil.which("node")
TIMEOUT = 20


class CountingBackend(Backend):
    """
    Answers every request at its end with C{got N bytes} and the request path.
    """

    def on_end(self, sid):
        s = self.streams[sid]
        body = b"got %d bytes for %s" % (len(s.data), s.headers.get(b":path", b"?"))
        self.conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"text/plain"),
                                     (b"content-length", b"%d" % len(body))])
        self.conn.send_data(sid, body, end_stream=True)


class ProxyFixture:
    """
    An in-process proxy on 127.0.0.1:0 routing every authority to C{backend}, with teardown that leaves no
    connection or listener behind.
    """

    def __init__(self, backend):
        self.tracker = ConnectionTracker()
        self.router = FakeRouter(default=backend)
        self.settings = HttpSettings(direction="outbound", router=self.router, connector=Connector(reactor, 5),
                                     metrics=Metrics(process=False), reactor=reactor, response_timeout=15.0,
                                     tracker=self.tracker)
        self.settings.h2_pool = H2Pool(self.settings)
        factory = Factory.forProtocol(lambda: H2ServerProtocol(self.settings))
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.address = f"127.0.0.1:{self.port.getHost().port}"

    @defer.inlineCallbacks
    def stop(self):
        yield self.port.stopListening()
        self.tracker.abort_all()
        self.settings.h2_pool.close()
        for _ in range(50):
            if not len(self.tracker) and not self.settings.h2_pool.connection_count():
                break
            yield deferLater(reactor, 0.02, lambda: None)


class TwistedBackendFixture:
    """
    A L{CountingBackend} listening on 127.0.0.1:0.
    """

    def __init__(self):
        self.protocols = []

        def build():
            proto = CountingBackend()
            self.protocols.append(proto)
            return proto

        self.port = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
        self.address = ("127.0.0.1", self.port.getHost().port)

    @defer.inlineCallbacks
    def stop(self):
        yield self.port.stopListening()
        for proto in self.protocols:
            if not proto.lost:
                proto.transport.abortConnection()
        for _ in range(50):
            if all(p.lost for p in self.protocols):
                break
            yield deferLater(reactor, 0.02, lambda: None)


class CommandLineClientTests(TestCase):
    """
    curl and Node's http2 client through the proxy to a Twisted h2 backend.
    """

    timeout = 60

    def setUp(self):
        self.backend = TwistedBackendFixture()
        self.proxy = ProxyFixture(self.backend.address)
        self.addCleanup(self.backend.stop)
        self.addCleanup(self.proxy.stop)

    @defer.inlineCallbacks
    def curl(self, *args):
        out, err, code = yield getProcessOutputAndValue(
            CURL, ["-sS", "--max-time", str(TIMEOUT), "--http2-prior-knowledge", *args], env={})
        self.assertEqual(code, 0, err)
        return out

    @defer.inlineCallbacks
    def test_curl_get(self):
        """
        curl --http2-prior-knowledge GET is answered by the backend through the proxy.
        """
        if CURL is None:
            raise self.skipTest("curl is not installed")
        out = yield self.curl(f"http://{self.proxy.address}/hello")
        self.assertEqual(out, b"got 0 bytes for /hello")
        self.assertEqual(self.proxy.router.leases[0].outcomes, [True])

    @defer.inlineCallbacks
    def test_curl_post(self):
        """
        A curl POST with a body larger than the 65535-byte flow-control window arrives whole.
        """
        if CURL is None:
            raise self.skipTest("curl is not installed")
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"x" * 200000)
        out = yield self.curl("--data-binary", "@" + path, f"http://{self.proxy.address}/upload")
        self.assertEqual(out, b"got 200000 bytes for /upload")

    @defer.inlineCallbacks
    def test_node_get(self):
        """
        Node's built-in http2 client gets a response through the proxy.
        """
        if NODE is None:
            raise self.skipTest("node is not installed")
        script = """
const http2 = require('http2');
const session = http2.connect(process.argv[1]);
session.on('error', (e) => { console.error(e); process.exit(2); });
const req = session.request({':path': '/from-node'});
let status = 0, body = '';
req.on('response', (h) => { status = h[':status']; });
req.setEncoding('utf8');
req.on('data', (c) => { body += c; });
req.on('end', () => { console.log(JSON.stringify({status, body})); session.close(); });
req.end();
"""
        out, err, code = yield getProcessOutputAndValue(NODE, ["-e", script, f"http://{self.proxy.address}"],
                                                        env={})
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out), {"status": 200, "body": "got 0 bytes for /from-node"})


class GrpcBackendFixture:
    """
    A grpcio server on 127.0.0.1:0 serving C{test.Echo} with raw-bytes (de)serializers.
    """

    STREAM_COUNT = 1000

    def __init__(self):
        def unary(request, context):
            return b"echo:" + request

        def server_stream(request, context):
            for i in range(self.STREAM_COUNT):
                yield b"msg-%d" % i

        def client_stream(requests, context):
            total = 0
            count = 0
            for r in requests:
                total += len(r)
                count += 1
            return b"%d messages, %d bytes" % (count, total)

        def fail(request, context):
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

        handler = grpc.method_handlers_generic_handler("test.Echo", {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
        })
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((handler,))
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.address = ("127.0.0.1", port)

    def stop(self):
        return threads.deferToThread(self.server.stop(0).wait, 5)


class GrpcTests(TestCase):
    """
    grpcio client -> proxy -> grpcio server; the grpc client runs in a thread so the reactor keeps running.
    """

    timeout = 90

    def setUp(self):
        if grpc is None:
            raise self.skipTest("grpcio is not installed")
        self.backend = GrpcBackendFixture()
        self.proxy = ProxyFixture(self.backend.address)
        self.channel = grpc.insecure_channel(self.proxy.address)
        self.addCleanup(self.backend.stop)
        self.addCleanup(self.proxy.stop)
        self.addCleanup(self.channel.close)

    def call(self, fn):
        return threads.deferToThread(fn)

    @defer.inlineCallbacks
    def test_unary(self):
        """
        A unary call goes through, and is counted with its grpc-status.
        """
        rpc = self.channel.unary_unary("/test.Echo/Unary")
        result = yield self.call(lambda: rpc(b"ping", timeout=TIMEOUT))
        self.assertEqual(result, b"echo:ping")
        self.assertEqual(self.proxy.router.leases[0].outcomes, [True])
        registry = self.proxy.settings.metrics.registry
        self.assertEqual(registry.get_sample_value("response_total", dict(
            direction="outbound", authority=self.proxy.address, target_addr="%s:%d" % self.backend.address,
            tls="no_identity", no_tls_reason="not_provided_by_service_discovery", classification="success",
            status_code="200",
            grpc_status="0")), 1)

    @defer.inlineCallbacks
    def test_server_streaming(self):
        """
        A server-streaming call delivers all 1000 messages in order.
        """
        rpc = self.channel.unary_stream("/test.Echo/ServerStream")
        result = yield self.call(lambda: list(rpc(b"go", timeout=TIMEOUT)))
        self.assertEqual(result, [b"msg-%d" % i for i in range(GrpcBackendFixture.STREAM_COUNT)])

    @defer.inlineCallbacks
    def test_client_streaming(self):
        """
        A client-streaming call whose total body exceeds the 65535-byte window arrives whole.
        """
        rpc = self.channel.stream_unary("/test.Echo/ClientStream")
        chunks = [b"y" * 10000 for _ in range(30)]
        result = yield self.call(lambda: rpc(iter(chunks), timeout=TIMEOUT))
        self.assertEqual(result, b"30 messages, 300000 bytes")

    @defer.inlineCallbacks
    def test_error_status(self):
        """
        A gRPC error from the server reaches the client with its code and message.
        """
        rpc = self.channel.unary_unary("/test.Echo/Fail")

        def call():
            try:
                rpc(b"x", timeout=TIMEOUT)
            except grpc.RpcError as e:
                return e.code(), e.details()

        code, details = yield self.call(call)
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND)
        self.assertEqual(details, "no such thing")

    @defer.inlineCallbacks
    def test_no_endpoints_is_unavailable(self):
        """
        With no endpoints, the proxy's trailers-only answer surfaces as UNAVAILABLE in the grpcio client.
        """
        self.proxy.router.default = None
        rpc = self.channel.unary_unary("/test.Echo/Unary")

        def call():
            try:
                rpc(b"x", timeout=TIMEOUT)
            except grpc.RpcError as e:
                return e.code(), e.details()

        code, details = yield self.call(call)
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)
        self.assertIn("no endpoints", details)
