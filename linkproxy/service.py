"""
The process as a Twisted service: listeners, readiness, and the graceful drain that SIGTERM and
C{POST /shutdown} share.
"""

import gc

from twisted.application.service import MultiService, Service
from twisted.internet.defer import DeferredList, inlineCallbacks, maybeDeferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger

log = Logger(namespace="linkproxy.service")


class AcceptFactory(Factory):
    """
    A server factory that hands each accepted connection to an assembly function.
    """

    noisy = False

    def __init__(self, accept):
        """
        @param accept: called with the peer address; returns the protocol for the new connection.
        """
        self._accept = accept

    def buildProtocol(self, addr):
        return self._accept(addr)


class Listener(Service):
    """
    One listening socket; knows whether it is bound, and stops accepting on L{stopService}.

    @ivar port: the L{twisted.internet.interfaces.IListeningPort} once bound.
    @ivar error: the failure to bind, if any.
    """

    port = None
    error = None

    def __init__(self, name, endpoint, factory, description, on_error=None):
        """
        @param name: what readiness reports, e.g. C{"inbound"}.
        @param endpoint: an C{IStreamServerEndpoint}.
        @param description: the endpoint description text, for messages.
        @param on_error: called with the failure when binding fails.
        """
        self.setName(name)
        self._endpoint = endpoint
        self._factory = factory
        self.description = description
        self._on_error = on_error
        self._listening = None

    def startService(self):
        Service.startService(self)
        self._listening = self._endpoint.listen(self._factory)
        self._listening.addCallbacks(self._bound, self._failed)

    def _bound(self, port):
        self._listening = None
        self.port = port
        host = port.getHost()
        log.info("{name} listening on {address}", name=self.name, address=f"{getattr(host, 'host', host)}:"
                 f"{getattr(host, 'port', '')}")

    def _failed(self, failure):
        self._listening = None
        self.error = failure
        log.critical("cannot listen for {name} on {description}: {error}", name=self.name,
                     description=self.description, error=failure.getErrorMessage())
        if self._on_error is not None:
            self._on_error(failure)

    @property
    def bound(self):
        """C{True} once the socket is listening."""
        return self.port is not None

    def stopService(self):
        Service.stopService(self)
        if self._listening is not None:
            self._listening.cancel()
        if self.port is not None:
            port, self.port = self.port, None
            return maybeDeferred(port.stopListening)
        return None


def freeze_startup_heap():
    """
    Collect the start-up garbage, then move every object still alive into the collector's permanent
    generation (C{gc.freeze}).

    The modules, configuration and plugins loaded at start-up are some fifty thousand objects that live as
    long as the process. CPython's full collections walk all of them, and under load those walks were the
    proxy's longest pauses: with them frozen, the HTTP/2 bench's p99 at load fell from about 31 ms to about
    12 ms, at the same throughput (see C{docs/benchmarks.md}). Objects made later are collected as usual.
    """
    gc.collect()
    gc.freeze()
    log.debug("froze {count} start-up objects out of garbage collection", count=gc.get_freeze_count())


class ProxyService(MultiService):
    """
    The whole proxy: data listeners, the admin listener, and helpers (discovery, identity) as child services.

    Stopping it drains: data listeners stop accepting, open connections are asked to finish, and whatever is
    still open after the grace period is aborted; the admin listener goes last, so C{/ready} reports the drain.
    """

    def __init__(self, *, reactor, tracker, grace_period, freeze_heap=None):
        """
        @param freeze_heap: called once, just after start-up (default L{freeze_startup_heap}).
        """
        MultiService.__init__(self)
        self._reactor = reactor
        self._tracker = tracker
        self._grace = grace_period
        self._freeze_heap = freeze_startup_heap if freeze_heap is None else freeze_heap
        self._listeners = []
        self._admin = None
        self._readiness_checks = []
        self.draining = False
        self.failed = False

    def startService(self):
        MultiService.startService(self)
        # Once the listeners are up and the start-up garbage can be collected.
        self._reactor.callLater(0, self._freeze_heap)

    def add_listener(self, listener, admin=False):
        """
        Add a L{Listener}; data listeners stop first on drain, the admin listener last.
        """
        if admin:
            self._admin = listener
        else:
            self._listeners.append(listener)
        listener.setServiceParent(self)

    def add_readiness_check(self, check):
        """
        @param check: zero-argument callable returning a reason text while something is not ready, else C{None}.
        """
        self._readiness_checks.append(check)

    def readiness(self):
        """
        @return: what is not ready, one text per problem; empty when ready.
        """
        problems = []
        if self.draining:
            problems.append("draining")
        for listener in self._listeners + ([self._admin] if self._admin else []):
            if not listener.bound:
                problems.append(f"listener {listener.name} not bound ({listener.description})")
        for check in self._readiness_checks:
            reason = check()
            if reason:
                problems.append(reason)
        return problems

    def listen_failed(self, failure):
        """
        A listener could not bind: the proxy cannot do its job, so the process exits non-zero.
        """
        self.failed = True
        if self._reactor.running:
            self._reactor.stop()

    def shutdown(self):
        """
        Start a graceful drain and stop the process (C{POST /shutdown}); SIGTERM takes the same path.
        """
        log.info("shutting down")
        self._reactor.stop()

    @inlineCallbacks
    def stopService(self):
        self.draining = True
        self.running = 0
        yield DeferredList([maybeDeferred(listener.stopService) for listener in self._listeners])
        log.info("draining {count} open connections (grace period {grace} s)", count=len(self._tracker),
                 grace=self._grace)
        self._tracker.drain()
        started = self._reactor.seconds()
        aborted = 0
        if len(self._tracker):
            waiting = self._tracker.wait_empty()
            timer = self._reactor.callLater(self._grace, waiting.cancel)
            try:
                yield waiting
            except Exception:
                aborted = len(self._tracker)
                log.warn("grace period over; aborting {count} connections", count=aborted)
                self._tracker.abort_all()
            if timer.active():
                timer.cancel()
        log.info("drain finished after {seconds:.1f} s ({aborted} connections aborted)",
                 seconds=round(self._reactor.seconds() - started, 3), aborted=aborted)
        others = [s for s in self if s not in self._listeners and s is not self._admin]
        yield DeferredList([maybeDeferred(s.stopService) for s in reversed(others)])
        if self._admin is not None:
            yield maybeDeferred(self._admin.stopService)


def make_proxy_service(config, reactor, log_level=None):
    """
    Wire one proxy process from its configuration: metrics, listeners, routers, admin server.

    Nothing is bound until the service starts.

    @param config: a L{linkproxy.config.Config}.
    @param log_level: the L{linkproxy.admin.loglevel.LogLevelControl} the process's log output follows, which
        C{PUT /proxy-log-level} changes; a new one (filtering nothing yet) when C{None}.
    @return: a L{ProxyService}.
    """
    from twisted.internet.endpoints import serverFromString
    from twisted.web.server import Site

    from linkproxy.admin.app import AdminApp
    from linkproxy.admin.dashboard import Dashboard
    from linkproxy.admin.loglevel import LogLevelControl
    from linkproxy.admin.metrics import Metrics
    from linkproxy.balancers import find_balancer
    from linkproxy.discovery import build_discovery, discovery_profiles
    from linkproxy.inbound import build_inbound
    from linkproxy.net.connect import Connector
    from linkproxy.net.tracker import ConnectionTracker
    from linkproxy.outbound import build_outbound, build_tcp_route
    from linkproxy.routing import BalancedRouter, RouterService
    from linkproxy.runtime import Runtime

    tracker = ConnectionTracker()
    metrics = Metrics()
    service = ProxyService(reactor=reactor, tracker=tracker, grace_period=config.shutdown_grace_period)
    identity, meshed = None, None
    if config.identity_dir is not None:
        identity, meshed = _start_identity(config, reactor, metrics, service)
    # Discovery is built here rather than inside the router, so its profiles reach the runtime too.
    discovery = build_discovery(config.discovery, config, reactor, metrics=metrics)
    profiles = discovery_profiles(discovery)
    if profiles is getattr(discovery, "profiles", None) and callable(getattr(discovery, "start", None)):
        _DiscoveryService(discovery).setServiceParent(service)
    runtime = Runtime(reactor=reactor, config=config, metrics=metrics, tracker=tracker,
                      connector=Connector(reactor, config.connect_timeout, meshed=meshed),
                      log_level=log_level or LogLevelControl(config.log_level), identity=identity,
                      profiles=profiles)
    if config.access_log != "off":
        _AccessLogService(config, runtime).setServiceParent(service)
    outbound_router = BalancedRouter(discovery, find_balancer(config.balancer), reactor, metrics,
                                     direction="outbound", first_update_timeout=config.connect_timeout)
    RouterService(outbound_router).setServiceParent(service)

    def listener(name, description, accept):
        return Listener(name, serverFromString(reactor, description), AcceptFactory(accept), description,
                        on_error=service.listen_failed)

    service.add_listener(listener("outbound", config.outbound, build_outbound(runtime, outbound_router)))
    for listen, target in config.tcp_routes:
        service.add_listener(listener(f"tcp-route {listen}", listen,
                                      build_tcp_route(runtime, outbound_router, target)))
    service.add_listener(listener("inbound", config.inbound, build_inbound(runtime)))

    admin = AdminApp(metrics=runtime.metrics, readiness=service.readiness, config_dump=config.redacted,
                     log_level=runtime.log_level, shutdown=service.shutdown, reactor=reactor, tap=runtime.tap,
                     dashboard=Dashboard(metrics, routers=[outbound_router], identity=identity, reactor=reactor))
    site = Site(admin.app.resource())
    site.noisy = False
    # Scrapes every few seconds would otherwise fill the log with access lines.
    site.log = lambda request: None
    service.add_listener(Listener("admin", serverFromString(reactor, config.admin), site, config.admin,
                                  on_error=service.listen_failed), admin=True)
    service.runtime = runtime
    return service


class _AccessLogService(Service):
    """
    Watches the tap with the access log (C{--access-log}) while the proxy runs; at stop, writes what is
    queued and closes the file.
    """

    def __init__(self, config, runtime):
        self._config = config
        self._tap = runtime.tap
        self._metrics = runtime.metrics
        self._log = None
        self.setName("access-log")

    def startService(self):
        from linkproxy.accesslog import open_access_log

        Service.startService(self)
        self._log = open_access_log(self._config.access_log, self._config.access_log_file, metrics=self._metrics)
        self._tap.watch(self._log)

    def stopService(self):
        Service.stopService(self)
        if self._log is not None:
            self._tap.unwatch(self._log)
            self._log.close()
            self._log = None


class _DiscoveryService(Service):
    """
    Keeps a discovery backend that holds profiles (C{file:}) reading its source from start to stop, watched
    targets or not: the first request must already see the profiles, and edits must apply without traffic.
    """

    def __init__(self, discovery):
        self._discovery = discovery
        self.setName("discovery")

    def startService(self):
        Service.startService(self)
        self._discovery.start()

    def stopService(self):
        Service.stopService(self)
        self._discovery.stop()


class _IdentityService(Service):
    """
    Stops the identity store's timers with the process.
    """

    def __init__(self, store):
        self._store = store

    def stopService(self):
        Service.stopService(self)
        self._store.stop()


def _start_identity(config, reactor, metrics, service):
    """
    Load (or self-issue) this proxy's identity before anything binds, so a broken identity directory is a
    startup error rather than a proxy that refuses every meshed connection. With an identity service, only
    the anchors and the token are checked here; C{/ready} waits for the first certificate.

    @raise linkproxy.identity.ca.IdentityError: with a one-line reason.
    @return: C{(store, meshed connect function)}.
    """
    from linkproxy.identity.store import IdentityStore
    from linkproxy.net.mesh import MeshConnector
    certify = None
    if config.identity_service is not None:
        from linkproxy.identity.client import ServiceCertifier
        from linkproxy.core.endpoint import parse_host_port
        certify = ServiceCertifier(parse_host_port(config.identity_service), config.identity_service_name,
                                   config.identity_token_file, reactor=reactor)
    store = IdentityStore(config.identity_dir, config.identity_name, reactor=reactor, metrics=metrics,
                          certify=certify)
    store.start()
    _IdentityService(store).setServiceParent(service)
    service.add_readiness_check(store.not_ready_reason)
    return store, MeshConnector(store, reactor, config.connect_timeout, metrics=metrics).connect
