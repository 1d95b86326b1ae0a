"""
The dashboard in a real headless Chromium (Debian's C{chromium} and C{chromium-driver}, driven with Selenium),
against a real C{twist linkproxy} with file discovery over two backends.

Set C{LINKPROXY_DASHBOARD_SCREENSHOT=docs/images/dashboard.png} to refresh the screenshot the docs show;
without it the screenshot goes to the test's temporary directory only.
"""

import json
import os
import shutil
import signal
import threading
import time
from urllib.parse import urlsplit

from twisted.trial.unittest import SkipTest, TestCase

from linkproxy.admin.dashboard import histogram_quantile
from tests.proc import ROOT, HttpBackend, Proxy, free_port, http1_requests, wait_for, write_atomically
from tests.test_integration_balancing import endpoints_yaml
from tests.test_integration_mesh import trust_domain

SERVICE = "web.default:80"
IDENTITY = "dashboard.default.serviceaccount.identity.linkproxy.local"

# The page's tables as plain data, read in one round trip.
_READ_PAGE = """
function rows(id) {
  return Array.prototype.map.call(document.querySelectorAll("#" + id + " tbody tr"), function (tr) {
    var cells = {};
    tr.querySelectorAll("[data-field]").forEach(function (td) { cells[td.dataset.field] = td.textContent; });
    return {attrs: Object.assign({}, tr.dataset), cells: cells, cls: tr.className};
  });
}
return JSON.stringify({
  connection: document.getElementById("connection").dataset.state,
  connectionText: document.getElementById("connection").textContent,
  tap: document.getElementById("tap-status").dataset.state,
  tapText: document.getElementById("tap-status").textContent,
  identity: document.getElementById("identity-name").textContent,
  identityState: document.getElementById("identity").dataset.state,
  expiry: document.getElementById("identity-expiry").textContent,
  traffic: rows("traffic"),
  endpoints: rows("endpoints"),
  tapRows: rows("tap")
});
"""


def _browser():
    """
    The paths of Chromium and its driver, and Selenium's webdriver module, or raise L{SkipTest} saying what
    is missing.
    """
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        raise SkipTest("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
                       ".ci/run installs them)")
    try:
        from selenium import webdriver
    except ImportError:
        raise SkipTest("needs selenium (pip install -e '.[test]')")
    return chromium, driver, webdriver


def _metrics_view(proxy, direction, authority):
    """
    What the page should show for one (direction, authority), computed from C{/metrics} independently of
    the dashboard module (save for the quantile interpolation, which has unit tests of its own).
    """
    from prometheus_client.parser import text_string_to_metric_families

    requests = successes = responses = 0.0
    buckets = {}
    for family in text_string_to_metric_families(proxy.metrics()):
        for s in family.samples:
            if s.labels.get("direction") != direction or s.labels.get("authority") != authority:
                continue
            if s.name == "request_total":
                requests += s.value
            elif s.name == "response_total":
                responses += s.value
                if s.labels["classification"] == "success":
                    successes += s.value
            elif s.name == "response_latency_ms_bucket":
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    view = {"requests": requests, "success_rate": 100.0 * successes / responses}
    for q, key in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        view[key] = histogram_quantile(q, buckets.items())
    return view


def _close(text, expected, what):
    """
    Check that a number the page printed is C{expected} rounded the way the page rounds: within half a unit
    of its last printed digit.
    """
    text = text.rstrip("%")
    decimals = len(text.partition(".")[2])
    tolerance = 0.5 * 10 ** -decimals + 1e-9
    if abs(float(text) - expected) > tolerance:
        raise AssertionError(f"{what}: the page shows {text}, /metrics gives {expected}")


class DashboardBrowserTests(TestCase):
    """
    The page, loaded in headless Chromium from a running proxy.
    """

    def setUp(self):
        self.chromium, self.chromedriver, self.webdriver = _browser()

    def open_browser(self):
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service

        options = Options()
        options.binary_location = self.chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1360,1200", "--no-first-run", "--no-default-browser-check",
                    "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-default-apps", "--metrics-recording-only",
                    "--force-device-scale-factor=1", "--hide-scrollbars",
                    f"--user-data-dir={os.path.abspath(self.mktemp())}"):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        # Selenium Manager would otherwise look for drivers online; the paths are given.
        if "SE_OFFLINE" not in os.environ:
            os.environ["SE_OFFLINE"] = "true"
            self.addCleanup(os.environ.pop, "SE_OFFLINE", None)
        service = Service(self.chromedriver, port=free_port(), log_output=os.path.abspath(self.mktemp()))
        driver = self.webdriver.Chrome(service=service, options=options)
        self.addCleanup(driver.quit)
        driver.set_page_load_timeout(15)
        driver.set_script_timeout(5)
        return driver

    def page(self, driver):
        return json.loads(driver.execute_script(_READ_PAGE))

    def wait_page(self, driver, predicate, timeout, what):
        """
        Poll the page's tables until C{predicate(page)} is true; fail with the last page seen otherwise.
        """
        last = [None]

        def check():
            last[0] = self.page(driver)
            return predicate(last[0])
        try:
            return wait_for(check, timeout=timeout, interval=0.1, what=what) and last[0]
        except AssertionError as e:
            raise AssertionError(f"{e}; the page showed {json.dumps(last[0], indent=1)}") from None

    def console_errors(self, driver, allow=()):
        entries = driver.get_log("browser")
        return [e for e in entries if e["level"] == "SEVERE" and not any(a in e["message"] for a in allow)]

    def requested_urls(self, driver):
        urls = []
        for entry in driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                urls.append(message["params"]["request"]["url"])
        return urls

    def test_dashboard_live(self):
        """
        After traffic through the proxy, the page (with no console error, and no request to anything but
        the admin server on 127.0.0.1) shows the same request count, success rate and p50/p95/p99 as
        C{/metrics} (within its rounding), both endpoints ready, this proxy's identity and the tap table;
        a killed backend shows as ejected within 3 s; the page says it is disconnected while the proxy is
        down and comes back by itself when the proxy is restarted on the same ports.
        """
        started = time.monotonic()
        a, b = HttpBackend(self, "a"), HttpBackend(self, "b")
        endpoints = os.path.abspath(self.mktemp() + ".endpoints.yaml")
        write_atomically(endpoints, endpoints_yaml({SERVICE: [a, b]}))
        domain = trust_domain(self)
        config = {"discovery": f"file:{endpoints}", "identity_dir": domain, "identity_name": IDENTITY}
        proxy = Proxy(self, config)
        outbound = proxy.ports["outbound"]

        driver = self.open_browser()
        # Chromium's own start page (chrome:// URLs) is not the dashboard's doing: forget it.
        self.requested_urls(driver)
        driver.get(proxy.url("admin", "/dashboard"))
        self.wait_page(driver, lambda p: p["connection"] == "live", 5, "the page to poll")
        self.wait_page(driver, lambda p: p["tap"] == "live", 5, "the tap stream to open")

        results = http1_requests(outbound, SERVICE, 60, threads=3)
        self.assertEqual([r[0] for r in results], [200] * 60, proxy.log()[-2000:])
        # One request the proxy answers itself (no such service): a failure in the success rate.
        self.assertEqual(http1_requests(outbound, "missing.default:80", 1)[0][0], 503)

        expected = _metrics_view(proxy, "outbound", SERVICE)
        self.assertEqual(expected["requests"], 60)
        shown = self.wait_page(
            driver, lambda p: any(r["attrs"].get("authority") == SERVICE
                                  and r["cells"]["requests"] == "60" for r in p["traffic"]),
            5, "the page to count the 60 requests")
        [row] = [r for r in shown["traffic"] if r["attrs"].get("authority") == SERVICE]
        self.assertEqual(row["attrs"]["direction"], "outbound")
        for key in ("success_rate", "p50", "p95", "p99"):
            _close(row["cells"][key], expected[key], key)
        missing = _metrics_view(proxy, "outbound", "missing.default:80")
        shown = self.wait_page(driver, lambda p: any(r["attrs"].get("authority") == "missing.default:80"
                                                     for r in p["traffic"]), 5, "the 503 to show")
        [row] = [r for r in shown["traffic"] if r["attrs"].get("authority") == "missing.default:80"]
        _close(row["cells"]["success_rate"], missing["success_rate"], "success rate of missing.default:80")
        self.assertEqual(row["cells"]["success_rate"], "0.00%")

        states = {r["attrs"]["endpoint"]: r["attrs"]["state"] for r in shown["endpoints"]
                  if r["attrs"].get("target") == SERVICE}
        self.assertEqual(states, {a.address: "ready", b.address: "ready"})
        for r in shown["endpoints"]:
            if r["attrs"].get("target") == SERVICE:
                self.assertGreater(float(r["cells"]["cost"]), 0.0, r)
        self.assertEqual(shown["identity"], IDENTITY)
        self.assertEqual(shown["identityState"], "ok")
        self.assertIn("expires in 23 h", shown["expiry"])

        shown = self.wait_page(driver, lambda p: sum(1 for r in p["tapRows"]
                                                     if r["cells"].get("authority") == SERVICE) >= 10,
                               5, "tap rows for the requests")
        for r in shown["tapRows"]:
            if r["cells"].get("authority") == SERVICE:
                self.assertEqual((r["cells"]["method"], r["cells"]["status"], r["cells"]["direction"]),
                                 ("GET", "200", "outbound"), r)
                self.assertIn(r["cells"]["endpoint"], (a.address, b.address), r)
        # The table's filters are /tap's: with status 5xx only the proxy's 503 comes through.
        self.set_tap_filters(driver, status="5xx")
        self.assertEqual([r[0] for r in http1_requests(outbound, SERVICE, 5)], [200] * 5)
        self.assertEqual(http1_requests(outbound, "missing.default:80", 1)[0][0], 503)
        shown = self.wait_page(driver, lambda p: p["tapRows"], 5, "the filtered tap row")
        time.sleep(0.5)
        shown = self.page(driver)
        self.assertEqual([(r["cells"]["authority"], r["cells"]["status"]) for r in shown["tapRows"]],
                         [("missing.default:80", "503")])
        self.set_tap_filters(driver)

        # Only the admin server was asked for anything, and nothing went wrong in the page.
        urls = self.requested_urls(driver)
        self.assertTrue(urls)
        origins = {(urlsplit(url).scheme, urlsplit(url).netloc) for url in urls
                   if urlsplit(url).scheme not in ("data", "chrome", "about")}
        self.assertEqual(origins, {("http", f"127.0.0.1:{proxy.ports['admin']}")}, urls)
        self.assertEqual(self.console_errors(driver), [])

        # Kill b under steady traffic from a few clients (so that p2c keeps trying both endpoints): its
        # refused connects are retried on a and count as its failures; 7 in a row eject it, and the page
        # must show that within 3 s of the kill.
        stop = threading.Event()

        def traffic():
            while not stop.is_set():
                http1_requests(outbound, SERVICE, 5, threads=1)
                stop.wait(0.01)
        workers = [threading.Thread(target=traffic, daemon=True) for _ in range(3)]

        def stop_traffic():
            stop.set()
            for worker in workers:
                worker.join(10)
        self.addCleanup(stop_traffic)
        for worker in workers:
            worker.start()
        # A longer run when the screenshot is being refreshed, so that its latency chart has a history.
        time.sleep(12 if os.environ.get("LINKPROXY_DASHBOARD_SCREENSHOT") else 1.5)
        killed = time.monotonic()
        b.kill()
        shown = self.wait_page(driver, lambda p: any(r["attrs"].get("endpoint") == b.address
                                                     and r["attrs"].get("state") == "ejected"
                                                     for r in p["endpoints"]),
                               3, "the killed endpoint to show as ejected")
        self.assertLess(time.monotonic() - killed, 3.0)
        ready = [r["attrs"]["endpoint"] for r in shown["endpoints"] if r["attrs"].get("state") == "ready"]
        self.assertEqual(ready, [a.address])
        time.sleep(1.2)
        self.screenshot(driver)
        stop_traffic()
        self.assertEqual(self.console_errors(driver), [])

        # The proxy goes away: the page says so, and retries.
        ports = dict(proxy.ports)
        # Twisted re-raises SIGTERM once drained, so a clean exit reads -SIGTERM.
        self.assertIn(proxy.stop(), (0, -signal.SIGTERM))
        self.wait_page(driver, lambda p: p["connection"] == "disconnected", 5, "the page to notice")
        # The same proxy comes back on the same ports: the page picks up the new process by itself.
        again = Proxy(self, dict(config, outbound=f"tcp:{ports['outbound']}:interface=127.0.0.1",
                                 inbound=f"tcp:{ports['inbound']}:interface=127.0.0.1",
                                 admin=f"tcp:{ports['admin']}:interface=127.0.0.1"), ready=False)
        again.ports = ports
        again.wait_ready()
        self.assertEqual([r[0] for r in http1_requests(outbound, SERVICE, 3)], [200] * 3)
        shown = self.wait_page(driver, lambda p: p["connection"] == "live" and any(
            r["attrs"].get("authority") == SERVICE and r["cells"]["requests"] == "3" for r in p["traffic"]),
            10, "the page to reconnect to the restarted proxy")
        self.wait_page(driver, lambda p: p["tap"] == "live", 10, "the tap stream to reconnect")
        # While the proxy went down and was away the browser logged the cut tap stream and refused
        # connections, and nothing else.
        allowed = ("ERR_CONNECTION_REFUSED", "ERR_EMPTY_RESPONSE", "ERR_CONNECTION_RESET",
                   "ERR_INCOMPLETE_CHUNKED_ENCODING")
        self.assertEqual(self.console_errors(driver, allow=allowed), [])
        self.assertLess(time.monotonic() - started, 60)

    def set_tap_filters(self, driver, **filters):
        """
        Fill in the tap form (empty fields for the filters not given), clear the table, apply, and wait for
        the new stream to open.
        """
        driver.execute_script("""
            var form = document.getElementById("tap-filters"), filters = arguments[0];
            ["authority", "path", "method", "direction", "status"].forEach(function (name) {
              form.elements[name].value = filters[name] || "";
            });
            document.getElementById("tap-clear").click();
            form.requestSubmit();
        """, filters)
        self.wait_page(driver, lambda p: p["tap"] == "live", 5, "the filtered tap stream to open")

    def screenshot(self, driver):
        """
        Save the page as a PNG: in the test's directory, and where C{LINKPROXY_DASHBOARD_SCREENSHOT} says.
        """
        png = driver.get_screenshot_as_png()
        with open(os.path.abspath(self.mktemp() + ".png"), "wb") as f:
            f.write(png)
        target = os.environ.get("LINKPROXY_DASHBOARD_SCREENSHOT")
        if target:
            path = os.path.join(ROOT, target) if not os.path.isabs(target) else target
            with open(path, "wb") as f:
                f.write(png)
