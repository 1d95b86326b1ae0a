"""
The request layers every HTTP version shares, in the order a request meets them:

    route     L{linkproxy.layers.route}     the target's profile, and the route the request matches
    split     L{linkproxy.layers.split}     the concrete target a traffic split sends it to
    timeout   L{linkproxy.layers.timeout}   its deadline: response timeout, route timeout, C{grpc-timeout}
    retry     L{linkproxy.layers.retry}     whether a failed attempt goes again (another endpoint, the budget)
    balance   L{linkproxy.layers.balance}   discovery + balancer + failure accrual: one attempt's endpoint
    endpoint  L{linkproxy.layers.endpoint}  the pools and the connector: where connections are made and kept

L{linkproxy.layers.stack.RequestStack} holds one direction's layers, built top to bottom by C{build_outbound}
and C{build_inbound}. The protocol glue (HTTP/1, HTTP/2, the l5d-orig-proto bridge) asks it for one
L{linkproxy.layers.stack.Call} per request and reports each attempt's outcome to it; the call decides. None of
these layers knows which codec it serves, so each behaviour is written once.

Each stage has its own small target: the accepted connection's L{linkproxy.net.context.PeerInfo}, the logical
target (the authority the client named, with its profile and route), the concrete target (after a split) and
the L{linkproxy.core.endpoint.Endpoint} a balancer picks.
"""
