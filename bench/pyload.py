# -*- test-case-name: tests.integration.test_bench_smoke -*-
"""
The load generator used by C{bench/run.py} when C{wrk} is not installed:

    python bench/pyload.py --url https://127.0.0.1:P/path --connections C
        --duration S -- MODE THREADS [RESOURCE TOKEN_FILE]

Same arguments after C{--} and same C{BENCH_RESULT {json}} line as
C{bench/wrk.lua}. One thread per connection, each a keep-alive
C{http.client.HTTPSConnection}; per_call tokens are handed out from one
shared list, each exactly once. Python's own cost per request (and the GIL)
makes this client slower than wrk: its req/s are a floor, and the ratios
between targets are what to read from it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import ssl
import sys
import threading
import time
import urllib.parse


class Tokens:
    """Single-use tokens, each handed out once across all threads."""

    def __init__(self, tokens: list[str]) -> None:
        self._tokens = tokens
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> str | None:
        with self._lock:
            if self._next >= len(self._tokens):
                return None
            token = self._tokens[self._next]
            self._next += 1
            return token


def percentile(sorted_values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of an already sorted list (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, int(round(fraction * len(sorted_values))) - 1))
    return sorted_values[rank]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/pyload.py")
    parser.add_argument("--url", required=True)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("mode", choices=("bare", "ambient", "per_call"))
    parser.add_argument("threads", help="ignored (wrk's thread count)")
    parser.add_argument("resource", nargs="?", default="")
    parser.add_argument("token_file", nargs="?", default="")
    args = parser.parse_args(argv)

    url = urllib.parse.urlsplit(args.url)
    path = url.path or "/"
    # Load only: the bench checked each target's certificate before measuring.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    headers: dict[str, str] = {}
    if args.mode != "bare":
        headers["X-Caracal-Resource"] = args.resource
    lines: list[str] = []
    if args.mode != "bare":
        with open(args.token_file, encoding="ascii") as f:
            lines = [line.strip() for line in f if line.strip()]
    if args.mode == "ambient":
        headers["Authorization"] = f"Bearer {lines[0]}"
    tokens = Tokens(lines if args.mode == "per_call" else [])

    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"non2xx": 0, "exhausted": 0, "connect": 0, "read": 0, "write": 0, "timeout": 0}
    by_status: dict[str, int] = {}
    received = [0]
    started = time.monotonic()
    deadline = started + args.duration

    def worker() -> None:
        mine: list[float] = []
        connection = None
        while time.monotonic() < deadline:
            if connection is None:
                connection = http.client.HTTPSConnection(
                    url.hostname, url.port, context=context, timeout=5
                )
            request_headers = headers
            if args.mode == "per_call":
                token = tokens.take()
                if token is None:
                    with lock:
                        counts["exhausted"] += 1
                    token = "exhausted"
                request_headers = {**headers, "Authorization": f"Bearer {token}"}
            begin = time.monotonic()
            try:
                connection.request("GET", path, headers=request_headers)
                response = connection.getresponse()
                body = response.read()
            except TimeoutError:
                with lock:
                    counts["timeout"] += 1
                connection.close()
                connection = None
                continue
            except (OSError, http.client.HTTPException):
                with lock:
                    counts["read"] += 1
                connection.close()
                connection = None
                continue
            mine.append(time.monotonic() - begin)
            with lock:
                received[0] += len(body)
                if not 200 <= response.status <= 299:
                    counts["non2xx"] += 1
                    key = str(response.status)
                    by_status[key] = by_status.get(key, 0) + 1
        if connection is not None:
            connection.close()
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(args.connections)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    elapsed = time.monotonic() - started
    latencies.sort()
    micro = [value * 1e6 for value in latencies]
    result = {
        "requests": len(latencies),
        "duration_us": int(elapsed * 1e6),
        "bytes": received[0],
        "latency_us": {
            "p50": int(percentile(micro, 0.50)),
            "p90": int(percentile(micro, 0.90)),
            "p99": int(percentile(micro, 0.99)),
            "max": int(micro[-1]) if micro else 0,
            "mean": round(sum(micro) / len(micro), 1) if micro else 0.0,
        },
        "non2xx": counts["non2xx"],
        "non2xx_by_status": by_status,
        "exhausted": counts["exhausted"],
        "socket_errors": {k: counts[k] for k in ("connect", "read", "write", "timeout")},
    }
    print("BENCH_RESULT " + json.dumps(result, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
