"""
A backend process for the request-stack integration tests, so a test can SIGKILL it by PID.

    python -m tests.stack_backend http NAME   # HTTP/1.1 keep-alive server
    python -m tests.stack_backend grpc NAME   # grpcio server, generic handler, service test.Stack

It prints its port on the first line of standard output, then serves until killed.

HTTP behaviour, by path:
  - C{/fail}: 503 always;
  - C{/flaky?p=0.1}: 503 with probability C{p} (a seeded generator, so runs repeat);
  - C{/slow?ms=N}: answers after N ms;
  - anything else: 200.
Every answer's body is C{NAME}, and carries C{x-seen-target} (the request-target as received) and
C{x-seen-host}. C{GET /__stats} on the backend itself reports C{{"requests": N}} without counting.

gRPC: C{/test.Stack/Unary} echoes the request bytes prefixed with C{NAME:}; a request of C{b"unavailable"}
is answered UNAVAILABLE, C{b"slow"} after 2 s.
"""

import json
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


def serve_http(name):
    rng = random.Random(1234)
    lock = threading.Lock()
    stats = {"requests": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _answer(self):
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            url = urlsplit(self.path)
            if url.path == "/__stats":
                body = json.dumps(stats).encode()
                status = 200
            else:
                with lock:
                    stats["requests"] += 1
                    roll = rng.random()
                query = parse_qs(url.query)
                status = 200
                if url.path.endswith("/fail"):
                    status = 503
                elif url.path.endswith("/flaky"):
                    status = 503 if roll < float(query.get("p", ["0.1"])[0]) else 200
                elif url.path.endswith("/slow"):
                    time.sleep(int(query.get("ms", ["1000"])[0]) / 1000.0)
                body = name.encode()
            self.send_response(status)
            self.send_header("content-length", str(len(body)))
            self.send_header("x-seen-target", self.path)
            self.send_header("x-seen-host", self.headers.get("host", ""))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


def serve_grpc(name):
    from concurrent import futures

    import grpc

    def unary(request, context):
        if request == b"unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "asked to be unavailable")
        if request == b"slow":
            time.sleep(2)
        return name.encode() + b":" + request

    handler = grpc.method_handlers_generic_handler("test.Stack", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    kind, name = sys.argv[1], sys.argv[2]
    (serve_http if kind == "http" else serve_grpc)(name)
