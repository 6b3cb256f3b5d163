# -*- test-case-name: tests.test_backoff -*-
"""
How long the gateway waits between two attempts to reach a dependency
(Postgres, Redis) that is down: one policy for every reconnecting client, so
they all come back within the same bound (SPEC section 12, "Dependencies
noticed dead": C{/ready} is 200 again within 2 s of the service accepting
connections).

The delays come from Twisted's L{backoffPolicy}; only its jitter is bounded
here, since the stock one adds up to a whole second.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from twisted.application.internet import backoffPolicy

#: The first retry, once a connection is found dead or an attempt failed.
INITIAL_DELAY = 0.1
#: No two attempts are further apart than this (plus the jitter): with the
#: readiness cache and a connection set-up on top, it keeps recovery under
#: the SPEC's 2 s. An attempt on a service that refuses connections costs it
#: next to nothing, so a short cap is cheap.
MAX_DELAY = 0.5
FACTOR = 2.0
#: Up to this many seconds are added to each delay at random, so a fleet of
#: gateways does not reconnect in lock step after a restart.
JITTER = 0.05


def reconnect_policy(
    initial: float = INITIAL_DELAY,
    cap: float = MAX_DELAY,
    jitter: float = JITTER,
    factor: float = FACTOR,
) -> Callable[[int], float]:
    """
    A C{policy(attempt) -> seconds} (attempt 0 is the first retry): C{initial}
    doubling up to C{cap}, plus up to C{jitter} seconds at random.
    """
    return backoffPolicy(
        initialDelay=initial,
        maxDelay=cap,
        factor=factor,
        jitter=(lambda: random.uniform(0.0, jitter)) if jitter else (lambda: 0.0),
    )
