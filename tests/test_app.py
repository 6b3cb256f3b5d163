# -*- test-case-name: tests.test_app -*-
"""Gateway.when_loaded: accepting waits for the resource snapshot and revocation window."""

from twisted.application.service import MultiService, Service
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway.app import Gateway


class Follower(Service):
    def __init__(self):
        self.ready = defer.Deferred()

    def when_ready(self):
        d = defer.Deferred()
        self.ready.addCallback(lambda _: d.callback(None))
        return d


class Resources:
    def __init__(self):
        self.loaded = defer.Deferred()


class Pipeline:
    def __init__(self):
        self.resources = Resources()


class WhenLoadedTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.follower = Follower()
        service = MultiService()
        self.follower.setServiceParent(service)
        self.pipeline = Pipeline()
        self.gateway = Gateway(
            config=None, metrics=None, service=service, site=None, pipeline=self.pipeline
        )

    def test_waitsForBoth(self):
        """Accepting waits for both the resource snapshot and the revocation window."""
        results = []
        self.gateway.when_loaded(self.clock, 10.0).addCallback(results.append)
        self.pipeline.resources.loaded.callback(None)
        self.assertEqual(results, [])
        self.follower.ready.callback(None)
        self.assertEqual(results, [True])

    def test_leavesLoadedUsableForOthers(self):
        """Waiting does not consume the store's C{loaded} result."""
        self.gateway.when_loaded(self.clock, 10.0)
        self.pipeline.resources.loaded.callback(None)
        self.assertIsNone(self.successResultOf(self.pipeline.resources.loaded))

    def test_timeoutServesAnyway(self):
        """After the bound the gateway accepts anyway, reporting that it did not load."""
        results = []
        self.gateway.when_loaded(self.clock, 10.0).addCallback(results.append)
        self.pipeline.resources.loaded.callback(None)
        self.clock.advance(9.9)
        self.assertEqual(results, [])
        self.clock.advance(0.1)
        self.assertEqual(results, [False])
