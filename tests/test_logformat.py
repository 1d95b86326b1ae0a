"""
Tests for L{linkproxy.logformat}, and for how C{linkproxy.tap} installs it in place of twist's observer.
"""

import io
import json

from twisted.logger import LogLevel, LogPublisher, Logger, jsonFileLogObserver, textFileLogObserver
from twisted.logger._legacy import publishToNewObserver
from twisted.python import log as legacy
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from linkproxy.config import Config
from linkproxy.logformat import FORMATS, LogFileObserver, format_json, format_plain, observer
from linkproxy.tap import _install_logging

# 2026-12-04T18:40:03.250000Z
WHEN = 1796409603.25


class _Events:
    """
    A publisher feeding an observer of the given format that writes to a L{io.StringIO}.
    """

    def __init__(self, name):
        self.out = io.StringIO()
        self.publisher = LogPublisher(observer(name, self.out))

    def logger(self, namespace="linkproxy.test"):
        return Logger(namespace=namespace, observer=self.publisher)

    def legacy(self):
        """
        A L{twisted.python.log} publisher bridged to the new one, the way Twisted's own C{log.msg} and
        C{log.err} reach the global observers.
        """
        old = legacy.LogPublisher()
        old.addObserver(lambda e: publishToNewObserver(self.publisher, e, legacy.textFromEventDict))
        return old

    def lines(self):
        text = self.out.getvalue()
        self.assertEndsWithNewline(text)
        return text.splitlines()

    @staticmethod
    def assertEndsWithNewline(text):
        if text and not text.endswith("\n"):
            raise AssertionError(f"output does not end with a newline: {text!r}")


def _failure():
    try:
        1 / 0
    except ZeroDivisionError:
        return Failure()


class PlainFormatTests(SynchronousTestCase):
    """
    The C{plain} format: one readable line per event.
    """

    def test_layout(self):
        """
        A line is the UTC time, the level, the namespace and the message, then the fields the message does
        not already show as sorted C{key=value} pairs.
        """
        line = format_plain({"log_time": WHEN, "log_level": LogLevel.info, "log_namespace": "linkproxy.routing",
                             "log_format": "endpoint {endpoint} ejected: {reason}", "endpoint": "127.0.0.1:8081",
                             "reason": "connection refused", "event": "ejected", "direction": "outbound"})
        self.assertEqual(line, "2026-12-04T18:40:03.250000Z INFO  linkproxy.routing: endpoint 127.0.0.1:8081 "
                               "ejected: connection refused direction=outbound event=ejected\n")

    def test_levels(self):
        """
        Each level is named in capitals; an event without a level reads as C{INFO}.
        """
        for level, name in [(LogLevel.debug, "DEBUG"), (LogLevel.info, "INFO "), (LogLevel.warn, "WARN "),
                            (LogLevel.error, "ERROR"), (LogLevel.critical, "CRITICAL"), (None, "INFO ")]:
            line = format_plain({"log_time": WHEN, "log_level": level, "log_namespace": "x", "log_format": "m"})
            self.assertEqual(line, f"2026-12-04T18:40:03.250000Z {name} x: m\n")

    def test_quotedValues(self):
        """
        Values with spaces, quotes, C{=} or nothing at all are quoted JSON-style; numbers, lists and objects
        that are not text are shown as JSON or by their C{repr}.
        """
        line = format_plain({"log_time": WHEN, "log_namespace": "x", "log_format": "m", "a": "two words",
                             "b": 'say "hi"', "c": "k=v", "d": "", "e": 3, "f": None, "g": [1, "x"],
                             "h": b"raw"})
        self.assertEqual(line, '2026-12-04T18:40:03.250000Z INFO  x: m a="two words" b="say \\"hi\\"" '
                               'c="k=v" d="" e=3 f=null g=[1,"x"] h="b\'raw\'"\n')

    def test_oneLineWhateverTheText(self):
        """
        Newlines and other control characters in the message or a field are escaped: a host name a client
        chose cannot forge a second line.
        """
        line = format_plain({"log_time": WHEN, "log_namespace": "x", "log_format": "target {target}",
                             "target": "evil\n2026-01-01T00:00:00Z CRITICAL forged\x1b[31m", "other": "a\nb"})
        self.assertEqual(line.count("\n"), 1)
        self.assertIn("target evil\\n2026-01-01T00:00:00Z CRITICAL forged\\x1b[31m", line)
        self.assertIn('other="a\\nb"', line)

    def test_nonAscii(self):
        """
        Non-ASCII text stays readable, in the message and in quoted values.
        """
        line = format_plain({"log_time": WHEN, "log_namespace": "linkproxy.x", "log_format": "café {who}",
                             "who": "ünïcode", "where": "東京 駅"})
        self.assertEqual(line, '2026-12-04T18:40:03.250000Z INFO  linkproxy.x: café ünïcode where="東京 駅"\n')

    def test_failure(self):
        """
        A failure's traceback follows the message as one quoted C{error} field.
        """
        events = _Events("plain")
        events.logger().failure("request failed for {target}", failure=_failure(), target="web:80")
        [line] = events.lines()
        self.assertIn(" CRITICAL linkproxy.test: request failed for web:80 error=\"Traceback", line)
        self.assertIn("ZeroDivisionError: division by zero\"", line)
        self.assertIn("\\n", line)

    def test_twistedLegacyEvents(self):
        """
        Twisted's own messages, which still come through L{twisted.python.log}, read like any other: the
        legacy bookkeeping (C{system}, C{isError}, ...) is not shown, and C{log.err}'s traceback is the
        C{error} field, not part of the message.
        """
        events = _Events("plain")
        old = events.legacy()
        old.msg("Site starting on 4191", system="-")
        old.msg(failure=_failure(), isError=1, why="Unhandled error in Deferred:", system="-")
        first, second = events.lines()
        self.assertRegex(first, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z INFO  log_legacy: Site starting on 4191$")
        self.assertIn(" CRITICAL log_legacy: Unhandled error in Deferred: error=\"Traceback", second)
        self.assertNotIn("isError", second)
        self.assertEqual(second.count("ZeroDivisionError: division by zero"), 1)

    def test_badFormatString(self):
        """
        An event whose format string does not fit its fields is still one line, saying so.
        """
        line = format_plain({"log_time": WHEN, "log_namespace": "x", "log_format": "{missing} {", "a": 1})
        self.assertEqual(line.count("\n"), 1)
        self.assertIn("Unable to format event", line)


class JsonFormatTests(SynchronousTestCase):
    """
    The C{json} format: one compact object per line.
    """

    def test_object(self):
        """
        The object has C{timestamp, level, target, message, fields}; C{target} is the namespace and
        C{fields} every non-bookkeeping key of the event, including those the message uses.
        """
        text = format_json({"log_time": WHEN, "log_level": LogLevel.warn, "log_namespace": "linkproxy.routing",
                            "log_format": "endpoint {endpoint} ejected", "log_source": object(),
                            "log_logger": object(), "endpoint": "127.0.0.1:8081", "count": 2})
        self.assertTrue(text.endswith("}\n"))
        self.assertEqual(text.count("\n"), 1)
        self.assertNotIn(": ", text)
        self.assertEqual(json.loads(text), {
            "timestamp": "2026-12-04T18:40:03.250000Z", "level": "WARN", "target": "linkproxy.routing",
            "message": "endpoint 127.0.0.1:8081 ejected", "fields": {"endpoint": "127.0.0.1:8081", "count": 2}})
        self.assertEqual(list(json.loads(text)), ["timestamp", "level", "target", "message", "fields"])

    def test_valuesMadeSafe(self):
        """
        Values JSON cannot hold become their C{repr}; lists and mappings are converted item by item, and a
        non-finite float becomes text (strict JSON has no NaN).
        """
        class Thing:
            def __repr__(self):
                return "<Thing>"

        class Broken:
            def __repr__(self):
                raise RuntimeError("no")

        record = json.loads(format_json({"log_namespace": "x", "log_format": "m", "thing": Thing(),
                                         "items": (1, Thing(), {"k": b"v", 3: None}), "nan": float("inf"),
                                         "broken": Broken(), "ports": frozenset({443, 80})}))
        self.assertEqual(record["fields"], {"thing": "<Thing>", "items": [1, "<Thing>", {"k": "b'v'", "3": None}],
                                            "nan": "inf", "broken": "<unrepresentable Broken>",
                                            "ports": [80, 443]})

    def test_failure(self):
        """
        A failure's traceback text is C{fields.error}.
        """
        events = _Events("json")
        events.logger().failure("request failed", failure=_failure())
        [line] = events.lines()
        record = json.loads(line)
        self.assertEqual((record["level"], record["message"]), ("CRITICAL", "request failed"))
        self.assertTrue(record["fields"]["error"].startswith("Traceback"))
        self.assertIn("ZeroDivisionError: division by zero", record["fields"]["error"])

    def test_nonAsciiIsEscaped(self):
        """
        The output is ASCII (a log file's encoding cannot break it), and decodes back to the same text.
        """
        text = format_json({"log_namespace": "x", "log_format": "café {who}", "who": "東京\n"})
        text.encode("ascii")
        record = json.loads(text)
        self.assertEqual((record["message"], record["fields"]["who"]), ("café 東京\n", "東京\n"))

    def test_twistedLegacyEvents(self):
        """
        Twisted's C{log.msg} and C{log.err} events are objects like any other, legacy keys left out.
        """
        events = _Events("json")
        old = events.legacy()
        old.msg("Site starting on 4191", system="-")
        old.msg(failure=_failure(), isError=1, why="Unhandled error in Deferred:", system="-")
        first, second = [json.loads(line) for line in events.lines()]
        self.assertEqual((first["level"], first["target"], first["message"], first["fields"]),
                         ("INFO", "log_legacy", "Site starting on 4191", {}))
        self.assertEqual((second["level"], second["message"], sorted(second["fields"])),
                         ("CRITICAL", "Unhandled error in Deferred:", ["error"]))


class ObserverTests(SynchronousTestCase):
    """
    L{observer} and L{LogFileObserver}: writing events to a file.
    """

    def test_formats(self):
        """
        C{plain} and C{json} are the formats; anything else is refused.
        """
        self.assertEqual(FORMATS, ("plain", "json"))
        self.assertIsInstance(observer("plain", io.StringIO()), LogFileObserver)
        self.assertRaises(ValueError, observer, "text", io.StringIO())

    def test_writesAndFlushes(self):
        """
        Every event is written as it comes and the file flushed, so a crash loses nothing already logged.
        """
        class File(io.StringIO):
            flushes = 0

            def flush(self):
                self.flushes += 1

        out = File()
        log = Logger(namespace="linkproxy.x", observer=observer("plain", out))
        log.info("one")
        log.info("two")
        self.assertEqual(out.flushes, 2)
        self.assertEqual([line.split(" INFO  ", 1)[1] for line in out.getvalue().splitlines()],
                         ["linkproxy.x: one", "linkproxy.x: two"])

    def test_narrowEncoding(self):
        """
        A file whose encoding cannot hold a character (a C{latin-1} or ASCII terminal) gets a backslash
        escape for it instead of an exception.
        """
        raw = io.BytesIO()
        out = io.TextIOWrapper(raw, encoding="ascii")
        Logger(namespace="x", observer=observer("plain", out)).info("café {x}", x="東")
        out.flush()
        self.assertIn(b"caf\\xe9 \\u6771", raw.getvalue())

    def test_formatterRaises(self):
        """
        When formatting raises, the event still leaves a line rather than disabling the observer.
        """
        def broken(event):
            raise RuntimeError("no")

        out = io.StringIO()
        LogFileObserver(out, broken)({"log_time": WHEN, "log_namespace": "x"})
        self.assertEqual(out.getvalue(),
                         "2026-12-04T18:40:03.250000Z ERROR linkproxy.logformat: unformattable event\n")


class _TwistOptions(dict):
    """
    The part of twist's options C{_install_logging} uses: a mapping holding C{fileLogObserverFactory} and
    C{logLevel}, as C{twist}'s own C{TwistOptions} does once parsed.
    """


class _PluginOptions(dict):
    def __init__(self, parent):
        super().__init__()
        self.parent = parent


class InstallLoggingTests(SynchronousTestCase):
    """
    C{linkproxy.tap._install_logging} replaces twist's observer factory, whichever twist chose.
    """

    def install(self, twist_factory, **config):
        parent = _TwistOptions(fileLogObserverFactory=twist_factory, logLevel=LogLevel.info)
        control = _install_logging(_PluginOptions(parent), Config(**config))
        out = io.StringIO()
        return parent, control, out, parent["fileLogObserverFactory"](out)

    def test_plainReplacesTwistsChoice(self):
        """
        Whether twist picked its JSON event dump (stdout not a terminal) or its text format (a terminal, or
        C{twist --log-format text}), the process writes plain lines by default.
        """
        for twist_factory in [jsonFileLogObserver, textFileLogObserver]:
            parent, control, out, installed = self.install(twist_factory)
            Logger(namespace="twisted.internet.base", observer=installed).info("Main loop terminated.")
            self.assertRegex(out.getvalue(), r"^\S+Z INFO  twisted.internet.base: Main loop terminated.\n$")
            self.assertNotIn("log_flattened", out.getvalue())

    def test_json(self):
        """
        C{--log-format json} gives one object per line, for Twisted's events too.
        """
        parent, control, out, installed = self.install(textFileLogObserver, log_format="json")
        Logger(namespace="twisted.internet.base", observer=installed).info("Main loop terminated.")
        self.assertEqual(json.loads(out.getvalue())["message"], "Main loop terminated.")

    def test_levelStillApplies(self):
        """
        The installed observer honours the run-time level, for every namespace; twist's own filter is opened
        fully so that the run-time level alone decides.
        """
        parent, control, out, installed = self.install(jsonFileLogObserver, log_level="warn")
        self.assertEqual(parent["logLevel"], LogLevel.debug)
        log = Logger(namespace="twisted.web", observer=installed)
        log.info("hidden")
        log.warn("shown")
        control.set("info")
        log.info("shown too")
        self.assertEqual([line.split(": ", 1)[1] for line in out.getvalue().splitlines()],
                         ["shown", "shown too"])

    def test_withoutTwist(self):
        """
        Options without twist's parent (as in tests, or another runner) install nothing, and still give the
        level control.
        """
        control = _install_logging(_PluginOptions(None), Config(log_level="debug"))
        self.assertEqual(control.name, "debug")
