# -*- test-case-name: tests.test_tap -*-
"""
The twistd plugin: C{twistd caracal-gateway}. All the wiring lives in
L{caracal.gateway.tap}; this file only names it so twistd can find it.
"""

from twisted.application.service import ServiceMaker

CaracalGateway = ServiceMaker(
    "caracal-gateway",
    "caracal.gateway.tap",
    "The Caracal gateway: authenticates AI agents and forwards their tool calls",
    "caracal-gateway",
)
