"""
Runtime control of linkproxy's log level, for C{/proxy-log-level} on the admin server.

A L{LogLevelControl} holds one L{LogLevel}. Its L{predicate <LogLevelControl.predicate>} drops events below
that level, but only events from linkproxy's own namespaces (C{linkproxy} and C{linkproxy.*}); events from
Twisted and other libraries pass through untouched, so raising the level to C{error} never hides, say, an
unhandled error in a Deferred logged by Twisted.

This module only provides the pieces. The service wires them up once at start-up, roughly::

    from twisted.logger import globalLogBeginner, textFileLogObserver

    control = LogLevelControl(config.log_level)
    globalLogBeginner.beginLoggingTo([control.observer(textFileLogObserver(sys.stderr))])
    admin = AdminApp(..., log_level=control, ...)

(or C{globalLogPublisher.addObserver(control.observer(downstream))} when something else has already begun
logging, as C{twist} does). Every observer that should honour the runtime level must be wrapped with
L{LogLevelControl.observer}; the predicate reads the current level on each event, so a later
L{LogLevelControl.set} takes effect at once without re-wiring anything.
"""

from twisted.logger import FilteringLogObserver, ILogFilterPredicate, LogLevel, PredicateResult
from zope.interface import implementer

#: Events whose C{log_namespace} is this, or starts with this plus a dot, are subject to the runtime level.
NAMESPACE = "linkproxy"

#: Level names accepted by L{LogLevelControl.set}, in increasing severity.
LEVEL_NAMES = tuple(level.name for level in LogLevel.iterconstants())

# Operators coming from Python's logging (or Linkerd's env_logger) type "warning"; accept it.
_ALIASES = {"warning": "warn"}


def parse_level(name):
    """
    Turn a level name into a L{LogLevel}.

    @param name: C{debug}, C{info}, C{warn} (or C{warning}), C{error} or C{critical}; case and surrounding
        whitespace are ignored.
    @type name: L{str}
    @return: the matching L{LogLevel} constant.
    @raise ValueError: if C{name} names no level; the message lists the valid names.
    """
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in LEVEL_NAMES:
        raise ValueError("invalid log level {!r}; valid levels are: {}".format(name, ", ".join(LEVEL_NAMES)))
    return LogLevel.levelWithName(key)


class LogLevelControl:
    """
    The current minimum log level, changeable at run time.

    @ivar level: the current L{LogLevel}.
    @ivar everything: C{True} to filter every event by L{level} (the process-wide level C{twist linkproxy}
        installs); C{False} to filter only C{linkproxy} events and pass others untouched.
    @ivar predicate: an L{ILogFilterPredicate} that drops events below L{level} as it is when each event
        arrives; give it to any L{FilteringLogObserver}, or use L{observer}.
    """

    def __init__(self, initial="info", everything=False):
        """
        @param initial: the starting level name, as accepted by L{set}.
        @param everything: see L{everything}.
        @raise ValueError: if C{initial} names no level.
        """
        self.level = parse_level(initial)
        self.everything = everything
        self.predicate = _NamespaceLevelPredicate(self)

    @property
    def name(self):
        """
        @return: the current level's canonical name, e.g. C{"warn"}.
        @rtype: L{str}
        """
        return self.level.name

    def set(self, name):
        """
        Change the level; it applies to the next event logged.

        @param name: a level name, as for L{parse_level}.
        @raise ValueError: if C{name} names no level; the current level is then left as it was.
        """
        self.level = parse_level(name)

    def observer(self, downstream):
        """
        Wrap an observer so it only sees what the current level lets through.

        @param downstream: the L{ILogObserver} to protect.
        @return: a L{FilteringLogObserver} around C{downstream} using L{predicate}.
        """
        return FilteringLogObserver(downstream, [self.predicate])


@implementer(ILogFilterPredicate)
class _NamespaceLevelPredicate:
    """
    Drops linkproxy's events below the control's current level; has no opinion on anything else.

    This is not L{twisted.logger.LogLevelFilterPredicate}, because that one drops events lacking a level or a
    namespace and applies a default level to every other namespace; here foreign events must pass as they are.
    """

    def __init__(self, control):
        self._control = control

    def __call__(self, event):
        namespace = event.get("log_namespace") or ""
        if not self._control.everything and namespace != NAMESPACE and not namespace.startswith(NAMESPACE + "."):
            return PredicateResult.maybe
        level = event.get("log_level")
        if level is not None and level < self._control.level:
            return PredicateResult.no
        # "maybe", not "yes": other predicates an integrator adds later still get their say.
        return PredicateResult.maybe
