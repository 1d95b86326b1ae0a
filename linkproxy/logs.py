"""
Loggers for linkproxy's own modules.

The level that filters them (and every other event in a C{twist linkproxy} process) is installed by
L{linkproxy.tap}: C{--log-level} at start, C{PUT /proxy-log-level} at run time.
"""

from twisted.logger import Logger


def logger(namespace):
    """
    A L{Logger} for a linkproxy module.
    """
    return Logger(namespace=namespace)
