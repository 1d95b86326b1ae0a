"""
The two formats of linkproxy's log: C{plain}, one readable line per event, and C{json}, one compact object per
line. Both take every event of the process, Twisted's own included.

Plain::

    2026-12-04T18:40:03.123456Z INFO  linkproxy.routing: outbound endpoint 127.0.0.1:8081 of web:80 ejected: ...

then any fields the message does not already show, as C{key=value} (values with spaces, quotes or C{=} are
quoted, JSON-style). A failure's traceback follows as C{error="..."}. Newlines and other control characters are
escaped, so an event is always exactly one line, whatever a client put in a host name.

JSON::

    {"timestamp":"2026-12-04T18:40:03.123456Z","level":"INFO","target":"linkproxy.routing",
     "message":"outbound endpoint ...","fields":{"direction":"outbound","endpoint":"127.0.0.1:8081",...}}

C{target} is the logger's namespace, as in Rust's tracing. C{fields} holds every key of the event that is not
Twisted's bookkeeping (C{log_*}, and the legacy C{message}, C{format}, C{isError}, ...); values JSON cannot
hold are given as their C{repr}. A failure adds C{fields.error}, its traceback text. The output is ASCII.

L{observer} builds the L{ILogObserver} for a format and a text file; C{linkproxy.tap} hands it to C{twist} in
place of twist's own choice (its text format to a terminal, its JSON event dump otherwise).
"""

import datetime
import json
import math
import re
import string

from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

__all__ = ["FORMATS", "format_plain", "format_json", "observer", "LogFileObserver"]

#: The names C{--log-format} accepts.
FORMATS = ("plain", "json")

# Keys Twisted's legacy bridge (twisted.python.log) puts in an event: not the event's own data.
_LEGACY_KEYS = frozenset({"message", "format", "isError", "failure", "why", "system", "time", "printed",
                          "logLevel"})

_LEVEL_NAMES = {
    LogLevel.debug: "DEBUG",
    LogLevel.info: "INFO",
    LogLevel.warn: "WARN",
    LogLevel.error: "ERROR",
    LogLevel.critical: "CRITICAL",
}

# C0 controls and DEL, which would break a line or drive a terminal; escaped wherever text is written.
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
# A plain value is written bare only when it is made of these; anything else is quoted.
_BARE = re.compile(r"[^\s\"'=\\\x00-\x1f\x7f]+")

_MAX_DEPTH = 4


def _timestamp(event):
    when = event.get("log_time")
    if not isinstance(when, (int, float)) or not math.isfinite(when):
        return "-"
    try:
        moment = datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return "-"
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _level(event):
    level = event.get("log_level")
    if level is None and event.get("isError"):
        return "ERROR"
    return _LEVEL_NAMES.get(level, "INFO")


def _target(event):
    namespace = event.get("log_namespace")
    return namespace if isinstance(namespace, str) and namespace else "-"


def _failure(event):
    failure = event.get("log_failure")
    if failure is None and event.get("isError"):
        # twisted.python.log.err: the failure is under its legacy key, and log_text already holds the
        # traceback, which belongs in the error field instead.
        failure = event.get("failure")
    return failure


def _message(event):
    if event.get("log_failure") is None and event.get("isError") and event.get("failure") is not None \
            and event.get("log_format") == "{log_text}":
        why = event.get("why")
        return why if isinstance(why, str) and why else "Unhandled Error"
    try:
        text = formatEvent(event)
    except Exception:  # formatEvent catches its own errors; this is the last line of defence.
        text = "<unformattable event>"
    return text if isinstance(text, str) else str(text)


def _error(event):
    """
    The traceback of the event's failure, or C{None}.
    """
    failure = _failure(event)
    if failure is None:
        return None
    try:
        return failure.getTraceback().rstrip("\n")
    except Exception:
        try:
            return repr(failure)
        except Exception:
            return "<unrepresentable failure>"


def _safe_repr(value):
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


def _jsonable(value, depth=0):
    """
    C{value} as something C{json.dumps} takes: itself when it already is, containers converted item by item,
    anything else as its C{repr}.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if depth < _MAX_DEPTH:
        if isinstance(value, (list, tuple)):
            return [_jsonable(v, depth + 1) for v in value]
        if isinstance(value, dict):
            return {k if isinstance(k, str) else _safe_repr(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (set, frozenset)) and depth < _MAX_DEPTH:
        items = [_jsonable(v, depth + 1) for v in value]
        try:
            return sorted(items)
        except TypeError:
            return items
    return _safe_repr(value)


def _fields(event):
    """
    The event's own keys and values: everything but Twisted's bookkeeping.
    """
    return {key: value for key, value in event.items()
            if isinstance(key, str) and not key.startswith("log_") and key not in _LEGACY_KEYS}


def _format_names(event):
    """
    The field names the event's format string uses, so plain lines do not repeat them as key=value.
    """
    text = event.get("log_format")
    if not isinstance(text, str):
        return frozenset()
    names = set()
    try:
        for _, name, _, _ in string.Formatter().parse(text):
            if name:
                # "{a.b}", "{a[0]}" and "{a!r}" all show field a.
                names.add(re.split(r"[.\[!:]", name, maxsplit=1)[0])
    except ValueError:
        return frozenset()
    return frozenset(names)


def _escape(text):
    """
    C{text} on one line: newlines, tabs, backslashes and other control characters escaped.
    """
    return _CONTROL.sub(lambda m: _ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


def _plain_value(value):
    if not isinstance(value, str):
        value = _jsonable(value)
        if not isinstance(value, str):
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if _BARE.fullmatch(value):
        return value
    # JSON string syntax: quotes and control characters escaped, non-ASCII kept readable.
    return json.dumps(value, ensure_ascii=False)


def format_plain(event):
    """
    One event as one readable line: time, level, namespace, message, then the fields the message does not
    show, and a failure's traceback as C{error}.

    @param event: a L{twisted.logger} event.
    @return: the line, ending in a newline.
    @rtype: L{str}
    """
    parts = [_timestamp(event), f"{_level(event):<5}", _target(event) + ":", _escape(_message(event))]
    shown = _format_names(event)
    for key, value in sorted(_fields(event).items()):
        if key not in shown:
            parts.append(f"{_escape(key)}={_plain_value(value)}")
    error = _error(event)
    if error is not None:
        parts.append("error=" + json.dumps(error, ensure_ascii=False))
    return " ".join(part for part in parts if part) + "\n"


def format_json(event):
    """
    One event as one compact JSON object with C{timestamp, level, target, message, fields}.

    @param event: a L{twisted.logger} event.
    @return: the object's text, ASCII only, ending in a newline.
    @rtype: L{str}
    """
    fields = {key: _jsonable(value) for key, value in _fields(event).items()}
    error = _error(event)
    if error is not None:
        fields["error"] = error
    record = {
        "timestamp": _timestamp(event),
        "level": _level(event),
        "target": _target(event),
        "message": _message(event),
        "fields": fields,
    }
    try:
        text = json.dumps(record, separators=(",", ":"), sort_keys=False)
    except (TypeError, ValueError):
        # Keys that will not sort or serialise (never expected after _jsonable): keep the event, lose detail.
        record["fields"] = {_safe_repr(k): _safe_repr(v) for k, v in fields.items()}
        text = json.dumps(record, separators=(",", ":"))
    return text + "\n"


_FORMATTERS = {"plain": format_plain, "json": format_json}


@implementer(ILogObserver)
class LogFileObserver:
    """
    Writes each event to a text file as one line, formatted by one of L{format_plain} or L{format_json}.

    A formatter that raises, or a file whose encoding cannot hold a character, costs that event its detail,
    never the log: Twisted would otherwise drop the observer.
    """

    def __init__(self, out_file, format_event):
        """
        @param out_file: a text file, such as C{sys.stdout}.
        @param format_event: a callable from an event to its line.
        """
        self._out = out_file
        self._format = format_event

    def __call__(self, event):
        try:
            line = self._format(event)
        except Exception:
            line = format_plain({"log_time": event.get("log_time"), "log_level": LogLevel.error,
                                 "log_namespace": "linkproxy.logformat", "log_format": "unformattable event"})
        try:
            self._out.write(line)
        except UnicodeEncodeError:
            encoding = getattr(self._out, "encoding", None) or "ascii"
            self._out.write(line.encode(encoding, "backslashreplace").decode(encoding))
        self._out.flush()


def observer(name, out_file):
    """
    The observer that writes C{out_file} in the format C{name}.

    @param name: one of L{FORMATS}.
    @param out_file: a text file.
    @raise ValueError: for a name not in L{FORMATS}.
    """
    try:
        return LogFileObserver(out_file, _FORMATTERS[name])
    except KeyError:
        raise ValueError(f"unknown log format {name!r}; expected one of {', '.join(FORMATS)}") from None
