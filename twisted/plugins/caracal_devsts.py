# -*- test-case-name: tests.test_devsts -*-
"""twistd plugin: C{twistd -n caracal-devsts}, the development STS."""

from twisted.application.service import ServiceMaker

caracal_devsts = ServiceMaker(
    "caracal-devsts",
    "caracal.devsts.tap",
    "Development STS for Caracal (ephemeral keys; never in production)",
    "caracal-devsts",
)
