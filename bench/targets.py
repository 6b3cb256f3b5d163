# -*- test-case-name: tests.integration.test_bench_smoke -*-
"""
The two small servers the benchmark measures against, each run as its own
process by C{bench/run.py} so that it gets its own reactor (and core):

    python bench/targets.py upstream --port U
    python bench/targets.py bare --port P --upstream-port U --cert C --key K

C{upstream} is the tool server behind every target: a twisted.web site
answering every request with a tiny JSON body. C{bare} is target (a), the
reference of SPEC 17: a bare Twisted TLS proxy whose C{Agent} keeps a
persistent C{HTTPConnectionPool} (HTTP/1.1 keep-alive to the upstream, as the
gateway's forwarder does), served over TLS with the gateway's own server
context (L{caracal.gateway.tls.ServerTLS}), so the TLS cost of (a) and of the
gateway is the same and the ratio gateway/bare shows what the gateway adds.
"""

from __future__ import annotations

import argparse
import sys

UPSTREAM_BODY = b'{"ok":true,"tool":"bench"}'
LISTEN_BACKLOG = 511


def _quiet_site(resource):
    """A Site without access logging (the gateway's own log is part of its cost, not these)."""
    from twisted.web.server import Site

    site = Site(resource)
    site.log = lambda request: None
    return site


def upstream_site():
    """The upstream: C{200 application/json} with L{UPSTREAM_BODY} for any method and path."""
    from twisted.web.resource import Resource

    class Tool(Resource):
        isLeaf = True

        def render(self, request):
            request.setHeader(b"content-type", b"application/json")
            return UPSTREAM_BODY

    return _quiet_site(Tool())


def pooled_proxy(upstream_port: int, reactor):
    """
    A minimal proxy resource: every request is sent with the same method,
    path and headers through one C{Agent} over a persistent
    C{HTTPConnectionPool} to C{127.0.0.1:upstream_port}; the answer's status,
    content type and body are relayed. No authentication, nothing else.
    """
    from twisted.web.client import Agent, HTTPConnectionPool, readBody
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 64
    agent = Agent(reactor, pool=pool)
    base = b"http://127.0.0.1:%d" % upstream_port

    class PooledProxy(Resource):
        isLeaf = True

        def render(self, request):
            d = agent.request(request.method, base + request.uri, None, None)

            def relay(response):
                request.setResponseCode(response.code)
                kind = response.headers.getRawHeaders(b"content-type")
                if kind:
                    request.responseHeaders.setRawHeaders(b"content-type", kind)
                return readBody(response)

            def done(body):
                request.write(body)
                request.finish()

            def failed(failure):
                request.setResponseCode(502)
                request.finish()

            d.addCallback(relay).addCallbacks(done, failed)
            return NOT_DONE_YET

    return PooledProxy()


def bare_proxy_factory(upstream_port: int, cert_file: str, key_file: str, reactor):
    """
    Target (a): L{pooled_proxy} to C{127.0.0.1:upstream_port} behind TLS from
    the gateway's L{ServerTLS}: the bare pooled Twisted proxy SPEC 17
    measures the gateway against.
    """
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from caracal.gateway.tls import ServerTLS

    tls = ServerTLS(cert_file, key_file, clock=reactor)
    return TLSMemoryBIOFactory(
        tls.creator, False, _quiet_site(pooled_proxy(upstream_port, reactor))
    )


def main(argv=None) -> int:
    """Run one target server until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="bench/targets.py")
    sub = parser.add_subparsers(dest="role", required=True)
    up = sub.add_parser("upstream", help="the local tool server")
    up.add_argument("--port", type=int, required=True)
    bare = sub.add_parser("bare", help="target (a): a pooled Agent proxy over TLS")
    bare.add_argument("--port", type=int, required=True)
    bare.add_argument("--upstream-port", type=int, required=True)
    bare.add_argument("--cert", required=True)
    bare.add_argument("--key", required=True)
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    if args.role == "upstream":
        factory = upstream_site()
    else:
        factory = bare_proxy_factory(args.upstream_port, args.cert, args.key, reactor)
    reactor.listenTCP(args.port, factory, backlog=LISTEN_BACKLOG, interface="127.0.0.1")
    print(f"{args.role} listening on 127.0.0.1:{args.port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
