"""
Tests for plugin discovery in L{linkproxy.balancers}, and for the worked examples in C{docs/plugins.md}.

Each test lays out a temporary C{<tmp>/twisted/plugins/} directory and puts it on C{twisted.plugins.__path__},
which is where L{twisted.plugin.getPlugins} looks, exactly as an installed distribution's directory would be.
"""

import importlib
import json
import os
import re
import sys
from random import Random

from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from linkproxy import balancers
from linkproxy.balancers import available_balancers, find_balancer
from linkproxy.core.endpoint import Endpoint
from linkproxy.interfaces import IBalancer, IBalancerFactory, IDiscovery, IDiscoveryFactory, IResolution

EXAMPLE_BALANCER = '''
"""
A test balancer plugin: always the first endpoint with weight.
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from linkproxy.interfaces import IBalancer, IBalancerFactory


@implementer(IBalancer)
class FirstBalancer:
    def __init__(self, random):
        self.random = random
        self.endpoints = []

    def update(self, endpoints, now):
        self.endpoints = [e for e in endpoints if e.weight > 0]

    def pick(self, now):
        return self.endpoints[0] if self.endpoints else None

    def start(self, endpoint, now):
        pass

    def finish(self, endpoint, now, rtt, success):
        pass

    def snapshot(self, now):
        return [(e, "ready", 0.0) for e in self.endpoints]


@implementer(IPlugin, IBalancerFactory)
class ExampleFactory:
    def __init__(self, name):
        self.name = name

    def build(self, random):
        return FirstBalancer(random)


example = ExampleFactory("example")
shadow = ExampleFactory("random")
'''

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "plugins.md")


def docs_examples(text):
    """
    The example modules in C{docs/plugins.md}: C{{module name: source}} for each code block marked
    C{<!-- plugin-example: twisted/plugins/NAME.py -->}.
    """
    pattern = re.compile(r"<!-- plugin-example: twisted/plugins/(\w+)\.py -->\s*```python\n(.*?)```", re.S)
    return {name: source for name, source in pattern.findall(text)}


class Recorder:
    """
    An L{linkproxy.interfaces.IResolutionReceiver} that records every call.
    """

    def __init__(self):
        self.calls = []

    def reset(self, endpoints):
        self.calls.append(("reset", list(endpoints)))

    def add(self, endpoints):
        self.calls.append(("add", list(endpoints)))

    def remove(self, addresses):
        self.calls.append(("remove", list(addresses)))


class PluginDirectoryMixin:
    """
    Install plugin modules into a temporary C{twisted/plugins} directory for one test.
    """

    def install_plugins(self, modules):
        """
        Write C{modules} (C{{name: source}}) into C{<tmp>/twisted/plugins/} and make C{getPlugins} see it.

        Undone by the returned callable, which is also registered as a cleanup: the directory leaves
        C{twisted.plugins.__path__}, the modules leave C{sys.modules}, and every C{dropin.cache} that the scan
        created (in any plugin directory) is removed.

        @return: the cleanup callable.
        """
        from twisted import plugins

        directory = os.path.join(os.path.abspath(self.mktemp()), "twisted", "plugins")
        os.makedirs(directory)
        for name, source in modules.items():
            with open(os.path.join(directory, name + ".py"), "w") as f:
                f.write(source)
        saved_path = list(plugins.__path__)
        had_cache = {p for p in saved_path if os.path.exists(os.path.join(p, "dropin.cache"))}
        plugins.__path__.append(directory)
        importlib.invalidate_caches()
        done = []

        def cleanup():
            if done:
                return
            done.append(True)
            plugins.__path__[:] = saved_path
            for name in modules:
                sys.modules.pop("twisted.plugins." + name, None)
            for p in saved_path + [directory]:
                cache = os.path.join(p, "dropin.cache")
                if p not in had_cache and os.path.exists(cache):
                    try:
                        os.remove(cache)
                    except OSError:
                        pass
            importlib.invalidate_caches()

        self.addCleanup(cleanup)
        return cleanup


class BalancerPluginTests(PluginDirectoryMixin, SynchronousTestCase):
    """
    L{find_balancer} and L{available_balancers} see L{IBalancerFactory} plugins after the built-ins.
    """

    def test_findPlugin(self):
        """
        A plugin module dropped into a C{twisted/plugins} directory is found by name and builds a working
        balancer.
        """
        self.install_plugins({"example_balancer": EXAMPLE_BALANCER})
        factory = find_balancer("example")
        verifyObject(IBalancerFactory, factory)
        self.assertEqual(factory.name, "example")
        self.assertEqual(type(factory).__module__, "twisted.plugins.example_balancer")
        balancer = factory.build(Random(0))
        verifyObject(IBalancer, balancer)
        a, b = Endpoint(("10.0.0.1", 80)), Endpoint(("10.0.0.2", 80))
        balancer.update([a, b], 0.0)
        self.assertEqual(balancer.pick(0.0), a)
        names = available_balancers()
        self.assertEqual(names, ["p2c-ewma", "round-robin", "least-request", "random", "example"])

    def test_builtinsWin(self):
        """
        A plugin cannot take over a built-in name: the built-in is returned, and the name is listed once.
        """
        self.install_plugins({"example_balancer": EXAMPLE_BALANCER})
        self.assertIs(find_balancer("random"), balancers.BUILTIN_BALANCERS["random"])
        self.assertEqual(available_balancers().count("random"), 1)

    def test_unknownListsPlugins(self):
        """
        The error for an unknown name lists plugin names as well as the built-ins.
        """
        self.install_plugins({"example_balancer": EXAMPLE_BALANCER})
        exc = self.assertRaises(KeyError, find_balancer, "exampel")
        self.assertIn("'exampel'", str(exc))
        self.assertIn("random, example", str(exc))

    def test_cleanup(self):
        """
        Once the directory is removed from the plugin path the plugin is gone again, and no C{dropin.cache}
        written by the scan is left behind in it.
        """
        cleanup = self.install_plugins({"example_balancer": EXAMPLE_BALANCER})
        from twisted import plugins

        directory = plugins.__path__[-1]
        find_balancer("example")
        self.assertTrue(os.path.exists(os.path.join(directory, "dropin.cache")))
        cleanup()
        self.assertNotIn(directory, plugins.__path__)
        self.assertNotIn("twisted.plugins.example_balancer", sys.modules)
        self.assertFalse(os.path.exists(os.path.join(directory, "dropin.cache")))
        self.assertRaises(KeyError, find_balancer, "example")


class DocsExampleTests(PluginDirectoryMixin, SynchronousTestCase):
    """
    The complete example modules in C{docs/plugins.md} work as installed plugins.
    """

    def setUp(self):
        if not os.path.exists(DOCS):
            self.skipTest(f"{DOCS} is not part of this installation")
        with open(DOCS) as f:
            self.examples = docs_examples(f.read())
        self.assertEqual(sorted(self.examples), ["failover_balancer", "jsonfile_discovery"])
        self.install_plugins(self.examples)

    def test_failoverBalancer(self):
        """
        The documented failover balancer is found as C{failover}, sends traffic to the first endpoint, fails
        over after seven consecutive failures, and keeps its state across updates.
        """
        balancer = find_balancer("failover").build(Random(0))
        verifyObject(IBalancer, balancer)
        primary, standby = Endpoint(("10.0.0.1", 80)), Endpoint(("10.0.0.2", 80))
        balancer.update([primary, standby], 0.0)
        self.assertEqual(balancer.pick(0.0), primary)
        for _ in range(7):
            balancer.start(primary, 0.0)
            balancer.finish(primary, 0.0, None, False)
        self.assertEqual(balancer.pick(0.0), standby)
        balancer.update([primary, standby, Endpoint(("10.0.0.3", 80))], 0.1)
        self.assertEqual(balancer.pick(0.1), standby)
        self.assertEqual([state for _, state, _ in balancer.snapshot(0.1)], ["ejected", "ready", "ready"])
        balancer.finish(Endpoint(("10.9.9.9", 80)), 0.1, 0.01, True)

    def test_jsonFileDiscovery(self):
        """
        The documented discovery backend is found with C{getPlugins(IDiscoveryFactory)}, delivers the first
        set synchronously, reports changes on the next poll of the reactor it was given, keeps the last good
        set when the file is broken, and stops on cancel.
        """
        from twisted import plugins

        factories = {f.name: f for f in getPlugins(IDiscoveryFactory, plugins)}
        factory = factories["jsonfile"]
        verifyObject(IDiscoveryFactory, factory)
        self.assertRaises(ValueError, factory.build, "", Clock(), Logger())

        path = os.path.abspath(self.mktemp())
        target = "web.default.svc.cluster.local:80"
        with open(path, "w") as f:
            json.dump({target: [{"addr": "10.0.0.1:8080"}, {"addr": "10.0.0.2:8080", "weight": 2}]}, f)
        clock = Clock()
        events = []
        discovery = factory.build(path, clock, Logger(observer=events.append))
        verifyObject(IDiscovery, discovery)
        receiver = Recorder()
        resolution = discovery.resolve(target, receiver)
        verifyObject(IResolution, resolution)
        first = [Endpoint(("10.0.0.1", 8080)), Endpoint(("10.0.0.2", 8080), weight=2.0)]
        self.assertEqual(receiver.calls, [("reset", first)])

        clock.advance(5.0)
        self.assertEqual(len(receiver.calls), 1, "unchanged file, no update")
        with open(path, "w") as f:
            f.write("{not json")
        clock.advance(5.0)
        self.assertEqual(len(receiver.calls), 1, "broken file keeps the last good set")
        self.assertEqual(len(events), 1)
        with open(path, "w") as f:
            json.dump({target: [{"addr": "10.0.0.3:8080"}]}, f)
        clock.advance(5.0)
        self.assertEqual(receiver.calls[-1], ("reset", [Endpoint(("10.0.0.3", 8080))]))

        resolution.cancel()
        self.assertEqual(clock.getDelayedCalls(), [])
