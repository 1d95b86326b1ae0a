"""
The exchange contracts: how the side that accepted a request (downstream) and the side that carries it on
(upstream) talk, for one request and its response.

There are two framings on the data path, and so two pairs:

  - HTTP/1 messages: L{IHttp1Downstream} (head, body, end, interim responses, loss; pause and resume of the
    request) and L{IHttp1Upstream} (attach, write, pause and resume of the response, close, abort).
  - HTTP/2 streams: L{IStreamDownstream} (the response's head, DATA, trailers, end, reset, refusal; connect
    failure) and L{IStreamEnd} (one end of a stream's connection: write readiness, flush marking, forgetting
    a finished stream), with flow control carried by L{linkproxy.net.h2.Half}.

Each codec implements its side once:

| | downstream | upstream |
|---|---|---|
| HTTP/1 | L{linkproxy.net.http1.Http1ServerProtocol} | L{linkproxy.net.http1.Http1ClientProtocol} |
| HTTP/2 | L{linkproxy.net.h2.Stream} (and L{linkproxy.net.h2.H2ServerProtocol} as its stream end) | the pooled HTTP/2 client connection |
| l5d-orig-proto | C{H2Exchange}: an HTTP/1 upstream that is an HTTP/2 stream downstream | C{_H1Upstream}: an HTTP/2 stream end that is an HTTP/1 downstream |

The bridge (L{linkproxy.net.orig_proto}) is an adapter from one pair to the other and calls nothing but
these methods; the request layers (L{linkproxy.layers}) sit above both pairs and know neither.
"""

from zope.interface import Attribute, Interface


class IHttp1Downstream(Interface):
    """
    The side of an HTTP/1 exchange that has the request and relays the response: what an upstream calls.

    The C{upstream} argument is the L{IHttp1Upstream} reporting, so that a late report from an abandoned one
    is recognised and ignored.
    """

    def interim(status, reason, headers):
        """
        A 1xx response (not 101) arrived; relay it when the client can take it.
        """

    def response_head(upstream, status, reason, head):
        """
        The response head arrived (C{head} is a L{linkproxy.core.http1.HeadCollector}).

        @return: C{False} when the downstream refuses this response (the upstream then stops parsing it and
            is abandoned: a retried answer, or a 101 nobody asked for).
        """

    def response_body(data):
        """
        Response body bytes, de-chunked.
        """

    def response_end(trailers):
        """
        The response is complete; C{trailers} is a list of pairs or C{None}.
        """

    def response_complete(upstream):
        """
        After L{response_end}: hand the upstream back (to its pool) and move on to the next request.
        """

    def upstream_lost(upstream, got_bytes):
        """
        The upstream closed or reset; C{got_bytes} says whether any of the response had arrived.
        """

    def upstream_failed(upstream, error):
        """
        The upstream sent something that is not a valid response: answer with C{error} if nothing was sent.
        """

    def switch_protocols(upstream, rest):
        """
        A 101: from now on both sides are one opaque byte stream; C{rest} came after the response head.
        """

    def pause_request(reason):
        """
        Stop reading the request (the upstream's write buffer is full, for reason
        L{linkproxy.net.http1.PAUSE_UPSTREAM_FULL}).
        """

    def resume_request(reason):
        """
        Undo L{pause_request} for C{reason}; reading resumes when no reason is left.
        """

    def flush():
        """
        Write what the event gathered, towards the client and the upstream, once.
        """


class IHttp1Upstream(Interface):
    """
    The side of an HTTP/1 exchange that carries the request on: what a downstream calls.
    """

    endpoint = Attribute("The L{linkproxy.core.endpoint.Endpoint} the request goes to.")
    out = Attribute("A list of bytes to write on the next L{flush}; the downstream appends the request to it.")

    def attach(downstream, method):
        """
        Serve one exchange of C{downstream} (an L{IHttp1Downstream}) for a request with C{method}.
        """

    def detach():
        """
        The exchange is over or abandoned: flush what is queued and report nothing more.
        """

    def reusable():
        """
        C{True} when another exchange may follow on this upstream.
        """

    def flush():
        """
        Write L{out}.
        """

    def close():
        """
        Close once what is queued is written.
        """

    def abort():
        """
        Close at once; nothing queued matters.
        """

    def pause_reading():
        """
        Stop reading the response (the client reads too slowly).
        """

    def resume_reading():
        """
        Undo L{pause_reading}.
        """


class IStreamDownstream(Interface):
    """
    One HTTP/2 request as the upstream stream carrying it sees it: what the upstream connection (or the
    pool opening it) calls.
    """

    req = Attribute("The request's L{linkproxy.net.h2.Half}: DATA towards the upstream, flow-controlled.")
    resp = Attribute("The response's L{linkproxy.net.h2.Half}.")
    headers = Attribute("The request's header block, as sent upstream.")
    done = Attribute("C{True} once the exchange is over; later reports are ignored.")

    def attached(up, uid, ended):
        """
        The request headers went out as stream C{uid} on C{up} (an L{IStreamEnd}); C{ended} when they carried
        END_STREAM.
        """

    def connect_failed(reason):
        """
        No connection could be opened for the stream: nothing was sent.
        """

    def fail(error):
        """
        Give up and answer with C{error} (a L{linkproxy.core.errors.ProxyError}).
        """

    def up_info(headers):
        """
        A 1xx response head.
        """

    def up_head(headers, ended):
        """
        The response head; C{ended} when it carried END_STREAM (trailers-only).
        """

    def up_trailers(headers):
        """
        The response's trailers (which end it).
        """

    def up_end():
        """
        END_STREAM on the response.
        """

    def up_reset(code):
        """
        The upstream reset the stream with C{code}.
        """

    def up_gone(reset_with, reason, code=None):
        """
        The stream ended abnormally (its connection was lost, or it broke); C{reset_with} is the code to reset
        the upstream stream with, or C{None} when it is already closed.
        """

    def up_refused():
        """
        The upstream did not process the stream (GOAWAY below its id, REFUSED_STREAM).
        """

    def half_closed():
        """
        One of L{req} and L{resp} closed; the exchange is over when both are.
        """


class IStreamEnd(Interface):
    """
    One end of the connections a stream's L{linkproxy.net.h2.Half} writes to or reads from.
    """

    conn = Attribute("The h2 connection state machine (or what stands in for it).")
    alive = Attribute("C{True} while the connection is open.")
    blocked = Attribute("C{True} while the transport's write buffer is full.")
    waiting = Attribute("The L{linkproxy.net.h2.Half}s waiting for L{blocked} to clear.")

    def mark():
        """
        Something was queued on L{conn}: write it at the end of the event.
        """

    def forget(stream_id):
        """
        The stream C{stream_id} is over on this end.
        """
