"""
The set of open server connections, so a graceful drain can ask each to finish and can tell when all have.
"""

from twisted.internet.defer import Deferred


class ConnectionTracker:
    """
    Open connections of one proxy process.

    A tracked connection provides C{drain()}: finish what is in flight, then close (HTTP/1 closes when idle,
    HTTP/2 sends GOAWAY, opaque TCP simply runs to its end).
    """

    def __init__(self):
        self._open = set()
        self._waiters = []
        self.draining = False

    def __len__(self):
        return len(self._open)

    def add(self, conn):
        """
        Track C{conn}; if a drain is under way it is asked to drain at once.
        """
        self._open.add(conn)
        if self.draining:
            conn.drain()

    def discard(self, conn):
        """
        Forget C{conn}; fires the L{wait_empty} Deferreds when the last one goes.
        """
        self._open.discard(conn)
        if not self._open and self._waiters:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def drain(self):
        """
        Ask every open connection to finish and close.
        """
        self.draining = True
        for conn in list(self._open):
            conn.drain()

    def wait_empty(self):
        """
        @return: a Deferred that fires when no connection is open.
        """
        d = Deferred()
        if not self._open:
            d.callback(None)
        else:
            self._waiters.append(d)
        return d

    def abort_all(self):
        """
        Abort whatever is still open (the grace period is over).
        """
        for conn in list(self._open):
            conn.abort()
