# -*- test-case-name: tests.integration.test_bench_smoke -*-
"""
The two small servers the benchmark measures against, each run as its own
process by C{bench/run.py} so that it gets its own reactor (and core):

    python bench/targets.py upstream --port U
    python bench/targets.py bare --port P --upstream-port U --cert C --key K

C{upstream} is the tool server behind every target: a twisted.web site
answering every request with a tiny JSON body. C{bare} is target (a): a
stock C{twisted.web.proxy.ReverseProxyResource} to the upstream, served over
TLS with the gateway's own server context (L{caracal.gateway.tls.ServerTLS}),
so the TLS cost of (a) and of the gateway is the same and the ratio
gateway/bare shows what the gateway adds.
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


def bare_proxy_factory(upstream_port: int, cert_file: str, key_file: str, reactor):
    """
    Target (a): C{ReverseProxyResource} to C{127.0.0.1:upstream_port} behind
    TLS from the gateway's L{ServerTLS}. The stock proxy speaks HTTP/1.0 to
    the upstream and opens one connection per request; that is the bare
    baseline the issue asks for.
    """
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from twisted.web.proxy import ReverseProxyResource

    from caracal.gateway.tls import ServerTLS

    proxy = ReverseProxyResource("127.0.0.1", upstream_port, b"", reactor=reactor)
    tls = ServerTLS(cert_file, key_file, clock=reactor)
    return TLSMemoryBIOFactory(tls.creator, False, _quiet_site(proxy))


def main(argv=None) -> int:
    """Run one target server until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="bench/targets.py")
    sub = parser.add_subparsers(dest="role", required=True)
    up = sub.add_parser("upstream", help="the local tool server")
    up.add_argument("--port", type=int, required=True)
    bare = sub.add_parser("bare", help="target (a): ReverseProxyResource over TLS")
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
