"""
C{file:PATH} discovery: the endpoints YAML file of C{DESIGN.md}, watched and applied live.

    services:
      web.default.svc.cluster.local:80:
        - addr: 127.0.0.1:8081
          identity: web.default.serviceaccount.identity.linkproxy.local
          proxy: 127.0.0.1:4143
          weight: 1
          labels: {pod: web-0}
          protocol: http1
    profiles:                   # optional: per-target routes, retry budget, traffic split
      web.default.svc.cluster.local:80:
        routes:
          - {name: api-read, match: {method: GET, path_regex: "^/api/"}, timeout: 2s, retryable: true}

C{services:} is required (C{services: {}} says "no endpoints" on purpose): a file with only C{profiles:}
would discover nothing, which is far more often an edit gone wrong than a wish. C{profiles:} is parsed by
L{linkproxy.core.profile.parse_profiles} and applied to L{FileDiscovery.profiles}.

The file is polled (no inotify dependency, so it works the same on every platform and on network and
ConfigMap-style symlinked mounts): every C{interval} seconds its C{stat} signature (mtime, size, inode) is
compared, and on a change the content is read and hashed, so a touch without an edit costs no parse and no
update. Every C{verify_every} polls the content is hashed even when the signature is unchanged, which catches
an edit that kept both the size and a coarse mtime.

A bad edit (invalid YAML, a wrong field, a missing or empty file) keeps the last good set; it is logged once
per distinct bad content, naming every problem, and counted in C{discovery_errors_total{backend="file"}}.
The file is one unit: a problem in either section keeps the whole last good file, services and profiles both,
so an edit meant to change the two together never applies half. Targets not in the file have no endpoints.

L{parse_endpoints} is pure; L{FileDiscovery} does the (small, blocking, local) reads on the reactor thread.
"""

import hashlib
import os
from typing import Dict, List, NamedTuple, Optional, Tuple

from twisted.logger import Logger
from zope.interface import implementer

from linkproxy.core.endpoint import Endpoint, parse_host_port
from linkproxy.core.profile import Profile, ProfileError, parse_profiles
from linkproxy.discovery import normalize_target
from linkproxy.discovery.metrics import discovery_metrics
from linkproxy.discovery.profiles import Profiles
from linkproxy.interfaces import IDiscovery, IResolution

__all__ = [
    "EndpointsFileError",
    "EndpointsFile",
    "parse_endpoints",
    "parse_endpoints_file",
    "FileDiscovery",
    "MAX_FILE_BYTES",
    "MAX_TARGETS",
    "MAX_ENDPOINTS_PER_TARGET",
]

#: Largest endpoints file read, in bytes.
MAX_FILE_BYTES = 16 * 1024 * 1024
#: Most targets one file may name.
MAX_TARGETS = 10000
#: Most endpoints one target may have.
MAX_ENDPOINTS_PER_TARGET = 10000
#: Problems listed in one error message before the rest are summarised.
_MAX_PROBLEMS = 20

#: The inbound proxy port assumed for a meshed endpoint that names an identity but no C{proxy}.
DEFAULT_PROXY_PORT = 4143

_TOP_LEVEL = ("services", "profiles")
_FIELDS = ("addr", "identity", "proxy", "weight", "labels", "protocol")
_PROTOCOLS = ("http1", "h2", "opaque")

EndpointSets = Dict[str, Tuple[Endpoint, ...]]


class EndpointsFile(NamedTuple):
    """
    Everything one endpoints file declares.

    @ivar services: C{{canonical target: endpoints}}.
    @ivar profiles: C{{canonical target: L{Profile}}}; empty when the file has no C{profiles:}.
    """

    services: EndpointSets
    profiles: Dict[str, Profile]


class EndpointsFileError(ValueError):
    """
    The endpoints file is unusable.

    @ivar problems: every problem found, one line each.
    """

    def __init__(self, problems: List[str]):
        self.problems = list(problems)
        shown = self.problems[:_MAX_PROBLEMS]
        if len(self.problems) > _MAX_PROBLEMS:
            shown.append(f"... and {len(self.problems) - _MAX_PROBLEMS} more")
        super().__init__("; ".join(shown))


def parse_endpoints(data: bytes) -> EndpointSets:
    """
    Parse the endpoints file's services (its profiles are checked too: a bad file is bad as a whole).

    @param data: the file's bytes (UTF-8 YAML).
    @return: C{{canonical target "host:port": endpoints}}; a target listed with no endpoints maps to C{()}.
    @raise EndpointsFileError: listing every problem found.
    """
    return parse_endpoints_file(data).services


def parse_endpoints_file(data: bytes) -> EndpointsFile:
    """
    Parse the endpoints file: its C{services:} and its optional C{profiles:}.

    @param data: the file's bytes (UTF-8 YAML).
    @return: an L{EndpointsFile}.
    @raise EndpointsFileError: listing every problem found, in both sections.
    """
    import yaml

    if not data.strip():
        raise EndpointsFileError(["the file is empty (expected a top-level 'services:' mapping)"])
    try:
        document = yaml.safe_load(data)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise EndpointsFileError([f"not valid YAML{where}: {problem}"]) from None
    if not isinstance(document, dict) or "services" not in document:
        raise EndpointsFileError(["expected a top-level 'services:' mapping"])
    unknown = sorted(str(k) for k in document if k not in _TOP_LEVEL)
    problems: List[str] = []
    if unknown:
        problems.append(f"unknown top-level keys {unknown} (only {list(_TOP_LEVEL)} are read)")
    profiles: Dict[str, Profile] = {}
    try:
        profiles = parse_profiles(document.get("profiles"))
    except ProfileError as e:
        problems.extend(e.problems)
    services = document["services"]
    if services is None:
        services = {}
    if not isinstance(services, dict):
        raise EndpointsFileError(problems + [f"'services' must be a mapping of \"host:port\" to a list of "
                                             f"endpoints, got {type(services).__name__}"])
    if len(services) > MAX_TARGETS:
        raise EndpointsFileError(problems + [f"{len(services)} services, over the limit of {MAX_TARGETS}"])
    sets: EndpointSets = {}
    for raw_target, entries in services.items():
        try:
            target = normalize_target(str(raw_target))
        except ValueError as e:
            problems.append(f"service {raw_target!r}: {e}")
            continue
        if target in sets:
            problems.append(f"service {raw_target!r}: listed twice (names are compared ignoring case)")
            continue
        if entries is None:
            entries = []
        if not isinstance(entries, list):
            problems.append(f"service {target}: expected a list of endpoints, got {type(entries).__name__}")
            continue
        if len(entries) > MAX_ENDPOINTS_PER_TARGET:
            problems.append(f"service {target}: {len(entries)} endpoints, over the limit of "
                            f"{MAX_ENDPOINTS_PER_TARGET}")
            continue
        endpoints = []
        for index, entry in enumerate(entries):
            endpoint = _endpoint(entry, f"service {target} endpoint {index + 1}", problems)
            if endpoint is not None:
                endpoints.append(endpoint)
        sets[target] = tuple(endpoints)
    if problems:
        raise EndpointsFileError(problems)
    return EndpointsFile(sets, profiles)


def _endpoint(entry, where: str, problems: List[str]) -> Optional[Endpoint]:
    if not isinstance(entry, dict):
        problems.append(f"{where}: expected a mapping with 'addr', got {type(entry).__name__}")
        return None
    before = len(problems)
    unknown = sorted(str(k) for k in entry if k not in _FIELDS)
    if unknown:
        problems.append(f"{where}: unknown fields {unknown} (expected some of {list(_FIELDS)})")
    address = None
    if "addr" not in entry:
        problems.append(f"{where}: missing 'addr' (host:port)")
    else:
        try:
            address = parse_host_port(_text(entry["addr"]))
        except ValueError as e:
            problems.append(f"{where}: addr: {e}")
    identity = entry.get("identity")
    if identity is not None and (not isinstance(identity, str) or not identity.strip()):
        problems.append(f"{where}: identity must be a non-empty name, got {identity!r}")
    proxy = None
    if entry.get("proxy") is not None:
        if identity is None:
            problems.append(f"{where}: 'proxy' is only used with 'identity' (meshed endpoints)")
        try:
            proxy = parse_host_port(_text(entry["proxy"]))
        except ValueError as e:
            problems.append(f"{where}: proxy: {e}")
    weight = entry.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0 \
            or weight == float("inf"):
        problems.append(f"{where}: weight must be a number >= 0, got {weight!r}")
    labels = entry.get("labels") or {}
    if not isinstance(labels, dict):
        problems.append(f"{where}: labels must be a mapping, got {type(labels).__name__}")
    elif any(isinstance(v, (dict, list)) for v in labels.values()):
        problems.append(f"{where}: label values must be scalars")
    protocol = entry.get("protocol")
    if protocol is not None and protocol not in _PROTOCOLS:
        problems.append(f"{where}: protocol must be one of {list(_PROTOCOLS)}, got {protocol!r}")
    if len(problems) > before:
        return None
    if identity is not None:
        identity = identity.strip()
        if proxy is None:
            # A meshed endpoint's inbound proxy listens beside it, on the default inbound port.
            proxy = (address[0], DEFAULT_PROXY_PORT)
    return Endpoint(address=address, weight=float(weight),
                    labels={str(k): "" if v is None else str(v) for k, v in labels.items()},
                    identity=identity, proxy=proxy, protocol=protocol)


def _text(value) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"expected \"host:port\" text, got {value!r}")


def _comparable(endpoints):
    # Endpoint equality ignores labels; a label-only edit is still an update.
    return [(endpoint, sorted(endpoint.labels.items())) for endpoint in endpoints]


@implementer(IResolution)
class _FileResolution:
    def __init__(self, discovery, target, receiver):
        self._discovery = discovery
        self._target = target
        self._receiver = receiver

    def cancel(self):
        if self._discovery is not None:
            self._discovery._unwatch(self._target, self._receiver)
            self._discovery = None


@implementer(IDiscovery)
class FileDiscovery:
    """
    Endpoint sets and profiles from a watched endpoints file.

    Polling runs while some target is watched, and from L{start} to L{stop} (the process's profiles need the
    file whether or not a target is watched).

    @ivar backend: the C{backend} metric label.
    @ivar path: the file watched.
    @ivar profiles: the L{Profiles} of the last good file, updated in place on every good edit.
    """

    backend = "file"

    def __init__(self, path, reactor, *, interval=1.0, verify_every=10, metrics=None, log=None,
                 max_bytes=MAX_FILE_BYTES):
        """
        @param path: the endpoints file.
        @param reactor: an C{IReactorTime}; polls are scheduled with C{callLater}.
        @param interval: seconds between polls.
        @param verify_every: polls between content checks made even when the file's signature is unchanged.
        @param metrics: a L{linkproxy.admin.metrics.Metrics} for C{discovery_errors_total}, or C{None}.
        @param log: a L{Logger}, or C{None} for this module's.
        @param max_bytes: largest file read; a bigger one is a bad edit.
        """
        if not interval > 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        self.path = path
        self._reactor = reactor
        self._interval = interval
        self._verify_every = max(1, int(verify_every))
        self._metrics = discovery_metrics(metrics)
        self._log = log if log is not None else Logger(namespace="linkproxy.discovery.file")
        self._max_bytes = max_bytes
        self._sets: Optional[EndpointSets] = None
        self._signature = None
        self._digest = None
        self._bad_digest = None
        self._polls = 0
        self._watchers: Dict[str, List] = {}
        self._call = None
        self._loaded = False
        self._started = False
        self.profiles = Profiles(clock=reactor)

    def __repr__(self):
        return f"<FileDiscovery {self.path!r}>"

    def endpoints(self, target) -> Tuple[Endpoint, ...]:
        """
        The current endpoints of C{target} from the last good file (empty when there is none).
        """
        try:
            key = normalize_target(target)
        except ValueError:
            return ()
        return (self._sets or {}).get(key, ())

    def start(self):
        """
        Read the file now (when it has not been read yet) and poll it until L{stop}, watched targets or not.

        The proxy calls this at start-up, so the first request already sees the file's profiles.
        """
        self._started = True
        if not self._loaded:
            self._loaded = True
            self.check(force=True)
        if self._call is None:
            self._call = self._reactor.callLater(self._interval, self._poll)

    def stop(self):
        """
        Undo L{start}: polling goes on only while some target is watched.
        """
        self._started = False
        if not self._watchers and self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def resolve(self, target, receiver):
        """
        Watch C{target}: its current set is delivered synchronously, and each change after that as a
        C{reset}.
        """
        if not self._loaded:
            self._loaded = True
            self.check(force=True)
        try:
            key = normalize_target(target)
        except ValueError:
            # No file entry can match a malformed target; it has no endpoints, and nothing to watch.
            receiver.reset(())
            return _FileResolution(None, None, None)
        self._watchers.setdefault(key, []).append(receiver)
        receiver.reset((self._sets or {}).get(key, ()))
        if self._call is None:
            self._call = self._reactor.callLater(self._interval, self._poll)
        return _FileResolution(self, key, receiver)

    def _unwatch(self, key, receiver):
        receivers = self._watchers.get(key)
        if receivers and receiver in receivers:
            receivers.remove(receiver)
            if not receivers:
                del self._watchers[key]
        if not self._watchers and not self._started and self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _poll(self):
        self._call = None
        self._polls += 1
        try:
            self.check(force=self._polls % self._verify_every == 0)
        finally:
            if (self._watchers or self._started) and self._call is None:
                self._call = self._reactor.callLater(self._interval, self._poll)

    def check(self, force=False):
        """
        Look at the file now, and apply it when its content changed.

        @param force: read and hash the content even when its C{stat} signature is unchanged.
        @return: C{True} when a new good set was applied.
        """
        try:
            st = os.stat(self.path)
            signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError as e:
            signature = None
            error = f"cannot read it: {e.strerror or e}"
        if signature is not None:
            if signature == self._signature and not force:
                return False
            if st.st_size > self._max_bytes:
                self._signature = signature
                return self._bad(f"size:{signature}", f"it is {st.st_size} bytes, over the limit of "
                                                      f"{self._max_bytes}")
            try:
                with open(self.path, "rb") as f:
                    data = f.read(self._max_bytes + 1)
            except OSError as e:
                signature = None
                error = f"cannot read it: {e.strerror or e}"
        if signature is None:
            self._signature = None
            return self._bad(f"unreadable:{error}", error)
        self._signature = signature
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:
            return False
        try:
            parsed = parse_endpoints_file(data)
        except EndpointsFileError as e:
            return self._bad(digest, str(e))
        self._digest = digest
        self._bad_digest = None
        self._apply(parsed)
        return True

    def _bad(self, digest, problem):
        if digest == self._bad_digest:
            return False
        # The same bad content is reported once, not on every poll; a different bad edit is a new error.
        self._bad_digest = digest
        # The good content may come back unchanged (an edit undone); it must then be applied again.
        self._digest = None
        if self._metrics is not None:
            self._metrics.error(self.backend)
        if self._sets is None:
            self._log.warn("endpoints file {path} is unusable and no good version has been read yet "
                            "(every target has no endpoints): {problem}", path=self.path, problem=problem)
            # Receivers already hold the empty set; no update is needed.
        else:
            self._log.warn("endpoints file {path} is unusable; keeping the last good version "
                            "({targets} services, {profiles} profiles): {problem}", path=self.path,
                            targets=len(self._sets), profiles=len(self.profiles), problem=problem)
        return False

    def _apply(self, parsed: EndpointsFile):
        sets = parsed.services
        old = self._sets or {}
        self._sets = sets
        # Profiles first: a request that a services update wakes already sees the matching profiles.
        self.profiles.replace(parsed.profiles)
        self._log.info("endpoints file {path} loaded: {targets} services, {endpoints} endpoints, "
                       "{profiles} profiles", path=self.path, targets=len(sets),
                       endpoints=sum(len(v) for v in sets.values()), profiles=len(parsed.profiles))
        for key, receivers in list(self._watchers.items()):
            new_set = sets.get(key, ())
            if _comparable(old.get(key, ())) == _comparable(new_set):
                continue
            for receiver in list(receivers):
                receiver.reset(new_set)
