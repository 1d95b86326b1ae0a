"""
The C{twist linkproxy} entry point.
"""

from twisted.application.service import ServiceMaker

linkproxy = ServiceMaker(
    "linkproxy",
    "linkproxy.tap",
    "A service-mesh sidecar proxy: protocol sniffing, mTLS identity, P2C/peak-EWMA balancing, golden metrics.",
    "linkproxy",
)
