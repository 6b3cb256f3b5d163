# -*- test-case-name: tests.test_devsts -*-
"""
A development STS for tests, the demo and curl users (SPEC section 5). It is
not part of the gateway and must never run in production: its keys are
ephemeral and it mints caller tokens for anyone who asks.
"""

from caracal.devsts.service import (
    DevSTS,
    ExchangeRecord,
    InvalidSubject,
    MandateAsSubject,
    ZoneKey,
)

__all__ = ["DevSTS", "ExchangeRecord", "InvalidSubject", "MandateAsSubject", "ZoneKey"]
