"""
Tests for live profiles: L{linkproxy.discovery.profiles.Profiles}, the endpoints file's C{profiles:} section
through L{FileDiscovery} (a real temp file, polled by a L{Clock}), and how the process wires them into its
L{Runtime}.
"""

import os

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import Logger, globalLogPublisher
from twisted.trial import unittest

from linkproxy.admin.metrics import Metrics
from linkproxy.core.profile import BudgetSpec, Profile, Route, SplitLeg
from linkproxy.discovery import build_discovery, discovery_profiles
from linkproxy.discovery.file import EndpointsFileError, FileDiscovery, parse_endpoints, parse_endpoints_file
from linkproxy.discovery.profiles import Profiles
from linkproxy.discovery.static import StaticDiscovery
from linkproxy.runtime import Runtime

SERVICES = b"""\
services:
  web.test:80:
    - addr: 127.0.0.1:8081
  web-v1.test:80:
    - addr: 127.0.0.1:8091
  web-v2.test:80:
    - addr: 127.0.0.1:8092
"""

PROFILES = b"""\
profiles:
  web.test:80:
    retry_budget: {ratio: 0.2, min_per_second: 10, ttl: 10s}
    routes:
      - name: api-read
        match: {method: GET, path_regex: "^/api/"}
        timeout: 2s
        retryable: true
    split:
      - {target: web-v1.test:80, weight: 90}
      - {target: web-v2.test:80, weight: 10}
"""


def errors(metrics):
    return metrics.registry.get_sample_value("discovery_errors_total", {"backend": "file"}) or 0.0


class ProfilesTests(unittest.SynchronousTestCase):
    """
    L{Profiles}: lookups by any spelling, budgets kept across edits, splitters cached per profile.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.web = Profile("web.test:80", routes=(Route("r"),),
                           split=(SplitLeg("web-v1.test:80", 90), SplitLeg("web-v2.test:80", 10)))
        self.profiles = Profiles({"web.test:80": self.web}, clock=self.clock)

    def test_empty(self):
        """
        Without profiles every lookup is C{None}, and nothing is remembered.
        """
        profiles = Profiles()
        self.assertIsNone(profiles.get("web.test:80"))
        self.assertIsNone(profiles.get("not a target"))
        self.assertIsNone(profiles.splitter("web.test:80"))
        self.assertEqual((len(profiles), profiles.targets(), profiles._spellings), (0, [], {}))

    def test_spellings(self):
        """
        Any spelling discovery accepts finds the profile; a malformed or unknown target finds none; each
        spelling is remembered, the answer too.
        """
        for spelling in ["web.test:80", "WEB.Test:80", "web.test.:80", " web.test:80"]:
            self.assertIs(self.profiles.get(spelling), self.web)
        for other in ["other.test:80", "web.test:81", "web.test", "", "web.test:http"]:
            self.assertIsNone(self.profiles.get(other))
        self.assertIn("WEB.Test:80", self.profiles._spellings)
        self.assertIsNone(self.profiles._spellings["other.test:80"])

    def test_spellingsBounded(self):
        """
        The memory of spellings is bounded: past the limit it starts over.
        """
        profiles = Profiles({"web.test:80": self.web}, max_spellings=3)
        for i in range(10):
            profiles.get(f"host{i}:80")
        self.assertLessEqual(len(profiles._spellings), 3)
        self.assertIs(profiles.get("Web.test:80"), self.web)

    def test_replace(self):
        """
        L{Profiles.replace} applies at once, to every spelling.
        """
        self.assertIs(self.profiles.get("WEB.test:80"), self.web)
        other = Profile("other.test:80")
        self.profiles.replace({"other.test:80": other})
        self.assertIsNone(self.profiles.get("WEB.test:80"))
        self.assertIs(self.profiles.get("Other.test:80"), other)
        self.assertEqual((self.profiles.targets(), self.profiles.generation), (["other.test:80"], 2))

    def test_budgetSurvivesEdits(self):
        """
        A target's budget is made once, starting at the clock's time, and is kept by edits that leave its
        C{retry_budget} alone; an edit that changes it, or removes the profile, starts a new one.
        """
        budget = self.profiles.budget("Web.test:80")
        self.assertIs(self.profiles.budget("web.test:80"), budget)
        self.assertEqual(budget.spec, BudgetSpec())
        for _ in range(100):
            self.assertTrue(budget.withdraw(self.clock.seconds()))
        self.assertFalse(budget.withdraw(self.clock.seconds()))

        edited = Profile("web.test:80", routes=(Route("r2"),))
        self.profiles.replace({"web.test:80": edited})
        self.assertIs(self.profiles.budget("web.test:80"), budget)

        changed = Profile("web.test:80", retry_budget=BudgetSpec(ratio=0.5))
        self.profiles.replace({"web.test:80": changed})
        fresh = self.profiles.budget("web.test:80")
        self.assertIsNot(fresh, budget)
        self.assertEqual(fresh.spec, BudgetSpec(ratio=0.5))
        self.assertTrue(fresh.withdraw(self.clock.seconds()))

        self.profiles.replace({})
        self.assertEqual(self.profiles.budget("web.test:80").spec, BudgetSpec())
        self.assertIsNot(self.profiles.budget("web.test:80"), fresh)

    def test_splitter(self):
        """
        The splitter is built once per profile, and again after an edit; no split, or no profile, is C{None}.
        """
        splitter = self.profiles.splitter("WEB.test:80")
        self.assertEqual(splitter.targets, ("web-v1.test:80", "web-v2.test:80"))
        self.assertIs(self.profiles.splitter("web.test:80"), splitter)
        self.assertIsNone(self.profiles.splitter("other.test:80"))
        self.profiles.replace({"web.test:80": Profile("web.test:80", split=(SplitLeg("web-v2.test:80", 1),))})
        self.assertEqual(self.profiles.splitter("web.test:80").targets, ("web-v2.test:80",))
        self.profiles.replace({"web.test:80": Profile("web.test:80")})
        self.assertIsNone(self.profiles.splitter("web.test:80"))


class EndpointsFileProfilesTests(unittest.TestCase):
    """
    The C{profiles:} section of the endpoints file, parsed and applied live by L{FileDiscovery}.
    """

    def setUp(self):
        self.clock = Clock()
        self.path = self.mktemp()
        self.metrics = Metrics(process=False)
        self.mtime = 1_000_000_000 * 10**9
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def write(self, data):
        """
        Write the file and move its mtime on, as an editor would.
        """
        with open(self.path, "wb") as f:
            f.write(data)
        self.mtime += 10**9
        os.utime(self.path, ns=(self.mtime, self.mtime))

    def discovery(self):
        return FileDiscovery(self.path, self.clock, metrics=self.metrics, log=Logger(namespace="test.file"))

    def test_parse(self):
        """
        Both sections are read; a file without C{profiles:} has none.
        """
        parsed = parse_endpoints_file(SERVICES + PROFILES)
        self.assertEqual(sorted(parsed.services), ["web-v1.test:80", "web-v2.test:80", "web.test:80"])
        web = parsed.profiles["web.test:80"]
        self.assertEqual([r.name for r in web.routes], ["api-read"])
        self.assertEqual(web.split, (SplitLeg("web-v1.test:80", 90), SplitLeg("web-v2.test:80", 10)))
        self.assertEqual(parse_endpoints_file(SERVICES).profiles, {})
        self.assertEqual(parse_endpoints_file(SERVICES + b"profiles:\n").profiles, {})
        self.assertEqual(parse_endpoints(SERVICES + PROFILES), parsed.services)

    def test_problemsInBothSections(self):
        """
        Problems in services and profiles are reported together; C{services:} stays required.
        """
        bad = SERVICES.replace(b"8081", b"http") + PROFILES.replace(b"2s", b"soon") + b"extra: 1\n"
        with self.assertRaises(EndpointsFileError) as caught:
            parse_endpoints(bad)
        text = str(caught.exception)
        self.assertIn("invalid port 'http'", text)
        self.assertIn("profiles.web.test:80.routes[0].timeout: expected a duration > 0", text)
        self.assertIn("unknown top-level keys ['extra'] (only ['services', 'profiles'] are read)", text)
        with self.assertRaises(EndpointsFileError) as caught:
            parse_endpoints_file(PROFILES)
        self.assertIn("expected a top-level 'services:' mapping", str(caught.exception))

    def test_liveEdit(self):
        """
        Started, the discovery reads the file at once and polls it with nothing watched: an edit to the
        profiles is seen through L{FileDiscovery.profiles} on the next poll, and a 90/10 split becomes 50/50.
        """
        self.write(SERVICES + PROFILES)
        discovery = self.discovery()
        profiles = discovery.profiles
        self.assertIsNone(profiles.get("web.test:80"))
        discovery.start()
        profile = profiles.get("Web.Test:80")
        self.assertEqual([leg.weight for leg in profile.split], [90, 10])
        self.assertEqual(profile.route_for(b"GET", b"/api/x").timeout, 2.0)

        self.write(SERVICES + PROFILES.replace(b"weight: 90", b"weight: 50").replace(b"weight: 10", b"weight: 50"))
        self.clock.advance(1.0)
        self.assertEqual([leg.weight for leg in profiles.get("web.test:80").split], [50, 50])

        self.write(SERVICES)
        self.clock.advance(1.0)
        self.assertIsNone(profiles.get("web.test:80"))
        self.assertEqual(errors(self.metrics), 0)
        discovery.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_badEditKeepsWholeFile(self):
        """
        A bad profiles section keeps the whole last good file, services too; it is logged and counted once,
        and the next good edit applies both sections.
        """
        from tests.test_discovery import Receiver

        self.write(SERVICES + PROFILES)
        discovery = self.discovery()
        discovery.start()
        web = Receiver()
        discovery.resolve("web.test:80", web)
        self.write(SERVICES.replace(b"8081", b"8089") + PROFILES.replace(b"^/api/", b"(api"))
        for _ in range(3):
            self.clock.advance(1.0)
        self.assertEqual(web.sets, [[("127.0.0.1", 8081)]])
        self.assertEqual(discovery.profiles.get("web.test:80").routes[0].name, "api-read")
        self.assertEqual(errors(self.metrics), 1)
        messages = [e["log_format"].format(**e) for e in self.logged if e.get("log_namespace") == "test.file"
                    and "unusable" in e["log_format"]]
        self.assertEqual(len(messages), 1)
        self.assertIn("keeping the last good version (3 services, 1 profiles)", messages[0])
        self.assertIn("profiles.web.test:80.routes[0].match.path_regex: not a valid regular expression",
                      messages[0])

        self.write(SERVICES.replace(b"8081", b"8089") + PROFILES.replace(b"api-read", b"api"))
        self.clock.advance(1.0)
        self.assertEqual(web.last, [("127.0.0.1", 8089)])
        self.assertEqual(discovery.profiles.get("web.test:80").routes[0].name, "api")

    def test_budgetSurvivesFileEdit(self):
        """
        An edit that keeps a target's retry budget keeps its state.
        """
        self.write(SERVICES + PROFILES)
        discovery = self.discovery()
        discovery.start()
        budget = discovery.profiles.budget("web.test:80")
        self.write(SERVICES + PROFILES.replace(b"timeout: 2s", b"timeout: 3s"))
        self.clock.advance(1.0)
        self.assertEqual(discovery.profiles.get("web.test:80").routes[0].timeout, 3.0)
        self.assertIs(discovery.profiles.budget("web.test:80"), budget)
        discovery.stop()

    def test_startStopWithWatchers(self):
        """
        L{FileDiscovery.stop} leaves polling on while targets are watched; the last cancel then stops it.
        """
        self.write(SERVICES)
        discovery = self.discovery()
        discovery.start()
        discovery.start()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        watch = discovery.resolve("web.test:80", _Null())
        discovery.stop()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(1.0)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        watch.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class _Null:
    def reset(self, endpoints):
        pass


class WiringTests(unittest.TestCase):
    """
    How the process gets its L{Profiles}.
    """

    def test_discoveryProfiles(self):
        """
        C{file:} discovery hands over its own live L{Profiles}; any other backend gets an empty one.
        """
        clock = Clock()
        discovery = build_discovery(f"file:{self.mktemp()}", None, clock)
        self.assertIs(discovery_profiles(discovery), discovery.profiles)
        other = discovery_profiles(StaticDiscovery({}))
        self.assertIsInstance(other, Profiles)
        self.assertEqual(len(other), 0)

    def test_runtimeAlwaysHasProfiles(self):
        """
        A L{Runtime} built without profiles holds an empty L{Profiles}, never C{None}.
        """
        runtime = Runtime(reactor=None, config=None, metrics=None, tracker=None, connector=None)
        self.assertIsInstance(runtime.profiles, Profiles)
        self.assertIsNone(runtime.profiles.get("web.test:80"))
        mine = Profiles()
        self.assertIs(Runtime(None, None, None, None, None, profiles=mine).profiles, mine)

    def test_serviceWiresFileProfiles(self):
        """
        The proxy service gives its runtime the file's profiles, reads the file when it starts, and keeps
        polling it with no traffic.
        """
        from linkproxy.config import parse_config
        from linkproxy.service import make_proxy_service
        from twisted.internet.testing import MemoryReactorClock

        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(SERVICES + PROFILES)
        config = parse_config({"discovery": f"file:{path}", "outbound": "tcp:0:interface=127.0.0.1",
                               "inbound": "tcp:0:interface=127.0.0.1", "admin": "tcp:0:interface=127.0.0.1"},
                              {}, None)
        reactor = MemoryReactorClock()
        service = make_proxy_service(config, reactor)
        profiles = service.runtime.profiles
        self.assertIsNone(profiles.get("web.test:80"))
        service.getServiceNamed("discovery").startService()
        self.assertEqual(profiles.get("web.test:80").routes[0].name, "api-read")
        with open(path, "wb") as f:
            f.write(SERVICES)
        os.utime(path, ns=(10**18, 10**18))
        reactor.advance(1.0)
        self.assertIsNone(profiles.get("web.test:80"))
        service.getServiceNamed("discovery").stopService()

    def test_serviceWithoutFile(self):
        """
        With another discovery backend the runtime's profiles are empty, and no discovery service runs.
        """
        from linkproxy.config import parse_config
        from linkproxy.service import make_proxy_service
        from twisted.internet.testing import MemoryReactorClock

        config = parse_config({"discovery": "static:web.test:80=127.0.0.1:1"}, {}, None)
        service = make_proxy_service(config, MemoryReactorClock())
        self.assertEqual(len(service.runtime.profiles), 0)
        self.assertRaises(KeyError, service.getServiceNamed, "discovery")
