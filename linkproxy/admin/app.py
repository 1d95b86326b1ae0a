"""
The admin server's HTTP application: health, metrics, config, log level and shutdown.

L{AdminApp} holds no global state; the service builds one with its collaborators and serves
C{AdminApp(...).app.resource()} on the admin listener (C{127.0.0.1:4191} by default).

Routes:

    - C{GET /live}: 200 while the process can answer at all.
    - C{GET /ready}: 200 when nothing is pending, else 503 listing what is not ready, one item a line.
    - C{GET /metrics}: Prometheus text exposition of the metrics registry.
    - C{GET /env.json}: the (already redacted) effective configuration.
    - C{GET /proxy-log-level}, C{PUT /proxy-log-level}: read or change the runtime log level.
    - C{POST /shutdown}: start a graceful drain and exit.
    - C{GET /tap}: finished requests as server-sent events (L{linkproxy.admin.tap}).
    - C{GET /dashboard} and below: the live dashboard (L{linkproxy.admin.dashboard}).

Only C{GET} (and C{HEAD}) of C{/live}, C{/ready}, C{/metrics}, C{/env.json} and C{/proxy-log-level} answer every
client, so that the admin listener can bind the pod IP for Kubernetes probes and scrapes. Every other route
(C{PUT /proxy-log-level}, C{POST /shutdown}, C{/tap}, and any route added later, such as C{/dashboard})
answers only clients on this host: loopback addresses and UNIX sockets; others get 403. The check is made in
L{AdminKlein.execute_endpoint}, for every route of the app, so a new route is private unless it is added to
L{PUBLIC}.
"""

import ipaddress
import json

from klein import Klein
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.address import UNIXAddress
from twisted.logger import Logger
from werkzeug.exceptions import MethodNotAllowed, NotFound

from linkproxy.admin.loglevel import LEVEL_NAMES

TEXT_PLAIN = b"text/plain; charset=utf-8"
APPLICATION_JSON = b"application/json"

#: C{(method, path)} pairs answered for any client; every other route answers local clients only.
PUBLIC = frozenset((method, path) for method in (b"GET", b"HEAD")
                   for path in (b"/live", b"/ready", b"/metrics", b"/env.json", b"/proxy-log-level"))

# Refusals are logged at most this often per route, so a scanner on the pod network cannot fill the log.
_REFUSAL_LOG_INTERVAL = 60.0

# A level name is a few bytes; anything longer is not one, and we would rather not echo it back.
_MAX_LEVEL_BODY = 64


def is_loopback(host):
    """
    Say whether a client address is the loopback interface.

    @param host: an IP address as text: IPv4, IPv6 (with or without a C{%zone}), or IPv4-mapped IPv6.
    @type host: L{str}
    @return: C{True} for C{127.0.0.0/8}, C{::1} and C{::ffff:127.0.0.0/104}; C{False} for anything else,
        including text that is not an IP address.
    @rtype: L{bool}
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d; judge the IPv4 address inside.
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return address.is_loopback


def is_local_client(address):
    """
    Say whether a request came from this host, which is what privileged admin routes require.

    @param address: what C{request.getClientAddress()} returned.
    @return: C{True} for a loopback IP client or a UNIX-socket client, C{False} otherwise.
    @rtype: L{bool}
    """
    # Only a process on this host can reach a UNIX socket; its file permissions are the access control.
    if isinstance(address, UNIXAddress):
        return True
    host = getattr(address, "host", None)
    return isinstance(host, str) and is_loopback(host)


def _text(request, code, body):
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", TEXT_PLAIN)
    return body.encode("utf-8")


class AdminKlein(Klein):
    """
    A L{Klein} whose routes answer only local clients (L{is_local_client}), except the pairs in L{PUBLIC}.

    The check sits where Klein calls a matched route, so it covers every route of the app, including ones
    added after this was written; unknown paths and wrong methods still get their 404 and 405. A refusal is
    reported to the bound instance's C{_refused(endpoint, request)}, when it has one (L{AdminApp} logs it).
    """

    def execute_endpoint(self, endpoint, request, *args, **kwargs):
        if (request.method, request.path) not in PUBLIC and not is_local_client(request.getClientAddress()):
            refused = getattr(self._instance, "_refused", None)
            if refused is not None:
                refused(endpoint, request)
            return _text(request, 403, "{} is only answered for clients on this host (localhost)\n".format(
                request.path.decode("ascii", "replace")))
        return super().execute_endpoint(endpoint, request, *args, **kwargs)


class AdminApp:
    """
    The admin Klein application, with its collaborators injected.

    @cvar app: the routes; C{AdminApp(...).app.resource()} is the resource to serve.
    """

    app = AdminKlein()
    log = Logger(namespace="linkproxy.admin")

    def __init__(self, *, metrics, readiness, config_dump, log_level, shutdown, reactor, tap=None,
                 dashboard=None):
        """
        @param metrics: the L{linkproxy.admin.metrics.Metrics} whose C{registry} C{/metrics} renders.
        @param readiness: zero-argument callable returning a L{list} of L{str}, each naming something not
            ready yet; an empty list means ready.
        @param config_dump: zero-argument callable returning a JSON-serialisable L{dict}, already redacted.
        @param log_level: the L{linkproxy.admin.loglevel.LogLevelControl} to read and change.
        @param shutdown: zero-argument callable that starts a graceful drain and exit; called at most once,
            after the C{/shutdown} response has been finished.
        @param reactor: an L{IReactorTime} used to call C{shutdown} outside the request.
        @param tap: the process's L{linkproxy.layers.tap.TapLayer}, or C{None} (then C{/tap} is 404).
        @param dashboard: the L{linkproxy.admin.dashboard.Dashboard} served under C{/dashboard}; when C{None},
            one that shows C{metrics} only (no balancers, no identity).
        """
        self._metrics = metrics
        self._readiness = readiness
        self._config_dump = config_dump
        self._log_level = log_level
        self._shutdown = shutdown
        self._reactor = reactor
        self._shutdown_requested = False
        self._tap = tap
        if dashboard is None:
            from linkproxy.admin.dashboard import Dashboard
            dashboard = Dashboard(metrics, reactor=reactor)
        self._dashboard = dashboard
        self._refusals_logged = {}

    def _refused(self, endpoint, request):
        """
        Log a refused non-local request, once per route per L{_REFUSAL_LOG_INTERVAL}.
        """
        now = self._reactor.seconds()
        last = self._refusals_logged.get(endpoint)
        if last is not None and now - last < _REFUSAL_LOG_INTERVAL:
            return
        self._refusals_logged[endpoint] = now
        client = request.getClientAddress()
        self.log.warn("refused {method} {path} from non-local client {client}",
                      method=request.method.decode("ascii", "replace"), path=request.path.decode("ascii", "replace"),
                      client=getattr(client, "host", None) or repr(client))

    @app.route("/live", methods=["GET"])
    def live(self, request):
        """Liveness: the reactor is turning and the admin server answers."""
        return _text(request, 200, "live\n")

    @app.route("/ready", methods=["GET"])
    def ready(self, request):
        """Readiness: 200 when nothing is pending, else 503 and one reason a line."""
        try:
            pending = list(self._readiness())
        except Exception:
            # A broken check must read as "not ready", never as ready and never as a traceback.
            self.log.failure("readiness check raised")
            pending = ["readiness check failed"]
        if not pending:
            return _text(request, 200, "ready\n")
        return _text(request, 503, "".join(reason + "\n" for reason in pending))

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request):
        """Prometheus text exposition of every metric family."""
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._metrics.registry)

    @app.route("/env.json", methods=["GET"])
    def env_json(self, request):
        """The effective configuration as JSON."""
        request.setHeader(b"Content-Type", APPLICATION_JSON)
        return (json.dumps(self._config_dump(), indent=2, sort_keys=True) + "\n").encode("utf-8")

    @app.route("/proxy-log-level", methods=["GET"])
    def get_log_level(self, request):
        """The current log level name."""
        return _text(request, 200, self._log_level.name + "\n")

    @app.route("/proxy-log-level", methods=["PUT"])
    def put_log_level(self, request):
        """Set the log level from the request body: 204, or 400 naming the valid levels."""
        raw = request.content.read(_MAX_LEVEL_BODY + 1)
        if len(raw) > _MAX_LEVEL_BODY:
            return _text(request, 400, "log level name too long; valid levels are: {}\n".format(
                ", ".join(LEVEL_NAMES)))
        try:
            self._log_level.set(raw.decode("utf-8", "replace"))
        except ValueError as e:
            return _text(request, 400, "{}\n".format(e))
        self.log.info("log level set to {new_level}", new_level=self._log_level.name)
        request.setResponseCode(204)
        return b""

    @app.route("/shutdown", methods=["POST"])
    def shutdown(self, request):
        """Start a graceful shutdown (local clients only, as every non-public route)."""
        if not self._shutdown_requested:
            self._shutdown_requested = True
            self.log.info("shutdown requested via admin server")
            # Wait until the response is finished (or the client has gone), then leave the request's call
            # stack before draining, so the caller always gets its 202 rather than a reset connection.
            request.notifyFinish().addBoth(lambda _: self._reactor.callLater(0, self._shutdown))
        return _text(request, 202, "shutdown\n")

    @app.route("/tap", methods=["GET"])
    def tap(self, request):
        """Finished requests as server-sent events, for local clients only (see L{linkproxy.admin.tap})."""
        from linkproxy.admin.tap import TapFilterError, TapStream, parse_filters

        # Local clients only: the app-wide rule (routes are private unless listed as public) applies.
        if self._tap is None:
            return _text(request, 404, "not found\n")
        try:
            filters, limit = parse_filters(request.args)
        except TapFilterError as e:
            return _text(request, 400, f"{e}\n")
        stream = TapStream(request, self._tap, self._reactor, filters, limit)
        if not stream.start():
            return _text(request, 429, "too many tap subscribers; try again later\n")
        # Klein finishes the response when this fires (at the limit) and cancels it if the client goes away.
        return stream.finished

    @app.route("/dashboard", branch=True, methods=["GET"])
    def dashboard(self, request):
        """The live dashboard: the page, its assets and C{/dashboard/state.json}."""
        return self._dashboard.resource()

    @app.handle_errors(NotFound)
    def not_found(self, request, failure):
        """Plain-text 404 for paths with no route."""
        return _text(request, 404, "not found\n")

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request, failure):
        """Plain-text 405, with the C{Allow} header a client needs to correct itself."""
        allowed = failure.value.valid_methods or []
        request.setHeader(b"Allow", ", ".join(sorted(allowed)).encode("ascii"))
        return _text(request, 405, "method not allowed\n")
