"""
Tests for L{linkproxy.identity}: the development CA, the command line, and the identity store.
"""

import datetime
import io
import os
import shutil
import stat
import sys
import time

from cryptography import x509
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from linkproxy.admin.metrics import Metrics
from linkproxy.identity import ca, cli
from linkproxy.identity.store import IdentityStore

WEB = "web.default.serviceaccount.identity.linkproxy.local"
API = "api.default.serviceaccount.identity.linkproxy.local"
DAY = 86400


def run_cli(*argv):
    """
    Run L{cli.main} and capture its output.

    @return: C{(exit code, stdout text, stderr text)}.
    """
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def verify_with_cryptography(chain, anchors, name, at):
    """
    Verify a leaf for C{name} with cryptography's own (WebPKI-style) verifier, independently of OpenSSL.
    """
    store = verification.Store(anchors)
    verifier = (verification.PolicyBuilder().store(store).time(at)
                .build_server_verifier(verification.DNSName(name)))
    return verifier.verify(chain[0], chain[1:])


class CommandLineTests(SynchronousTestCase):
    """
    C{linkproxy-identity init / issue / show}.
    """

    def setUp(self):
        self.dir = self.mktemp()

    def test_init_issue_show(self):
        """
        init creates an anchor and an issuer, issue writes a 24 h leaf for the name whose chain verifies
        to ca.pem, and show describes all three.
        """
        self.assertEqual(run_cli("init", self.dir)[0], 0)
        code, out, err = run_cli("issue", self.dir, WEB)
        self.assertEqual((code, err), (0, ""))
        self.assertIn(WEB, out)

        chain = ca.load_certs(os.path.join(self.dir, "cert.pem"))
        anchors = ca.load_certs(os.path.join(self.dir, "ca.pem"))
        leaf = chain[0]
        self.assertEqual(len(chain), 2)
        self.assertEqual(leaf.not_valid_after_utc - leaf.not_valid_before_utc, datetime.timedelta(hours=24))
        now = datetime.datetime.now(datetime.timezone.utc)
        self.assertTrue(
            datetime.timedelta(0) < now - leaf.not_valid_before_utc < datetime.timedelta(minutes=2))
        self.assertEqual(ca.dns_names(leaf), [WEB])
        self.assertEqual(leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, WEB)
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(set(eku), {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH})

        verified = verify_with_cryptography(chain, anchors, WEB, now)
        self.assertEqual(verified[-1], anchors[0])
        ca.verify_chain(chain, anchors)

        for key_file in ("ca-key.pem", "issuer-key.pem", "key.pem"):
            mode = stat.S_IMODE(os.stat(os.path.join(self.dir, key_file)).st_mode)
            self.assertEqual(mode, 0o600, key_file)
        self.assertTrue(ca.key_matches(leaf, ca.load_key(os.path.join(self.dir, "key.pem"))))

        code, out, err = run_cli("show", self.dir)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("trust anchor: root.linkproxy.local", out)
        self.assertIn("issuer: identity.linkproxy.local", out)
        self.assertIn(f"leaf: {WEB}", out)
        self.assertIn("verification: ok", out)

    def test_trust_domain_and_lifetime(self):
        """
        --trust-domain names the anchor and constrains the issuer; --lifetime sets the leaf's validity.
        """
        name = "web.prod.serviceaccount.identity.example.org"
        self.assertEqual(run_cli("init", self.dir, "--trust-domain", "example.org")[0], 0)
        self.assertEqual(run_cli("issue", self.dir, name, "--lifetime", "2h")[0], 0)
        leaf = ca.load_certs(os.path.join(self.dir, "cert.pem"))[0]
        self.assertEqual(leaf.not_valid_after_utc - leaf.not_valid_before_utc, datetime.timedelta(hours=2))
        issuer = ca.load_certs(os.path.join(self.dir, "issuer.pem"))[0]
        self.assertEqual(ca.trust_domain_of(issuer), "example.org")
        anchor = ca.load_certs(os.path.join(self.dir, "ca.pem"))[0]
        self.assertEqual(anchor.subject.rfc4514_string(), "CN=root.example.org")

    def test_refuses_to_overwrite(self):
        """
        A second init into the same directory fails with one line on stderr and leaves ca.pem untouched.
        """
        run_cli("init", self.dir)
        with open(os.path.join(self.dir, "ca.pem"), "rb") as f:
            before = f.read()
        code, out, err = run_cli("init", self.dir)
        self.assertEqual(code, 1)
        self.assertEqual(err.count("\n"), 1)
        self.assertIn("already exists", err)
        with open(os.path.join(self.dir, "ca.pem"), "rb") as f:
            self.assertEqual(f.read(), before)

    def test_expected_errors_are_one_line(self):
        """
        A malformed name, a name outside the trust domain and a missing directory are one-line errors
        with exit code 1, not tracebacks.
        """
        run_cli("init", self.dir)
        for argv in (("issue", self.dir, "Not A Name"),
                     ("issue", self.dir, "web.default.serviceaccount.identity.other.domain"),
                     ("issue", self.dir, "localhost"),
                     ("show", self.dir + "-missing")):
            code, out, err = run_cli(*argv)
            self.assertEqual(code, 1, argv)
            self.assertEqual(err.count("\n"), 1, err)
            self.assertTrue(err.startswith("linkproxy-identity: error: "), err)
            self.assertNotIn("Traceback", err)

    def test_usage_errors_exit_2(self):
        """
        A bad --lifetime or a missing argument is a usage error: argparse exits with status 2.
        """
        usage = io.StringIO()
        self.patch(sys, "stderr", usage)
        with self.assertRaises(SystemExit) as cm:
            run_cli("issue", self.dir, WEB, "--lifetime", "soon")
        self.assertEqual(cm.exception.code, 2)
        self.assertIn("invalid duration", usage.getvalue())
        with self.assertRaises(SystemExit) as cm:
            run_cli("init")
        self.assertEqual(cm.exception.code, 2)


class CATests(SynchronousTestCase):
    """
    The pure certificate builders.
    """

    def test_long_names_keep_only_the_san(self):
        """
        A name longer than the 64 characters a CN allows is still issued, with an empty subject and a
        critical SAN.
        """
        anchor_key, issuer_key, key = ca.new_key(), ca.new_key(), ca.new_key()
        anchor = ca.make_anchor("linkproxy.local", anchor_key)
        issuer = ca.make_issuer(anchor, anchor_key, "linkproxy.local", issuer_key)
        name = "a-rather-long-service-account-name.some-namespace.serviceaccount.identity.linkproxy.local"
        leaf = ca.make_leaf(issuer, issuer_key, name, key, time.time() - 60, 3600)
        self.assertEqual(len(leaf.subject), 0)
        self.assertTrue(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical)
        ca.verify_chain([leaf, issuer], [anchor])

    def test_name_constraint(self):
        """
        The issuer is constrained to its trust domain: a leaf it signs for another domain does not
        verify, so a leaked development issuer cannot impersonate arbitrary hosts.
        """
        anchor_key, issuer_key, key = ca.new_key(), ca.new_key(), ca.new_key()
        anchor = ca.make_anchor("linkproxy.local", anchor_key)
        issuer = ca.make_issuer(anchor, anchor_key, "linkproxy.local", issuer_key)
        leaf = ca.make_leaf(issuer, issuer_key, "www.example.com", key, time.time() - 60, 3600)
        self.assertRaises(ca.IdentityError, ca.verify_chain, [leaf, issuer], [anchor])

    def test_parse_identity_name(self):
        """
        Identity names split into account, namespace and trust domain; other shapes are refused.
        """
        self.assertEqual(ca.parse_identity_name(WEB), ("web", "default", "linkproxy.local"))
        for bad in ("web.linkproxy.local", "Web.default.serviceaccount.identity.x", "",
                    "web.default.serviceaccount.identity."):
            self.assertRaises(ca.IdentityError, ca.parse_identity_name, bad)


class StoreTests(SynchronousTestCase):
    """
    L{IdentityStore}: loading, self-issuing, renewal and reloading, driven by a L{Clock}.
    """

    def setUp(self):
        self.dir = self.mktemp()
        ca.init_trust_domain(self.dir)
        self.clock = Clock()
        # Certificates are verified at the clock's time, so start it at the real time.
        self.clock.advance(time.time())
        self.metrics = Metrics(process=False)

    def sample(self, name):
        """
        @return: the value of a metric on the store's registry.
        """
        return self.metrics.registry.get_sample_value(name)

    def make_store(self, name=WEB, **kw):
        """
        Make a store on the test clock and metrics, stopped at cleanup.
        """
        store = IdentityStore(self.dir, name, reactor=self.clock, metrics=self.metrics, **kw)
        self.addCleanup(store.stop)
        return store

    def test_self_issues_and_renews(self):
        """
        With only an issuer, the store issues itself a leaf from the clock's time, keeps its key off disk,
        and renews it at 70% of its lifetime; the refresh counter and expiration gauge follow.
        """
        store = self.make_store()
        changes = []
        store.on_change(changes.append)
        self.assertFalse(store.ready)
        first = store.start()
        self.assertTrue(store.ready)
        self.assertIs(store.current, first)
        self.assertTrue(first.self_issued)
        self.assertEqual(first.name, WEB)
        self.assertEqual(ca.dns_names(first.leaf), [WEB])
        self.assertEqual(first.not_before, int(self.clock.seconds()) - 60)
        self.assertEqual(first.not_after - first.not_before, DAY)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "key.pem")))
        self.assertEqual(changes, [first])
        self.assertEqual(self.sample("identity_cert_refresh_total"), 1)
        self.assertEqual(self.sample("identity_cert_expiration_timestamp_seconds"), first.not_after)

        self.clock.advance(0.7 * DAY - 1)
        self.assertIs(store.current, first)
        self.clock.advance(1)
        second = store.current
        self.assertIsNot(second, first)
        self.assertEqual(second.generation, first.generation + 1)
        self.assertNotEqual(second.leaf.serial_number, first.leaf.serial_number)
        self.assertEqual(second.not_after, first.not_after + 0.7 * DAY)
        self.assertEqual(changes, [first, second])
        self.assertEqual(self.sample("identity_cert_refresh_total"), 2)
        self.assertEqual(self.sample("identity_cert_expiration_timestamp_seconds"), second.not_after)
        verify_with_cryptography(
            second.chain, second.anchors, WEB,
            datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.timezone.utc))

    def test_renewal_logged_once(self):
        """
        Each renewal is logged once at info, naming the identity, its new generation and expiry; the timers
        between renewals log nothing.
        """
        store = self.make_store()
        first = store.start()
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.clock.advance(0.35 * DAY)
        self.assertEqual(len(logged), 0)
        self.clock.advance(0.35 * DAY)
        [event] = [e for e in logged if "installed" in e.get("log_format", "")]
        self.assertEqual(len(logged), 1)
        self.assertEqual((event["log_level"], event["name"], event["generation"], event["source"]),
                         (LogLevel.info, WEB, first.generation + 1, "self-issued"))
        self.assertEqual(event["not_after"], datetime.datetime.fromtimestamp(
            store.current.not_after, datetime.timezone.utc).isoformat())

    def test_loads_files(self):
        """
        cert.pem and key.pem for the store's name are used as they are, and not renewed by the store.
        """
        leaf = ca.issue_leaf(self.dir, WEB)
        store = self.make_store()
        identity = store.start()
        self.assertFalse(identity.self_issued)
        self.assertEqual(identity.leaf, leaf)
        self.assertEqual(len(identity.chain), 2)
        self.assertEqual(identity.expiry, leaf.not_valid_after_utc.timestamp())
        # Only the poller is scheduled.
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_rereads_rotated_files(self):
        """
        When cert.pem and key.pem are replaced, the store installs them after its next poll.
        """
        ca.issue_leaf(self.dir, WEB)
        store = self.make_store(poll_interval=5.0)
        first = store.start()
        rotated = ca.issue_leaf(self.dir, WEB)
        self.clock.advance(4.9)
        self.assertIs(store.current, first)
        self.clock.advance(0.2)
        self.assertEqual(store.current.leaf, rotated)
        self.assertEqual(store.current.generation, first.generation + 1)
        self.assertEqual(self.sample("identity_cert_refresh_total"), 2)

    def test_invalid_file_keeps_last_good(self):
        """
        A half-written cert.pem, or a new certificate whose key has not arrived yet, leaves the last
        good identity in place and is logged; the store recovers once the files are whole.
        """
        ca.issue_leaf(self.dir, WEB)
        store = self.make_store()
        first = store.start()
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

        cert_path = os.path.join(self.dir, "cert.pem")
        with open(cert_path, "rb") as f:
            good = f.read()
        with open(cert_path, "wb") as f:
            f.write(good[: len(good) // 3])
        self.clock.advance(5.1)
        self.assertIs(store.current, first)
        self.assertTrue(store.ready)
        warnings = [e for e in logged if "not refreshed" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["log_level"], LogLevel.warn)
        self.assertIn("cert.pem", warnings[0]["error"])
        # Unchanged files are not reread (or re-logged) on every poll.
        self.clock.advance(5.1)
        self.assertEqual(len([e for e in logged if "not refreshed" in e.get("log_format", "")]), 1)

        # A new certificate next to the old key: mismatched, so still the last good identity.
        saved_key = os.path.join(self.dir, "saved-key.pem")
        shutil.copy(os.path.join(self.dir, "key.pem"), saved_key)
        ca.issue_leaf(self.dir, WEB)
        new_key = os.path.join(self.dir, "new-key.pem")
        os.replace(os.path.join(self.dir, "key.pem"), new_key)
        os.replace(saved_key, os.path.join(self.dir, "key.pem"))
        self.clock.advance(5.1)
        self.assertIs(store.current, first)

        os.replace(new_key, os.path.join(self.dir, "key.pem"))
        self.clock.advance(5.1)
        self.assertIsNot(store.current, first)
        self.assertEqual(store.current.generation, first.generation + 1)

    def test_anchor_rotation(self):
        """
        A changed ca.pem is picked up: a bundle holding the old and a new anchor keeps the current
        leaf valid while adding trust in the new domain.
        """
        store = self.make_store()
        first = store.start()
        other = self.mktemp()
        new_anchor = ca.init_trust_domain(other)
        from cryptography.hazmat.primitives.serialization import Encoding
        with open(os.path.join(self.dir, "ca.pem"), "ab") as f:
            f.write(new_anchor.public_bytes(Encoding.PEM))
        self.clock.advance(5.1)
        self.assertEqual(len(store.current.anchors), 2)
        self.assertEqual(store.current.anchors[1], new_anchor)
        self.assertEqual(store.current.generation, first.generation + 1)

    def test_name_mismatch_is_an_error(self):
        """
        Without an issuer, a cert.pem for another name is an error at start, naming both identities.
        """
        ca.issue_leaf(self.dir, API)
        os.remove(os.path.join(self.dir, "issuer-key.pem"))
        store = self.make_store()
        e = self.assertRaises(ca.IdentityError, store.start)
        self.assertIn(API, str(e))
        self.assertIn(WEB, str(e))
        self.assertFalse(store.ready)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_foreign_cert_with_issuer_self_issues(self):
        """
        With an issuer at hand, a cert.pem for another proxy's name is ignored and the store issues its
        own leaf.
        """
        ca.issue_leaf(self.dir, API)
        identity = self.make_store().start()
        self.assertTrue(identity.self_issued)
        self.assertEqual(ca.dns_names(identity.leaf), [WEB])

    def test_untrusted_files_refused(self):
        """
        A leaf from another trust domain's issuer does not verify against ca.pem and is refused.
        """
        other = self.mktemp()
        ca.init_trust_domain(other)
        ca.issue_leaf(other, WEB)
        for filename in ("cert.pem", "key.pem"):
            shutil.copy(os.path.join(other, filename), os.path.join(self.dir, filename))
        os.remove(os.path.join(self.dir, "issuer.pem"))
        e = self.assertRaises(ca.IdentityError, self.make_store().start)
        self.assertIn("does not verify", str(e))

    def test_outside_trust_domain(self):
        """
        A store asked to self-issue for a name outside the issuer's trust domain fails clearly at start.
        """
        store = self.make_store("web.default.serviceaccount.identity.example.org")
        e = self.assertRaises(ca.IdentityError, store.start)
        self.assertIn("trust domain", str(e))

    def test_stop_cancels_timers(self):
        """
        stop() cancels the poll and the renewal; nothing is left on the clock.
        """
        store = self.make_store()
        store.start()
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        store.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_shared_metrics(self):
        """
        Two stores can share one Metrics registry: the gauge and counter are registered once.
        """
        self.make_store(WEB).start()
        self.make_store(API).start()
        self.assertEqual(self.sample("identity_cert_refresh_total"), 2)

    def test_bad_parameters(self):
        """
        Nonsense lifetimes, renewal fractions and names are refused at construction.
        """
        self.assertRaises(ValueError, IdentityStore, self.dir, WEB, reactor=self.clock, renew_fraction=1.5)
        self.assertRaises(ValueError, IdentityStore, self.dir, WEB, reactor=self.clock, lifetime=0)
        self.assertRaises(ca.IdentityError, IdentityStore, self.dir, "Not A Name", reactor=self.clock)
