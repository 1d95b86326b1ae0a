"""
C{dns} discovery on L{twisted.names}.

  - C{"host:port"}: A and AAAA records of C{host}, each an endpoint on C{port}.
  - C{"_service._proto.name:port"} (a host starting with C{_}): SRV records of the lowest priority, then the
    A and AAAA records of each SRV target (from the additional section when the server sent them), each an
    endpoint on the record's port; the port in the target is ignored (conventionally C{0}).
  - IP-literal hosts resolve to themselves at once, without DNS.

Each target is re-resolved when its records expire: the smallest TTL, clamped to C{[min_ttl, max_ttl]}.
NXDOMAIN (and a name with no records of the asked types) means no endpoints. Any other failure (timeout,
SERVFAIL, refused) keeps the last set and retries with jittered exponential backoff, counting the failure in
C{discovery_errors_total{backend="dns"}}.

By default the system resolver configuration is used (C{/etc/resolv.conf} and C{/etc/hosts}, through
L{twisted.names.client.createResolver}); C{--discovery dns:HOST:PORT} queries that server instead, and tests
inject a resolver.
"""

import socket
from random import Random
from typing import List, Optional, Sequence

from twisted.internet.defer import CancelledError, DeferredList, inlineCallbacks
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import AuthoritativeDomainError, DNSNameError, DomainError
from twisted.python.failure import Failure
from zope.interface import implementer

from linkproxy.core.backoff import Backoff
from linkproxy.core.endpoint import Endpoint
from linkproxy.discovery import is_ip_literal, split_target
from linkproxy.discovery.metrics import discovery_metrics
from linkproxy.interfaces import IDiscovery, IResolution

__all__ = ["DnsDiscovery", "MAX_SRV_TARGETS", "MAX_ADDRESSES"]

#: Most SRV targets followed per name; the rest are ignored.
MAX_SRV_TARGETS = 64
#: Most addresses kept per target.
MAX_ADDRESSES = 1024

_ADDRESS_TYPES = (dns.A, dns.AAAA)


def _is_nxdomain(failure) -> bool:
    # DNSServerError, DNSQueryRefusedError and friends subclass DomainError too; only "no such name" counts.
    error = failure.value
    return isinstance(error, (DNSNameError, AuthoritativeDomainError)) or type(error) is DomainError


def _describe(failure) -> str:
    # The resolver's errors carry the whole response message as their text; operators want the rcode.
    error = failure.value
    if isinstance(error, DomainError) and type(error) is not DomainError:
        names = {"DNSFormatError": "FORMERR", "DNSServerError": "SERVFAIL", "DNSNameError": "NXDOMAIN",
                 "DNSNotImplementedError": "NOTIMP", "DNSQueryRefusedError": "REFUSED"}
        return names.get(type(error).__name__, type(error).__name__)
    if isinstance(error, TimeoutError):
        return "timed out"
    return failure.getErrorMessage() or type(error).__name__


def _record_address(record) -> Optional[str]:
    payload = record.payload
    if record.type == dns.A:
        return payload.dottedQuad()
    if record.type == dns.AAAA:
        return socket.inet_ntop(socket.AF_INET6, payload.address)
    return None


class _Answer:
    """
    What one lookup found: addresses (or SRV records) and the smallest TTL among them.
    """

    __slots__ = ("endpoints", "ttl")

    def __init__(self, endpoints: List[Endpoint], ttl: Optional[float]):
        self.endpoints = endpoints
        self.ttl = ttl


class _Failed(Exception):
    """
    A lookup failed for a reason other than NXDOMAIN; carries the message to log.
    """


@implementer(IResolution)
class _Done:
    def cancel(self):
        pass


@implementer(IResolution)
class _DnsWatch:
    """
    The refresh loop of one target.
    """

    def __init__(self, discovery, target, host, port, receiver):
        self._discovery = discovery
        self._target = target
        self._host = host
        self._port = port
        self._receiver = receiver
        self._current = None
        self._failures = 0
        self._pending = None
        self._call = None
        self._cancelled = False

    def start(self):
        self._query()

    def cancel(self):
        """
        Stop refreshing; an answer still in flight is dropped when it arrives.
        """
        self._cancelled = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        # A query in flight is left to finish (bounded by the query timeout) and its answer dropped:
        # cancelling it would stop the resolver's UDP port while its timeout is still scheduled.
        self._pending = None

    def _query(self):
        self._call = None
        if self._host.startswith("_"):
            d = self._discovery._lookup_srv(self._host)
        else:
            d = self._discovery._lookup_host(self._host, self._port)
        self._pending = d
        d.addCallbacks(self._resolved, self._failed)

    def _schedule(self, delay):
        if not self._cancelled:
            self._call = self._discovery._reactor.callLater(delay, self._query)

    def _resolved(self, answer):
        self._pending = None
        if self._cancelled:
            return
        self._failures = 0
        endpoints = tuple(sorted(answer.endpoints, key=lambda e: (e.address, e.weight))[:MAX_ADDRESSES])
        discovery = self._discovery
        ttl = answer.ttl if answer.ttl is not None else discovery.min_ttl
        # Scheduled first, so a receiver that raises cannot stop the refreshes.
        self._schedule(min(max(ttl, discovery.min_ttl), discovery.max_ttl))
        if self._current is None or endpoints != self._current:
            self._current = endpoints
            self._receiver.reset(endpoints)

    def _failed(self, failure):
        self._pending = None
        if self._cancelled or failure.check(CancelledError):
            return
        discovery = self._discovery
        delay = discovery._backoff.delay(self._failures, discovery._random)
        self._failures += 1
        if discovery._metrics is not None:
            discovery._metrics.error(discovery.backend)
        kept = "no endpoints yet" if self._current is None else f"keeping {len(self._current)} endpoints"
        discovery._log.warn("DNS lookup for {target} failed ({kept}); retrying in {delay:.1f} s: {error}",
                            target=self._target, kept=kept, delay=delay, error=failure.getErrorMessage())
        self._schedule(delay)


@implementer(IDiscovery)
class DnsDiscovery:
    """
    Endpoint sets from DNS, refreshed on the records' TTL.

    @ivar backend: the C{backend} metric label.
    @ivar min_ttl: the shortest refresh interval, in seconds.
    @ivar max_ttl: the longest refresh interval, in seconds.
    """

    backend = "dns"

    def __init__(self, reactor, *, resolver=None, server=None, min_ttl=5.0, max_ttl=60.0, backoff=None,
                 query_timeout=(1.0, 3.0), families="both", random=None, metrics=None, log=None):
        """
        @param reactor: an C{IReactorTime} the refreshes are scheduled on (and, without C{resolver}, the
            reactor queries to C{server} go through).
        @param resolver: an C{IResolver} to use (tests inject one); by default L{server}'s or the system's.
        @param server: C{(ip, port)} of the one DNS server to query, or C{None} for the system resolv.conf.
        @param min_ttl: refresh no more often than this, in seconds.
        @param max_ttl: refresh at least this often, in seconds.
        @param backoff: the retry policy after failures; C{Backoff(1, max_ttl)} when C{None}.
        @param query_timeout: the per-attempt timeouts of one query, in seconds (their sum bounds it).
        @param families: C{"both"} to use A and AAAA records together, or C{"ipv4-first"} to use AAAA records
            only for names without A records (for apps that listen on IPv4 only while their name, like
            C{localhost}, also has an IPv6 address).
        @param random: the generator for backoff jitter.
        @param metrics: a L{linkproxy.admin.metrics.Metrics} for C{discovery_errors_total}, or C{None}.
        """
        if not 0 < min_ttl <= max_ttl:
            raise ValueError(f"need 0 < min_ttl <= max_ttl, got {min_ttl!r} and {max_ttl!r}")
        self._reactor = reactor
        self._resolver = resolver
        self._server = server
        self.min_ttl = float(min_ttl)
        self.max_ttl = float(max_ttl)
        self._backoff = backoff if backoff is not None else Backoff(1.0, max(1.0, self.max_ttl))
        if families not in ("both", "ipv4-first"):
            raise ValueError(f"families must be 'both' or 'ipv4-first', not {families!r}")
        self._timeout = tuple(query_timeout)
        self._ipv4_first = families == "ipv4-first"
        self._random = random if random is not None else Random()
        self._metrics = discovery_metrics(metrics)
        self._log = log if log is not None else Logger(namespace="linkproxy.discovery.dns")

    def __repr__(self):
        return f"<DnsDiscovery server={self._server!r}>"

    @property
    def resolver(self):
        """
        The C{IResolver} queried, created on first use (so a proxy that only sees IP literals builds none).
        """
        if self._resolver is None:
            from twisted.names import client

            if self._server is not None:
                self._resolver = client.Resolver(servers=[self._server], reactor=self._reactor)
            else:
                self._resolver = client.createResolver()
        return self._resolver

    def resolve(self, target, receiver):
        """
        Watch C{target}; IP literals are answered synchronously, names after their first lookup.
        """
        try:
            host, port = split_target(target)
        except ValueError as e:
            self._log.info("not resolving {target!r}: {error}", target=target, error=str(e))
            receiver.reset(())
            return _Done()
        if is_ip_literal(host):
            receiver.reset((Endpoint(address=(host, port)),))
            return _Done()
        if port == 0 and not host.startswith("_"):
            # Port 0 is only meaningful for SRV names, whose records carry the ports.
            receiver.reset(())
            return _Done()
        watch = _DnsWatch(self, target, host, port, receiver)
        watch.start()
        return watch

    def _lookup(self, method, name):
        return method(name, timeout=self._timeout)

    @inlineCallbacks
    def _lookup_host(self, host, port, glue: Sequence = ()):
        """
        A and AAAA for C{host}: a L{_Answer} of endpoints on C{port}; NXDOMAIN and NODATA give no endpoints.

        @param glue: records already at hand (an SRV response's additional section); when they hold addresses
            for C{host}, no query is made.
        """
        name = host.lower().rstrip(".")
        glued = [r for r in glue if r.type in _ADDRESS_TYPES and str(r.name).lower().rstrip(".") == name]
        if glued:
            return self._addresses(glued, port)
        resolver = self.resolver
        results = yield DeferredList([self._lookup(resolver.lookupAddress, host),
                                      self._lookup(resolver.lookupIPV6Address, host)], consumeErrors=True)
        records = []
        errors = []
        ttls = []
        for kind, (ok, result) in zip(("A", "AAAA"), results):
            if ok:
                records.extend(result[0])
            elif _is_nxdomain(result):
                ttls.extend(_negative_ttls(result))
            else:
                errors.append(f"{kind} {host}: {_describe(result)}")
        if self._ipv4_first and any(r.type == dns.A for r in records):
            records = [r for r in records if r.type != dns.AAAA]
        answer = self._addresses(records, port)
        if errors and not answer.endpoints:
            raise _Failed("; ".join(errors))
        if not answer.endpoints and ttls:
            answer.ttl = min(ttls)
        if errors:
            # Half an answer (say, A without AAAA) is served, but retried soon.
            answer.ttl = self.min_ttl
        return answer

    @staticmethod
    def _addresses(records, port) -> _Answer:
        endpoints = []
        ttls = []
        for record in records:
            address = _record_address(record)
            if address is not None:
                endpoints.append(Endpoint(address=(address, port)))
                ttls.append(record.ttl)
        return _Answer(endpoints, min(ttls) if ttls else None)

    @inlineCallbacks
    def _lookup_srv(self, name):
        """
        SRV for C{name}, then addresses for its targets of the lowest priority.
        """
        try:
            answers, authority, additional = yield self._lookup(self.resolver.lookupService, name)
        except Exception as e:
            failure = Failure(e)
            if _is_nxdomain(failure):
                ttls = _negative_ttls(failure)
                return _Answer([], min(ttls) if ttls else None)
            raise _Failed(_describe(failure))
        srv = [r for r in answers if r.type == dns.SRV and str(r.payload.target) not in ("", ".")]
        if not srv:
            return _Answer([], None)
        lowest = min(r.payload.priority for r in srv)
        srv = [r for r in srv if r.payload.priority == lowest][:MAX_SRV_TARGETS]
        all_zero = all(r.payload.weight == 0 for r in srv)
        ttls = [r.ttl for r in srv]
        lookups = [self._lookup_host(str(r.payload.target), r.payload.port, additional) for r in srv]
        results = yield DeferredList(lookups, consumeErrors=True)
        endpoints = []
        errors = []
        for record, (ok, result) in zip(srv, results):
            if not ok:
                errors.append(f"{record.payload.target}: {result.getErrorMessage()}")
                continue
            weight = _srv_weight(record.payload.weight, all_zero)
            endpoints.extend(Endpoint(address=e.address, weight=weight) for e in result.endpoints)
            if result.ttl is not None:
                ttls.append(result.ttl)
        if errors and not endpoints:
            raise _Failed("; ".join(errors))
        return _Answer(endpoints, min(ttls) if ttls and not errors else (self.min_ttl if errors else None))


def _srv_weight(weight, all_zero) -> float:
    # RFC 2782: weight 0 records get a very small share when others have weight, an equal one when all are 0.
    if all_zero:
        return 1.0
    return float(weight) if weight > 0 else 0.01


def _negative_ttls(failure) -> List[float]:
    # An NXDOMAIN answer's SOA bounds how long the name stays absent (RFC 2308): min(SOA TTL, SOA minimum).
    message = failure.value.args[0] if failure.value.args else None
    out = []
    for record in getattr(message, "authority", None) or ():
        if getattr(record, "type", None) == dns.SOA:
            out.append(min(record.ttl, getattr(record.payload, "minimum", record.ttl)))
    return out
