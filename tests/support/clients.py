"""treq clients the process tests share."""

from __future__ import annotations

import treq
from twisted.internet import reactor
from twisted.internet.ssl import Certificate
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool


def fresh_connection_client(root=None) -> treq.client.HTTPClient:
    """
    A treq client opening a new connection per request (so every worker of
    a C{--workers} gateway gets some): plaintext, or TLS trusting only the
    test root C{root} (a L{tests.support.certs} authority).
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    if root is None:
        return treq.client.HTTPClient(Agent(reactor, pool=pool))
    policy = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(root.pem))
    return treq.client.HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))
