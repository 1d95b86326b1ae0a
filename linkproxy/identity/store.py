"""
The proxy's identity: its certificate chain, key and trust anchors, kept current.

L{IdentityStore} reads an identity directory (see L{linkproxy.identity.ca}). Given a C{certify} function (the
identity service, L{linkproxy.identity.client.ServiceCertifier}), it generates its key in memory, has the
service sign it, and renews at 70 % of the leaf's remaining lifetime, retrying failures with jittered
backoff while the old leaf stays in use; the directory then only supplies the trust anchors (C{ca.pem}).
Without one, it uses C{cert.pem} and C{key.pem} when they are for its name; otherwise, given a development
issuer (C{issuer.pem} and C{issuer-key.pem}), it issues itself a leaf whose key never leaves memory and renews
it at a fraction of its lifetime. It polls the files and swaps in a new identity when they change; a file
that is half written or invalid leaves the last good identity in place.

All time comes from the reactor (C{IReactorTime}), so a C{task.Clock} drives renewal and polling in tests.
"""

import datetime
import os
import random as _random_module
import weakref

from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.logger import Logger

from linkproxy.identity import ca

_WATCHED = (ca.CA_FILE, ca.CERT_FILE, ca.KEY_FILE, ca.ISSUER_FILE, ca.ISSUER_KEY_FILE)

# One gauge/counter pair per prometheus registry: registering a name twice on a registry is an error, and
# several stores (tests, or a process with more than one identity) may share one Metrics.
_METRICS_BY_REGISTRY = weakref.WeakKeyDictionary()


class _Metrics:
    """
    The identity families of one registry.
    """

    def __init__(self, registry):
        from prometheus_client import Counter, Gauge
        self.expiration = Gauge(
            "identity_cert_expiration_timestamp_seconds",
            "Unix time at which the proxy's current leaf certificate expires", registry=registry)
        self.installs = Counter(
            "identity_cert_refresh",
            "Times the proxy installed a new identity (loaded, reloaded, self-issued or certified)",
            registry=registry)
        # Linkerd's name: new leaf certificates only, not a reload that changed only the trust anchors.
        self.refreshes = Counter(
            "identity_cert_refreshes", "Times the proxy got a new leaf certificate", registry=registry)
        self.refreshed = Gauge(
            "identity_cert_refresh_timestamp_seconds",
            "Unix time at which the proxy last got a new leaf certificate", registry=registry)
        self.failures = Counter(
            "identity_cert_refresh_failures", "Failed attempts to get a certificate from the identity service",
            registry=registry)


def _identity_metrics(registry):
    metrics = _METRICS_BY_REGISTRY.get(registry)
    if metrics is None:
        metrics = _METRICS_BY_REGISTRY[registry] = _Metrics(registry)
    return metrics


class Identity:
    """
    One immutable generation of the proxy's identity.

    @ivar name: the identity name (the leaf's DNS SAN).
    @ivar chain: C{tuple} of L{cryptography.x509.Certificate}, leaf first, then intermediates.
    @ivar key: the leaf's private key.
    @ivar anchors: C{tuple} of trusted root certificates (from C{ca.pem}).
    @ivar not_before: the leaf's notBefore, as a unix timestamp.
    @ivar not_after: the leaf's notAfter, as a unix timestamp.
    @ivar generation: increases by one with each identity a store installs.
    @ivar self_issued: C{True} if the store issued this leaf from a development issuer.
    """

    __slots__ = ("name", "chain", "key", "anchors", "not_before", "not_after", "generation", "self_issued")

    def __init__(self, name, chain, key, anchors, generation, self_issued):
        self.name = name
        self.chain = tuple(chain)
        self.key = key
        self.anchors = tuple(anchors)
        self.not_before = self.chain[0].not_valid_before_utc.timestamp()
        self.not_after = self.chain[0].not_valid_after_utc.timestamp()
        self.generation = generation
        self.self_issued = self_issued

    @property
    def leaf(self):
        """The leaf certificate (C{chain[0]})."""
        return self.chain[0]

    @property
    def expiry(self):
        """The leaf's notAfter as a unix timestamp (same as L{not_after})."""
        return self.not_after

    def __repr__(self):
        return (f"<Identity {self.name} generation={self.generation} "
                f"not_after={self.not_after:.0f} self_issued={self.self_issued}>")


class IdentityStore:
    """
    Holds the current L{Identity} for one name and keeps it fresh.

    @ivar ready: C{True} once an identity has been installed.
    """

    log = Logger()

    def __init__(self, directory, name, *, reactor=None, metrics=None, lifetime=86400.0, renew_fraction=0.7,
                 poll_interval=5.0, certify=None, random=None):
        """
        @param directory: the identity directory.
        @param name: this proxy's identity name.
        @param reactor: an C{IReactorTime}; defaults to the global reactor.
        @param metrics: a L{linkproxy.admin.metrics.Metrics} (or anything with a C{registry}); the store
            registers C{identity_cert_expiration_timestamp_seconds}, C{identity_cert_refresh_total},
            C{identity_cert_refreshes_total}, C{identity_cert_refresh_timestamp_seconds} and
            C{identity_cert_refresh_failures_total} on it.
        @param lifetime: seconds a self-issued leaf lasts.
        @param renew_fraction: the fraction of a self-issued leaf's lifetime after which it is renewed (of
            the remaining lifetime, for a certified one).
        @param poll_interval: seconds between checks of the files for changes.
        @param certify: C{certify(name, key, anchors)} returning a Deferred that fires with the signed chain
            (leaf first), as L{linkproxy.identity.client.ServiceCertifier} does; when given, the store gets
            every certificate this way and the directory only supplies C{ca.pem}. It may have a C{check()}
            method, which L{start} calls to fail early (a missing token file).
        @param random: a C{random.Random} for the retry jitter; tests seed it.
        """
        ca.check_dns_name(name)
        if lifetime <= 0:
            raise ValueError(f"lifetime must be positive, not {lifetime!r}")
        if not 0 < renew_fraction < 1:
            raise ValueError(f"renew_fraction must be between 0 and 1, not {renew_fraction!r}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, not {poll_interval!r}")
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.directory = directory
        self.name = name
        self._lifetime = float(lifetime)
        self._renew_fraction = float(renew_fraction)
        self._poll_interval = float(poll_interval)
        self._metrics = _identity_metrics(metrics.registry) if metrics is not None else None
        self._certify = certify
        self._schedule = None
        if certify is not None:
            from linkproxy.identity.renewal import RenewalSchedule
            self._schedule = RenewalSchedule(random if random is not None else _random_module.Random(),
                                             self._renew_fraction)
        self._anchors = ()
        self._pending = None
        self._current = None
        self._generation = 0
        self._callbacks = []
        self._seen = None
        self._poll_call = None
        self._renew_call = None
        self._running = False

    # --- public -------------------------------------------------------------------------------------

    @property
    def ready(self):
        """C{True} once an identity has been installed."""
        return self._current is not None

    def not_ready_reason(self):
        """
        For C{/ready}: why this identity cannot be used now, or C{None} when it can.

        @return: a line of text, or C{None}.
        """
        if self._current is None:
            return f"identity {self.name} not {'certified' if self._certify else 'loaded'} yet"
        if self._now() >= self._current.not_after:
            when = datetime.datetime.fromtimestamp(self._current.not_after, datetime.timezone.utc).isoformat()
            return f"identity {self.name} expired at {when}"
        return None

    @property
    def current(self):
        """The current L{Identity}, or C{None} before L{start} succeeds."""
        return self._current

    def on_change(self, callback):
        """
        Call C{callback(identity)} each time a new identity is installed (including the first).

        @return: a zero-argument function that unsubscribes C{callback}.
        """
        self._callbacks.append(callback)

        def cancel():
            if callback in self._callbacks:
                self._callbacks.remove(callback)
        return cancel

    def start(self):
        """
        Load (or issue) the identity and start watching the files.

        @return: the installed L{Identity}.
        @raise linkproxy.identity.ca.IdentityError: if there is no usable identity; nothing is scheduled.
        """
        if self._running:
            return self._current
        self._seen = self._signature()
        if self._certify is not None:
            return self._start_certifying()
        identity = self._load()
        self._running = True
        self._install(identity)
        self._schedule_poll()
        return self._current

    def stop(self):
        """Cancel polling and renewal. The current identity stays readable."""
        self._running = False
        for call in (self._poll_call, self._renew_call):
            if call is not None and call.active():
                call.cancel()
        self._poll_call = self._renew_call = None
        pending, self._pending = self._pending, None
        if pending is not None and not pending.called:
            pending.cancel()

    # --- the identity service -----------------------------------------------------------------------

    def _start_certifying(self):
        """
        Load the anchors, check what can be checked now, and ask for the first certificate. A proxy whose
        directory still holds an issuer key is told that it is unused: the point of the service is that no
        proxy holds one.
        """
        self._anchors = tuple(ca.load_certs(self._path(ca.CA_FILE)))
        check = getattr(self._certify, "check", None)
        if check is not None:
            check()
        if os.path.exists(self._path(ca.ISSUER_KEY_FILE)):
            self.log.warn("{path} is not used with an identity service; remove it from proxies",
                          path=self._path(ca.ISSUER_KEY_FILE))
        self._running = True
        self._schedule_poll()
        self._request()
        return self._current

    def _request(self):
        self._renew_call = None
        if not self._running:
            return
        from twisted.internet.defer import maybeDeferred
        key = ca.new_key()
        anchors = self._anchors
        self._pending = d = maybeDeferred(self._certify, self.name, key, anchors)
        d.addCallback(self._certified, key, anchors)
        d.addErrback(self._not_certified)

    def _certified(self, chain, key, anchors):
        self._pending = None
        if not self._running:
            return
        if not chain:
            raise ca.IdentityError("the identity service sent no certificate")
        if not ca.key_matches(chain[0], key):
            raise ca.IdentityError("the identity service's certificate is not for our key")
        if not self._names_match(chain[0]):
            names = ", ".join(ca.dns_names(chain[0])) or "no DNS name"
            raise ca.IdentityError(f"the identity service's certificate is for {names}, not {self.name}")
        self._check(chain, anchors, "certificate from the identity service")
        self._install(Identity(self.name, chain, key, anchors, self._generation + 1, self_issued=False))

    def _not_certified(self, failure):
        self._pending = None
        if not self._running:
            return
        if self._metrics is not None:
            self._metrics.failures.inc()
        not_after = self._current.not_after if self._current is not None else None
        delay = self._schedule.failed(self._now(), not_after)
        self.log.warn("identity {name} not certified: {error}; retrying in {delay:.1f} s (attempt {attempt})",
                      name=self.name, error=failure.getErrorMessage(), delay=delay,
                      attempt=self._schedule.attempts)
        self._renew_call = self._reactor.callLater(delay, self._request)

    def _reload_anchors(self):
        """
        ca.pem changed: trust the new anchors from now on, for peers and for the next certificate.
        """
        try:
            anchors = tuple(ca.load_certs(self._path(ca.CA_FILE)))
        except ca.IdentityError as e:
            self.log.warn("identity {name}: trust anchors not reloaded: {error}", name=self.name, error=str(e))
            return
        self._anchors = anchors
        current = self._current
        if current is not None:
            self._install(Identity(self.name, current.chain, current.key, anchors, self._generation + 1,
                                   self_issued=False), reschedule=False)

    # --- loading ------------------------------------------------------------------------------------

    def _path(self, filename):
        return os.path.join(self.directory, filename)

    def _signature(self):
        """
        What the watched files look like now. The inode catches an atomic rename that keeps mtime and size.
        """
        sig = []
        for filename in _WATCHED:
            try:
                st = os.stat(self._path(filename))
            except OSError:
                sig.append(None)
            else:
                sig.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(sig)

    def _now(self):
        return self._reactor.seconds()

    def _load(self):
        """
        Build a new L{Identity} from the directory, without installing it.

        @raise linkproxy.identity.ca.IdentityError: if the files give no usable identity.
        """
        anchors = ca.load_certs(self._path(ca.CA_FILE))
        cert_path, key_path = self._path(ca.CERT_FILE), self._path(ca.KEY_FILE)
        has_issuer = os.path.exists(self._path(ca.ISSUER_FILE)) and os.path.exists(self._path(ca.ISSUER_KEY_FILE))
        foreign = None
        if os.path.exists(cert_path) and os.path.exists(key_path):
            chain = ca.load_certs(cert_path)
            if self._names_match(chain[0]):
                key = ca.load_key(key_path)
                if not ca.key_matches(chain[0], key):
                    raise ca.IdentityError(f"{key_path} is not the key of the leaf in {cert_path}")
                self._check(chain, anchors, cert_path)
                return Identity(self.name, chain, key, anchors, self._generation + 1, self_issued=False)
            foreign = ", ".join(ca.dns_names(chain[0])) or "no DNS name"
        if has_issuer:
            if foreign is not None:
                self.log.info("{path} is for {other}, not {name}; issuing from the local issuer",
                              path=cert_path, other=foreign, name=self.name)
            return self._issue(anchors)
        if foreign is not None:
            raise ca.IdentityError(
                f"{cert_path} is for {foreign}, not {self.name}, and there is no issuer to issue one")
        raise ca.IdentityError(
            f"{self.directory} has neither cert.pem and key.pem nor issuer.pem and issuer-key.pem")

    def _names_match(self, leaf):
        try:
            verify_certificate_hostname(leaf, self.name)
        except (VerificationError, CertificateError):
            return False
        return True

    def _check(self, chain, anchors, source):
        try:
            ca.verify_chain(chain, anchors, self._now())
        except ca.IdentityError as e:
            raise ca.IdentityError(f"{source}: {e}") from None

    def _issue(self, anchors):
        issuer, issuer_key = ca.load_issuer(self.directory)
        domain = ca.trust_domain_of(issuer)
        if domain is not None and not (self.name == domain or self.name.endswith("." + domain)):
            # The issuer's name constraint would make every peer reject the leaf; fail here, clearly.
            raise ca.IdentityError(f"identity name {self.name!r} is outside the issuer's trust domain {domain!r}")
        now = self._now()
        key = ca.new_key()
        leaf = ca.make_leaf(issuer, issuer_key, self.name, key,
                            datetime.datetime.fromtimestamp(now, datetime.timezone.utc) - ca.BACKDATE,
                            self._lifetime)
        chain = (leaf, issuer)
        self._check(chain, anchors, self._path(ca.ISSUER_FILE))
        return Identity(self.name, chain, key, anchors, self._generation + 1, self_issued=True)

    def _install(self, identity, reschedule=True):
        previous = self._current
        self._generation = identity.generation
        self._current = identity
        if self._metrics is not None:
            self._metrics.expiration.set(identity.not_after)
            self._metrics.installs.inc()
            if previous is None or previous.leaf != identity.leaf:
                self._metrics.refreshes.inc()
                self._metrics.refreshed.set(self._now())
        if identity.self_issued:
            source = "self-issued"
        else:
            source = "from the identity service" if self._certify is not None else "from files"
        self.log.info("identity {name} installed: generation {generation}, expires {not_after}, "
                      "{source}", name=identity.name, generation=identity.generation,
                      not_after=datetime.datetime.fromtimestamp(identity.not_after, datetime.timezone.utc)
                      .isoformat(), source=source)
        if reschedule:
            self._schedule_renewal(identity)
        for callback in list(self._callbacks):
            try:
                callback(identity)
            except Exception:
                self.log.failure("identity on_change callback failed")

    # --- timers -------------------------------------------------------------------------------------

    def _schedule_renewal(self, identity):
        if self._renew_call is not None and self._renew_call.active():
            self._renew_call.cancel()
        self._renew_call = None
        if self._certify is not None and self._running:
            delay = self._schedule.succeeded(self._now(), identity.not_after)
            self._renew_call = self._reactor.callLater(delay, self._request)
            return
        if not identity.self_issued or not self._running:
            # Files are renewed by whoever writes them; the poller picks the new ones up.
            return
        delay = self._renew_fraction * self._lifetime
        self._renew_call = self._reactor.callLater(delay, self._renew)

    def _renew(self):
        self._renew_call = None
        if not self._refresh("renewal") and self._running:
            # Renewal failed (issuer unreadable, say): try again soon rather than waiting for a file change,
            # since the current leaf is heading for expiry.
            self._renew_call = self._reactor.callLater(self._poll_interval, self._renew)

    def _schedule_poll(self):
        if self._running:
            self._poll_call = self._reactor.callLater(self._poll_interval, self._poll)

    def _poll(self):
        self._poll_call = None
        try:
            seen = self._signature()
            if seen != self._seen:
                # Remember this state even if loading fails: a half-written file is retried when it changes
                # again, not logged on every poll.
                self._seen = seen
                if self._certify is not None:
                    self._reload_anchors()
                else:
                    self._refresh("files changed")
        finally:
            self._schedule_poll()

    def _refresh(self, why):
        try:
            identity = self._load()
        except ca.IdentityError as e:
            self.log.warn("identity {name} not refreshed ({why}): {error}; keeping generation {generation}",
                          name=self.name, why=why, error=str(e), generation=self._generation)
            return False
        except Exception:
            self.log.failure("identity {name} not refreshed ({why}); keeping generation {generation}",
                             name=self.name, why=why, generation=self._generation)
            return False
        self._install(identity)
        return True
