"""
Tests for L{linkproxy.core.policy}.
"""

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from linkproxy.config import POLICY_MODES
from linkproxy.core.policy import MODES, REASONS, authorize, requires_client_cert

WEB = "web.default.serviceaccount.identity.linkproxy.local"
API = "api.default.serviceaccount.identity.linkproxy.local"


class AuthorizeTests(SynchronousTestCase):
    """
    L{authorize} for each mode and kind of client.
    """

    def test_modes_match_config(self):
        """
        The modes are the ones the configuration accepts.
        """
        self.assertEqual(sorted(MODES), sorted(POLICY_MODES))

    def test_unauthenticated(self):
        """
        C{unauthenticated} admits plaintext, anonymous TLS and meshed clients.
        """
        for client_id, tls in ((None, "false"), (None, "true"), (API, "true"), (None, False)):
            self.assertEqual(authorize("unauthenticated", (), client_id, tls), (True, "unauthenticated"))

    def test_authenticated(self):
        """
        C{authenticated} admits only mTLS with a verified client identity.
        """
        self.assertEqual(authorize("authenticated", (), API, "true"), (True, "authenticated"))
        self.assertEqual(authorize("authenticated", (), API, True), (True, "authenticated"))
        self.assertEqual(authorize("authenticated", (), None, "true"), (False, "no_client_id"))
        self.assertEqual(authorize("authenticated", (), None, "false"), (False, "no_tls"))

    def test_plaintext_refused_when_mtls_required(self):
        """
        A plaintext connection is refused under C{authenticated} and C{allow}, even if something claims a
        client identity for it: without TLS no identity was verified.
        """
        for mode in ("authenticated", "allow"):
            self.assertEqual(authorize(mode, (API,), API, "false"), (False, "no_tls"))
            self.assertEqual(authorize(mode, (API,), API, False), (False, "no_tls"))
            self.assertEqual(authorize(mode, (API,), None, "false"), (False, "no_tls"))

    def test_allow_list(self):
        """
        C{allow} admits listed identities only.
        """
        allow = frozenset({API})
        self.assertEqual(authorize("allow", allow, API, "true"), (True, "allowed"))
        self.assertEqual(authorize("allow", allow, WEB, "true"), (False, "not_allowed"))
        self.assertEqual(authorize("allow", allow, None, "true"), (False, "no_client_id"))
        self.assertEqual(authorize("allow", (), API, "true"), (False, "not_allowed"))

    def test_deny(self):
        """
        C{deny} refuses everyone, meshed or not.
        """
        self.assertEqual(authorize("deny", (API,), API, "true"), (False, "deny"))
        self.assertEqual(authorize("deny", (), None, "false"), (False, "deny"))

    def test_unknown_mode(self):
        """
        An unknown mode is an error, never a silent allow.
        """
        self.assertRaises(ValueError, authorize, "allow-all", (), API, "true")
        self.assertRaises(ValueError, requires_client_cert, "bogus")

    @given(st.sampled_from(MODES), st.lists(st.sampled_from([API, WEB]), max_size=2),
           st.sampled_from([None, "", API, WEB]), st.sampled_from(["true", "false", True, False]))
    def test_reasons_closed_and_consistent(self, mode, allow, client_id, tls):
        """
        Every decision gives a reason from L{REASONS}; nothing is admitted under C{authenticated} or C{allow}
        without TLS and an identity, and C{allow} never admits an identity missing from its list.
        """
        allowed, reason = authorize(mode, allow, client_id, tls)
        self.assertIn(reason, REASONS)
        if mode in ("authenticated", "allow") and allowed:
            self.assertIn(tls, ("true", True))
            self.assertTrue(client_id)
        if mode == "allow" and allowed:
            self.assertIn(client_id, allow)
        if mode == "deny":
            self.assertFalse(allowed)

    def test_requires_client_cert(self):
        """
        Only C{unauthenticated} lets a TLS client without a certificate through the handshake.
        """
        self.assertEqual({m: requires_client_cert(m) for m in MODES},
                         {"unauthenticated": False, "authenticated": True, "allow": True, "deny": True})
