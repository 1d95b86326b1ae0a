"""
Tests for L{linkproxy.core.classify}: which responses count against an endpoint's health.
"""

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from linkproxy.core.classify import FAILURE, NEUTRAL, SUCCESS, is_failure, outcome

pure = settings(derandomize=True, database=None, deadline=None, max_examples=200)


class IsFailureTests(SynchronousTestCase):
    """
    L{is_failure}: any 5xx, and gRPC INTERNAL or UNAVAILABLE; nothing else.
    """

    TABLE = [
        # (status, grpc-status, failure?)
        (200, "", False),
        (204, "", False),
        (301, "", False),
        (400, "", False),
        (403, "", False),
        (404, "", False),
        (429, "", False),
        (499, "", False),
        (500, "", True),
        (502, "", True),
        (503, "", True),
        (504, "", True),
        (599, "", True),
        (200, "0", False),
        (200, "1", False),   # CANCELLED
        (200, "2", False),   # UNKNOWN
        (200, "4", False),   # DEADLINE_EXCEEDED
        (200, "5", False),   # NOT_FOUND
        (200, "7", False),   # PERMISSION_DENIED
        (200, "8", False),   # RESOURCE_EXHAUSTED
        (200, "13", True),   # INTERNAL
        (200, "14", True),   # UNAVAILABLE
        (200, "15", False),  # DATA_LOSS
        (200, 13, True),
        (200, 14, True),
        (200, 0, False),
        (200, 2, False),
        (200, None, False),
        (503, "0", True),
        (404, "14", True),
    ]

    def test_table(self):
        """
        Each row of the classification table comes out as documented.
        """
        for status, grpc_status, expected in self.TABLE:
            self.assertIs(is_failure(status, grpc_status), expected, (status, grpc_status))

    def test_outcome(self):
        """
        L{outcome} is the C{release} value for a response: C{False} for a failure, C{True} otherwise; the named
        constants are the three C{release} values.
        """
        self.assertEqual((SUCCESS, FAILURE, NEUTRAL), (True, False, None))
        self.assertIs(outcome(200, ""), True)
        self.assertIs(outcome(500, ""), False)
        self.assertIs(outcome(200, "14"), False)
        self.assertIs(outcome(404, ""), True)

    @pure
    @given(st.integers(min_value=100, max_value=999), st.integers(min_value=0, max_value=20))
    def test_anyStatus(self, status, code):
        """
        For every status and gRPC code, the text and integer forms agree, and the answer is exactly
        "5xx or 13 or 14".
        """
        expected = status >= 500 or code in (13, 14)
        self.assertIs(is_failure(status, str(code)), expected)
        self.assertIs(is_failure(status, code), expected)
