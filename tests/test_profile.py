"""
Tests for the pure pieces of profiles: L{linkproxy.core.profile} (format, validation, route matching),
L{linkproxy.core.retry_budget}, L{linkproxy.core.split} and C{grpc-timeout} parsing.
"""

import re
from fractions import Fraction
from random import Random

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from linkproxy.core.grpc import parse_grpc_timeout
from linkproxy.core.profile import (
    DEFAULT_ROUTE,
    MAX_ROUTES,
    BudgetSpec,
    Profile,
    ProfileError,
    Route,
    SplitLeg,
    parse_profiles,
    request_path,
)
from linkproxy.core.retry_budget import RetryBudget
from linkproxy.core.split import Splitter

FULL = {
    "Web.Test:80": {
        "retry_budget": {"ratio": 0.3, "min_per_second": 5, "ttl": "20s"},
        "routes": [
            {"name": "api-read", "match": {"method": "get", "path_regex": "^/api/"}, "timeout": "2s",
             "retryable": True},
            {"name": "writes", "match": {"method": "POST"}, "timeout": "500ms"},
            {"name": "health", "match": {"path_regex": "healthz$"}, "timeout": 1.5},
            {"name": "anything"},
        ],
        "split": [{"target": "Web-V1.test:80", "weight": 90}, {"target": "web-v2.test:80", "weight": 10},
                  {"target": "web-v3.test:80", "weight": 0}],
    },
    "bare.test:81": None,
}


class ParseProfilesTests(SynchronousTestCase):
    """
    L{parse_profiles}: the format, its defaults, and every problem reported at once.
    """

    def test_full(self):
        """
        Every key is read: targets and split targets are normalised, methods upper-cased, regexes compiled to
        bytes patterns, durations parsed; an empty profile gets the defaults.
        """
        profiles = parse_profiles(FULL)
        self.assertEqual(sorted(profiles), ["bare.test:81", "web.test:80"])
        web = profiles["web.test:80"]
        self.assertEqual(web.target, "web.test:80")
        self.assertEqual(web.retry_budget, BudgetSpec(ratio=0.3, min_per_second=5.0, ttl=20.0))
        self.assertEqual([r.name for r in web.routes], ["api-read", "writes", "health", "anything"])
        api = web.routes[0]
        self.assertEqual((api.method, api.path_regex, api.timeout, api.retryable),
                         (b"GET", re.compile(b"^/api/"), 2.0, True))
        self.assertEqual((web.routes[1].timeout, web.routes[1].retryable), (0.5, False))
        self.assertEqual(web.routes[2].timeout, 1.5)
        self.assertEqual(web.routes[3], Route("anything"))
        self.assertEqual(web.split, (SplitLeg("web-v1.test:80", 90), SplitLeg("web-v2.test:80", 10),
                                     SplitLeg("web-v3.test:80", 0)))
        self.assertEqual(profiles["bare.test:81"], Profile("bare.test:81"))
        self.assertEqual(BudgetSpec(), BudgetSpec(ratio=0.2, min_per_second=10.0, ttl=10.0))

    def test_none(self):
        """
        No section, or an empty one, is no profiles.
        """
        self.assertEqual(parse_profiles(None), {})
        self.assertEqual(parse_profiles({}), {})

    def test_everyProblem(self):
        """
        Every problem is listed at once, each with the path to it.
        """
        bad = {
            "web.test:80": {
                "retry_budget": {"ratio": -1, "min_per_second": "lots", "ttl": "90s", "burst": 3},
                "routes": [
                    {"name": "a", "match": {"method": "GET ME", "path_regex": "(", "host": "x"},
                     "timeout": "soon", "retryable": "yes"},
                    {"name": "a"},
                    {"name": ""},
                    {"name": "default"},
                    {"timeout": 0},
                    "not a route",
                ],
                "split": [{"target": "nope", "weight": -1}, {"target": "v2.test:80", "weight": 1.5},
                          {"target": "v2.test:80", "weight": 1, "extra": 1}],
                "color": "blue",
            },
            "web.test:80 ": {},
            "bad target": {},
            "zero.test:80": {"split": [{"target": "a.test:80", "weight": 0}]},
            "list.test:80": [],
        }
        with self.assertRaises(ProfileError) as caught:
            parse_profiles(bad)
        problems = caught.exception.problems
        expected = [
            "profiles.web.test:80: unknown keys ['color']",
            "profiles.web.test:80.retry_budget: unknown keys ['burst']",
            "profiles.web.test:80.retry_budget.ratio: expected a number from 0 to 1000, got -1",
            "profiles.web.test:80.retry_budget.min_per_second: expected a number from 0 to 1e9, got 'lots'",
            "profiles.web.test:80.retry_budget.ttl: must be from 1s to 60s, got '90s'",
            "profiles.web.test:80.routes[0].match: unknown keys ['host']",
            "profiles.web.test:80.routes[0].match.method: expected an HTTP method",
            "profiles.web.test:80.routes[0].match.path_regex: not a valid regular expression",
            "profiles.web.test:80.routes[0].timeout: expected a duration > 0",
            "profiles.web.test:80.routes[0].retryable: expected true or false",
            "profiles.web.test:80.routes[2].name: expected a non-empty name",
            "profiles.web.test:80.routes[3].name: 'default' is the name",
            "profiles.web.test:80.routes[4].name: expected a non-empty name",
            "profiles.web.test:80.routes[4].timeout: expected a duration > 0",
            "profiles.web.test:80.routes[5]: expected a mapping",
            "profiles.web.test:80.split[0].target: ",
            "profiles.web.test:80.split[0].weight: expected a whole number",
            "profiles.web.test:80.split[1].weight: expected a whole number",
            "profiles.web.test:80.split[2]: unknown keys ['extra']",
            "profiles.web.test:80.split[2].target: v2.test:80 is listed twice",
            "profiles.web.test:80 : listed twice",
            "profiles.bad target: ",
            "profiles.zero.test:80.split: at least one leg needs a weight above 0",
            "profiles.list.test:80: expected a mapping",
        ]
        for start in expected:
            self.assertTrue(any(p.startswith(start) for p in problems), f"{start!r} not in {problems}")
        # routes[1] ("a" again) only fails as a duplicate once routes[0] parses; here routes[0] is bad itself.
        self.assertNotIn("routes[1]", str(caught.exception))
        self.assertEqual(len(problems), len(expected))

    def test_duplicateRouteName(self):
        """
        Route names are unique per target.
        """
        with self.assertRaises(ProfileError) as caught:
            parse_profiles({"w:80": {"routes": [{"name": "a"}, {"name": "b"}, {"name": "a"}]}})
        self.assertEqual(caught.exception.problems,
                         ["profiles.w:80.routes[2].name: 'a' is also the name of route [0] (names are unique "
                          "per target)"])

    def test_notAMapping(self):
        """
        A section that is not a mapping is one problem.
        """
        self.assertRaises(ProfileError, parse_profiles, ["w:80"])
        self.assertRaises(ProfileError, parse_profiles, "w:80")

    def test_bounds(self):
        """
        Routes per profile and split legs are bounded; the message says by how much.
        """
        routes = [{"name": f"r{i}"} for i in range(MAX_ROUTES + 1)]
        with self.assertRaises(ProfileError) as caught:
            parse_profiles({"w:80": {"routes": routes}})
        self.assertIn("over the limit of 1000", str(caught.exception))
        legs = [{"target": f"v{i}.test:80", "weight": 1} for i in range(101)]
        with self.assertRaises(ProfileError) as caught:
            parse_profiles({"w:80": {"split": legs}})
        self.assertIn("101 legs, over the limit of 100", str(caught.exception))
        self.assertEqual(len(parse_profiles({"w:80": {"routes": routes[:MAX_ROUTES]}})["w:80"].routes),
                         MAX_ROUTES)

    def test_durations(self):
        """
        Durations accept numbers (seconds) and C{s}, C{ms}, C{m}, C{h} suffixes; the budget's ttl is bounded
        to Linkerd's 1..60 s.
        """
        for text, seconds in [("2s", 2.0), ("500ms", 0.5), ("1.5", 1.5), (3, 3.0), (0.25, 0.25), ("1m", 60.0)]:
            route = parse_profiles({"w:80": {"routes": [{"name": "r", "timeout": text}]}})["w:80"].routes[0]
            self.assertEqual(route.timeout, seconds)
        for bad in ["0s", -1, "2 days", True, [], "nan"]:
            self.assertRaises(ProfileError, parse_profiles, {"w:80": {"routes": [{"name": "r", "timeout": bad}]}})
        self.assertEqual(parse_profiles({"w:80": {"retry_budget": {"ttl": "1s"}}})["w:80"].retry_budget.ttl, 1.0)
        self.assertEqual(parse_profiles({"w:80": {"retry_budget": {"ttl": 60}}})["w:80"].retry_budget.ttl, 60.0)
        for bad in ["999ms", "61s"]:
            self.assertRaises(ProfileError, parse_profiles, {"w:80": {"retry_budget": {"ttl": bad}}})
        self.assertEqual(parse_profiles({"w:80": {"retry_budget": {"ratio": 1000}}})["w:80"].retry_budget.ratio,
                         1000.0)
        self.assertRaises(ProfileError, parse_profiles, {"w:80": {"retry_budget": {"ratio": 1000.5}}})


class RouteTests(SynchronousTestCase):
    """
    Route matching: first match wins, the method exactly, the regex searched in the path.
    """

    def setUp(self):
        self.profile = parse_profiles(FULL)["web.test:80"]

    def test_routeFor(self):
        """
        The first route that matches is the request's route.
        """
        route = self.profile.route_for
        self.assertEqual(route(b"GET", b"/api/users").name, "api-read")
        self.assertEqual(route(b"POST", b"/api/users").name, "writes")
        self.assertEqual(route(b"GET", b"/x/healthz").name, "health")
        self.assertEqual(route(b"GET", b"/healthz/not").name, "anything")
        self.assertEqual(route(b"get", b"/api/users").name, "anything")

    def test_default(self):
        """
        A request no route matches is on the C{default} route; a profile without routes always answers it.
        """
        profile = parse_profiles({"w:80": {"routes": [{"name": "only", "match": {"method": "PUT"}}]}})["w:80"]
        self.assertIs(profile.route_for(b"GET", b"/"), DEFAULT_ROUTE)
        self.assertIs(Profile("w:80").route_for(b"GET", b"/"), DEFAULT_ROUTE)
        self.assertEqual((DEFAULT_ROUTE.name, DEFAULT_ROUTE.timeout, DEFAULT_ROUTE.retryable),
                         ("default", None, False))

    def test_searchNotMatch(self):
        """
        The regex is searched (unanchored), as Linkerd's path regex is.
        """
        route = Route("r", path_regex=re.compile(b"users"))
        self.assertTrue(route.matches(b"GET", b"/api/users/1"))
        self.assertFalse(route.matches(b"GET", b"/api/groups"))

    def test_requestPath(self):
        """
        L{request_path} drops the query string and, for absolute-form targets, the scheme and authority.
        """
        cases = [
            (b"/api/users?id=1", b"/api/users"),
            (b"/api/users", b"/api/users"),
            (b"/", b"/"),
            (b"/a#frag", b"/a"),
            (b"http://web.test:80/p?q", b"/p"),
            (b"https://web.test/p/q", b"/p/q"),
            (b"http://web.test:80", b"/"),
            (b"http://web.test:80?q", b"/"),
            (b"*", b"*"),
            (b"", b""),
        ]
        for target, path in cases:
            self.assertEqual(request_path(target), path, target)


class RetryBudgetTests(SynchronousTestCase):
    """
    L{RetryBudget}: tower's C{TpsBudget} semantics, with exact ratios.
    """

    def test_reserve(self):
        """
        With no requests, the reserve (C{min_per_second * ttl}) allows that many retries per ttl.
        """
        budget = RetryBudget(BudgetSpec(ratio=1.0, min_per_second=5, ttl=1), 0.0)
        self.assertEqual([budget.withdraw(0.0) for _ in range(6)], [True] * 5 + [False])
        # The withdrawals expire with their slot, a ttl later.
        self.assertFalse(budget.withdraw(0.95))
        self.assertTrue(budget.withdraw(1.0))

    def test_empty(self):
        """
        No reserve and no deposits: no retry.
        """
        self.assertFalse(RetryBudget(BudgetSpec(ratio=1.0, min_per_second=0, ttl=1), 0.0).withdraw(0.0))

    def test_ratio(self):
        """
        Each request earns C{ratio} retries: 0.2 is one per five requests, 0.3 three per ten, exactly.
        """
        budget = RetryBudget(BudgetSpec(ratio=0.2, min_per_second=0, ttl=10), 0.0)
        for _ in range(4):
            budget.deposit(1.0)
        self.assertFalse(budget.withdraw(1.0))
        budget.deposit(1.0)
        self.assertTrue(budget.withdraw(1.0))
        self.assertFalse(budget.withdraw(1.0))
        budget = RetryBudget(BudgetSpec(ratio=0.3, min_per_second=0, ttl=10), 0.0)
        for _ in range(10):
            budget.deposit(2.0)
        self.assertEqual([budget.withdraw(2.0) for _ in range(4)], [True, True, True, False])
        budget = RetryBudget(BudgetSpec(ratio=2.5, min_per_second=0, ttl=10), 0.0)
        budget.deposit(0.0)
        budget.deposit(0.0)
        self.assertEqual([budget.withdraw(0.0) for _ in range(6)], [True] * 5 + [False])

    def test_leaky(self):
        """
        A deposit no longer counts once its ttl has passed (tower's C{tps_leaky}).
        """
        budget = RetryBudget(BudgetSpec(ratio=1.0, min_per_second=0, ttl=1), 0.0)
        budget.deposit(0.0)
        self.assertFalse(budget.withdraw(3.0))

    def test_slots(self):
        """
        Deposits count for their slot's lifetime, and later ones combine with them (tower's C{tps_slots}).
        """
        budget = RetryBudget(BudgetSpec(ratio=0.5, min_per_second=0, ttl=1), 0.0)
        budget.deposit(0.0)
        budget.deposit(0.0)
        self.assertTrue(budget.withdraw(0.901))
        budget.deposit(2.902)
        budget.deposit(3.203)
        budget.deposit(4.004)
        self.assertTrue(budget.withdraw(4.004))
        self.assertFalse(budget.withdraw(4.004))

    def test_clockBack(self):
        """
        A clock that steps back counts into the current slot and resurrects nothing.
        """
        budget = RetryBudget(BudgetSpec(ratio=1.0, min_per_second=0, ttl=1), 100.0)
        budget.deposit(100.0)
        self.assertTrue(budget.withdraw(50.0))
        self.assertFalse(budget.withdraw(100.0))
        self.assertEqual(budget.available(102.0), 0.0)

    def test_invalid(self):
        """
        A spec that L{parse_profiles} would refuse is refused here too.
        """
        self.assertRaises(ValueError, RetryBudget, BudgetSpec(ttl=0), 0.0)
        self.assertRaises(ValueError, RetryBudget, BudgetSpec(ratio=-1), 0.0)

    @settings(max_examples=200, deadline=None)
    @given(
        ratio=st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5]),
        minimum=st.sampled_from([0, 1, 2.5, 10]),
        ttl=st.sampled_from([1.0, 3.0, 10.0]),
        events=st.lists(st.tuples(st.floats(min_value=0, max_value=2.0), st.booleans()), max_size=300),
    )
    def test_neverOverspends(self, ratio, minimum, ttl, events):
        """
        Over any stretch of time no longer than 0.9 ttl (the window moves in tenths), the retries allowed
        never exceed C{min_per_second * ttl} plus C{ratio} times the requests of the ttl before its end.
        """
        spec = BudgetSpec(ratio=ratio, min_per_second=minimum, ttl=ttl)
        budget = RetryBudget(spec, 0.0)
        now = 0.0
        deposits, retries = [], []
        for step, is_request in events:
            now += step
            if is_request:
                budget.deposit(now)
                deposits.append(now)
            elif budget.withdraw(now):
                retries.append(now)
        reserve = Fraction(str(float(minimum))) * Fraction(str(ttl))
        # A nanosecond of slack on each edge: slot boundaries are computed in floats.
        for end in retries:
            in_stretch = sum(1 for t in retries if end - 0.9 * ttl + 1e-9 <= t <= end)
            earned = sum(1 for t in deposits if end - ttl - 1e-9 < t <= end)
            self.assertLessEqual(in_stretch, reserve + Fraction(str(ratio)) * earned)

    @settings(max_examples=100, deadline=None)
    @given(
        ratio=st.sampled_from([0.0, 0.2, 1.0]),
        minimum=st.sampled_from([0, 0.1, 1, 10]),
        steps=st.lists(st.floats(min_value=0, max_value=30.0), max_size=200),
    )
    def test_depositsOnly(self, ratio, minimum, steps):
        """
        With no retries, deposits (over monotone time) never fail, the balance never falls below the reserve
        and never exceeds reserve plus C{ratio} times all deposits; so a first retry goes whenever one is due.
        """
        spec = BudgetSpec(ratio=ratio, min_per_second=minimum, ttl=10.0)
        budget = RetryBudget(spec, 0.0)
        now = 0.0
        reserve = minimum * 10.0
        for count, step in enumerate(steps, 1):
            now += step
            budget.deposit(now)
            available = budget.available(now)
            self.assertGreaterEqual(available, reserve - 1e-9)
            self.assertLessEqual(available, reserve + ratio * count + 1e-9)
        if reserve >= 1:
            self.assertTrue(budget.withdraw(now))


class SplitterTests(SynchronousTestCase):
    """
    L{Splitter}: weighted picks, weight-0 legs skipped.
    """

    def test_ninetyTen(self):
        """
        A 90/10 split lands within 3% of its weights over 2,000 picks.
        """
        splitter = Splitter((SplitLeg("v1:80", 90), SplitLeg("v2:80", 10)))
        for seed in range(20):
            rng = Random(seed)
            picks = [splitter.pick(rng) for _ in range(2000)]
            share = picks.count("v1:80") / 2000
            self.assertTrue(0.87 <= share <= 0.93, (seed, share))

    def test_fiftyFifty(self):
        """
        Equal weights share equally (within 3% over 2,000).
        """
        splitter = Splitter((SplitLeg("v1:80", 50), SplitLeg("v2:80", 50)))
        rng = Random(7)
        share = [splitter.pick(rng) for _ in range(2000)].count("v1:80") / 2000
        self.assertTrue(0.47 <= share <= 0.53, share)

    def test_zeroWeight(self):
        """
        Weight-0 legs are never picked; one live leg needs no draw.
        """
        splitter = Splitter((SplitLeg("v0:80", 0), SplitLeg("v1:80", 3), SplitLeg("v2:80", 0)))
        self.assertEqual(splitter.targets, ("v1:80",))

        class NoDraws(Random):
            def random(self):
                raise AssertionError("drew")

        self.assertEqual({splitter.pick(NoDraws()) for _ in range(10)}, {"v1:80"})
        splitter = Splitter((SplitLeg("a:1", 1), SplitLeg("z:1", 0), SplitLeg("b:1", 1)))
        rng = Random(1)
        self.assertEqual({splitter.pick(rng) for _ in range(200)}, {"a:1", "b:1"})

    def test_noLiveLeg(self):
        """
        A split with no weight above 0 is refused.
        """
        self.assertRaises(ValueError, Splitter, (SplitLeg("a:1", 0),))
        self.assertRaises(ValueError, Splitter, ())

    @given(weights=st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=8))
    def test_exactShares(self, weights):
        """
        Every draw maps to the leg whose cumulative range holds it: over one draw per value, each leg is
        picked exactly its weight in times.
        """
        legs = tuple(SplitLeg(f"v{i}:80", w) for i, w in enumerate(weights))
        if not any(weights):
            self.assertRaises(ValueError, Splitter, legs)
            return
        splitter = Splitter(legs)

        total = sum(weights)

        class Sweep(Random):
            # The middle of each unit of [0, total) in turn.
            def __init__(self):
                self.next = 0

            def random(self):
                value, self.next = self.next, self.next + 1
                return (value + 0.5) / total

        sweep = Sweep()
        picks = [splitter.pick(sweep) for _ in range(total)]
        if len([w for w in weights if w]) == 1:
            self.assertEqual(set(picks), {legs[weights.index(max(weights))].target})
        else:
            for leg in legs:
                self.assertEqual(picks.count(leg.target), leg.weight)


class GrpcTimeoutTests(SynchronousTestCase):
    """
    L{parse_grpc_timeout}: the gRPC over HTTP/2 form, and C{None} for anything else.
    """

    def test_units(self):
        """
        Each unit converts to seconds.
        """
        cases = [(b"1H", 3600.0), (b"2M", 120.0), (b"3S", 3.0), (b"250m", 0.25), (b"1500u", 0.0015),
                 (b"99999999n", 0.099999999), (b"0m", 0.0), (b"00000001S", 1.0), (b" 5S\t", 5.0)]
        for value, seconds in cases:
            self.assertAlmostEqual(parse_grpc_timeout(value), seconds, places=12, msg=value)

    def test_invalid(self):
        """
        No digits, more than 8, a sign, a space inside, a missing or unknown unit: C{None}.
        """
        for value in [b"", b"S", b"5", b"123456789S", b"-5S", b"+5S", b"5 S", b"5s", b"5h", b"5X", b"1.5S",
                      b"\xd9\xa1S", b"5SS"]:
            self.assertIsNone(parse_grpc_timeout(value), value)
