"""
Every use linkproxy makes of Twisted's private state, behind a public surface (C{__all__}).

Three things here lean on Twisted internals:
  - L{direct_writer} and L{install_direct_write} write to a TCP socket at once when Twisted has nothing queued
    for it, instead of on the next reactor turn (the why is on L{direct_writer}).
  - L{MeshTLSTransport} teaches Twisted's TLS transport TLS 1.3 half-close and turns its write buffering off.
    It is made on first access, because Twisted's TLS module imports pyOpenSSL, which processes without
    identity leave out.
  - L{endpoint_port} reads the port of an endpoint parsed from a description, to report an out-of-range port
    while the configuration is checked.

None of it is public API of Twisted, so any release may change it. L{AUDITED} is the range checked; C{setup.cfg}
bounds the install to it, and C{tests/test_audited_versions.py} fails when the installed Twisted is outside it.
On an upgrade, re-read each item below in the new release (C{twisted/internet/abstract.py},
C{twisted/internet/tcp.py}, C{twisted/protocols/tls.py}, C{twisted/internet/endpoints.py}), run
C{tests/test_splice.py}, C{tests/test_mesh.py}, C{tests/test_config.py} and the integration tests, then widen
L{AUDITED} and C{setup.cfg} together.

What this module relies on:
  - C{twisted.internet.tcp.Connection}: its instance attribute C{socket} (a C{socket.socket}), that C{write}
    is looked up on the class (so an instance attribute shadows it), and the write-buffer state of
    C{twisted.internet.abstract.FileDescriptor}: C{dataBuffer}, C{offset}, the private C{_tempDataLen} and
    C{_writeDisconnected}, with C{connected} and C{disconnecting}. Nothing is queued exactly when
    C{_tempDataLen} is 0 and C{len(dataBuffer) == offset}.
  - L{on_tcp_close}: that C{Connection.connectionLost} is looked up on the instance when the reactor calls
    it (and from C{abortConnection}'s C{callLater}), and that the socket is still open when it starts.
  - C{twisted.protocols.tls.TLSMemoryBIOProtocol}: the private methods C{_unbufferPendingWrites} (extended) and
    C{_flushReceiveBIO} (replaced, as a copy of Twisted's loop with the half-close change), C{_flushSendBIO},
    C{_shutdownTLS} and C{_tlsShutdownFinished}, and the private attributes C{_tlsConnection},
    C{_handshakeDone}, C{_appSendBuffer}, C{_lostTLSConnection} and C{_aborted}; C{ProtocolWrapper.dataReceived}
    as the way plaintext reaches the wrapped protocol. Using the class itself, not C{BufferingTLSTransport}
    (C{TLSMemoryBIOFactory}'s default C{protocol}), is what turns the write buffering off.
  - The endpoints C{serverFromString} and C{clientFromString} build for C{tcp:}, C{ssl:} and the like keep
    their port in a private C{_port} attribute.
"""

import socket
import struct

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.tcp import Connection
from twisted.python.failure import Failure

# Made on first access (see __getattr__), so pyflakes cannot see them defined.
_LAZY = ("MeshTLSTransport",)
__all__ = ["AUDITED", "direct_writer", "endpoint_port", "install_direct_write", "on_tcp_close", "tcp_connection",
           *_LAZY]

#: The Twisted releases the code here was checked against, as C{(lower, upper)} version specifiers: 23.10.0 and
#: 26.10.0 were read, and agree on everything listed above. C{setup.cfg} must carry the same bounds
#: (C{tests/test_audited_versions.py} checks both).
AUDITED = {
    "twisted": (">=23.10", "<26.11"),
}


# --- Direct socket writes -----------------------------------------------------------------------------------

def direct_writer(transport, counter=None):
    """
    A C{write} for C{transport} that sends at once when nothing is queued, instead of on the next reactor turn.

    Twisted's C{write} always queues and asks the reactor to watch for writability, which costs two epoll
    changes and a loop iteration per chunk; measured here that is a large share of a splice's CPU. When the
    queue is empty the bytes go straight to the socket, and only what the kernel did not take is queued with
    the ordinary C{write} (so ordering, backpressure and close handling stay Twisted's). Transports that are
    not plain TCP connections (TLS, test transports) get their own C{write}.

    @param counter: an object whose C{tx} attribute gets the length of every write (the connection's
        C{tcp_write_bytes_total}, see L{linkproxy.admin.metrics.TcpConnection}), or C{None}.
    """
    # An exact type test: wrappers such as the TLS transport forward unknown attributes to the TCP transport
    # beneath them, and sending to that socket would bypass the wrapper (plaintext past TLS).
    if not isinstance(transport, Connection) or not isinstance(transport.__dict__.get("socket"), socket.socket):
        return transport.write
    installed = transport.__dict__.get("write")
    if installed is not None:
        # install_direct_write already made this transport's own write direct.
        return installed
    write = transport.write
    send = transport.socket.send

    def direct_write(data):
        if counter is not None:
            counter.tx += len(data)
        if (transport._tempDataLen or len(transport.dataBuffer) != transport.offset
                or not transport.connected or transport.disconnecting or transport._writeDisconnected):
            write(data)
            return
        try:
            sent = send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # Let Twisted's own write path meet the error and close the connection the usual way.
            write(data)
            return
        if sent < len(data):
            write(data[sent:])

    return direct_write


def install_direct_write(transport, counter=None):
    """
    Make C{transport.write} itself the L{direct_writer}, for every protocol that writes to it.

    This is how wrapping protocols benefit too: a TLS layer writes its records to the TCP transport beneath
    it, and those writes then go straight to the socket when nothing is queued. A no-op for transports that
    are not plain TCP connections.

    @param counter: see L{direct_writer}: counts every byte written to the socket (TLS records included).
    """
    if isinstance(transport, Connection) and "write" not in transport.__dict__:
        writer = direct_writer(transport, counter)
        if writer is not transport.write:
            transport.write = writer


# --- Connection close with the kernel's byte counts ----------------------------------------------------

def _tcp_bytes(sock):
    # struct tcp_info (linux/tcp.h): tcpi_bytes_acked at offset 120 and tcpi_bytes_received at 128 (Linux 4.2+).
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 136)
    except (OSError, ValueError):
        return 0, 0
    if len(info) < 136:
        return 0, 0
    acked, received = struct.unpack_from("=QQ", info, 120)
    # The acknowledgement of our SYN counts one byte of sequence space; our FIN is not sent yet.
    return received, max(acked - 1, 0)


_TCP_INFO = getattr(socket, "TCP_INFO", 11)


def tcp_connection(transport):
    """
    The plain TCP connection under C{transport} (itself, or what a TLS transport wraps), or C{None}.
    """
    for _ in range(3):
        if isinstance(transport, Connection):
            return transport if isinstance(transport.__dict__.get("socket"), socket.socket) else None
        transport = getattr(transport, "transport", None)
    return None


def on_tcp_close(transport, callback):
    """
    Call C{callback(reason, read, written)} once the TCP connection C{transport} closes, just before its
    protocol hears of it: C{read} and C{written} are the kernel's counts of bytes received and sent (acknowledged) on
    the socket, read just before Twisted closes it (0 where the platform has no C{TCP_INFO}). Nothing runs on
    reads or writes.

    Relies on C{Connection.connectionLost} being looked up on the instance when the reactor (or
    C{abortConnection}) calls it, and on the socket still being open when it is called.

    @return: C{True} when installed, C{False} for a transport that is not a plain TCP connection.
    """
    connection = tcp_connection(transport)
    if connection is None or "connectionLost" in connection.__dict__:
        return False
    lost = connection.connectionLost

    def connectionLost(reason):
        sock = connection.__dict__.get("socket")
        read, written = _tcp_bytes(sock) if sock is not None else (0, 0)
        del connection.connectionLost
        try:
            callback(reason, read, written)
        finally:
            lost(reason)

    connection.connectionLost = connectionLost
    return True


# --- TLS transport with half-close ----------------------------------------------------------------------


def __getattr__(name):
    # MeshTLSTransport subclasses Twisted's TLS transport, whose module imports pyOpenSSL; a process without
    # identity keeps pyOpenSSL out (linkproxy.tap.leave_out_tls) and still needs the rest of this module, so the
    # class is made on first use, by the modules that speak TLS.
    if name == "MeshTLSTransport":
        cls = globals()[name] = _make_tls_transport()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_tls_transport():
    from OpenSSL.SSL import Error as SSLError, WantReadError, ZeroReturnError
    from twisted.protocols.policies import ProtocolWrapper
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    class MeshTLSTransport(TLSMemoryBIOProtocol):
        """
        Twisted's TLS transport, unbuffered, plus TLS 1.3 half-close in both directions.

        Unbuffered: Twisted's default (C{BufferingTLSTransport}) holds every write until the next reactor turn to
        merge small writes; linkproxy's protocols already write once per event, so that only added a timer and a
        loop iteration of latency to every response.

        Twisted treats a peer's close_notify as the end of the whole connection, and forwards
        C{loseWriteConnection} to the TCP socket underneath (a FIN inside a TLS stream, ahead of buffered records).
        RFC 8446 section 6.1 lets each side close its write side alone, and opaque TCP between proxies needs it:
        C{loseWriteConnection} here sends close_notify after the pending records and keeps reading, and a peer's
        close_notify is delivered to an L{IHalfCloseableProtocol} as C{readConnectionLost} while writing goes on.
        The TCP connection closes once both directions are done.

        @ivar verify_error: the X509 error code of the peer's chain when verification failed (server side).
        """

        verify_error = None
        _write_shut = False
        _read_shut = False
        _shut_pending = False

        def loseWriteConnection(self):
            """
            Send close_notify once what was written so far is out; keep reading.
            """
            if self.disconnecting or not self.connected or self._write_shut or self._shut_pending:
                return
            # Writes after this are dropped, like writes after loseConnection.
            self.write = _drop
            if self._handshakeDone and not self._appSendBuffer:
                self._send_close_notify()
            else:
                self._shut_pending = True

        def dataReceived(self, data):
            TLSMemoryBIOProtocol.dataReceived(self, data)
            # A half-close asked for before the handshake, with nothing buffered, has no unbuffering to wait for.
            if self._shut_pending and self._handshakeDone and not self._appSendBuffer:
                self._send_close_notify()

        def writeSequence(self, iovec):
            """
            Write C{iovec} joined (through L{write}, so that writes after a half-close are dropped).
            """
            self.write(b"".join(iovec))

        def _send_close_notify(self):
            self._shut_pending = False
            self._write_shut = True
            if self._lostTLSConnection:
                return
            try:
                self._tlsConnection.shutdown()
            except SSLError:
                pass
            self._flushSendBIO()
            if self._read_shut:
                self.transport.loseConnection()

        def _unbufferPendingWrites(self):
            TLSMemoryBIOProtocol._unbufferPendingWrites(self)
            if self._shut_pending and not self._appSendBuffer:
                self._send_close_notify()

        def _flushReceiveBIO(self):
            # Twisted's loop, except that a close_notify from the peer ends only the read side when the protocol
            # can take a half-close.
            while not self._lostTLSConnection and not self._read_shut:
                try:
                    data = self._tlsConnection.recv(2 ** 15)
                except WantReadError:
                    break
                except ZeroReturnError:
                    half = IHalfCloseableProtocol(self.wrappedProtocol, None)
                    if half is None or self.disconnecting:
                        self._shutdownTLS()
                        self._tlsShutdownFinished(None)
                        break
                    self._read_shut = True
                    half.readConnectionLost()
                    if self._write_shut and self.transport is not None:
                        self.transport.loseConnection()
                    break
                except SSLError:
                    self._tlsShutdownFinished(Failure())
                else:
                    if not self._aborted:
                        ProtocolWrapper.dataReceived(self, data)
            if self._tlsConnection is not None:
                self._flushSendBIO()

    MeshTLSTransport.__qualname__ = "MeshTLSTransport"
    return MeshTLSTransport


def _drop(data):
    pass


# --- Endpoint descriptions ---------------------------------------------------------------------------------


def endpoint_port(endpoint):
    """
    The port an endpoint built from a description will bind or connect to, or C{None} if it does not say.

    Twisted accepts out-of-range ports when it parses a description and fails only at bind or connect time, which
    is after the point where configuration problems must be reported; the port is in a private attribute.
    """
    # Private, so read defensively: an endpoint type without it (a plugin's) has no port to check.
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not isinstance(port, bool):
        return port
    return None
