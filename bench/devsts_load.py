"""
The dev STS's CPU per token exchange, measured alone (not part of run.py).

The bench's gateway rows share this 2-core machine with the dev STS, so what
the dev STS spends per exchange is taken from the gateway. This script starts
C{twistd -n caracal-devsts --insecure-http} on a free 127.0.0.1 port (as
run.py does), mints C{--tokens} per_call subject tokens through C{POST
/dev/mint} (not measured), then posts one token exchange per token, shaped as
the gateway's STS client sends it, over C{--connections} keep-alive
connections from a separate process, and prints the dev STS process's CPU
time (user + system, from C{/proc/<pid>/stat}) per exchange::

    .venv/bin/python bench/devsts_load.py [--tokens 4000] [--connections 8] \
        [--use per_call|ambient] [-- caracal-devsts options]

With C{--use ambient} one ambient token is minted and exchanged C{--tokens}
times, as the bench's ambient row does.

Every exchange must answer 200 (else exit status 1). Loopback only; the run
is bounded by the number of tokens (a few seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlencode

ZONE = "zone-bench"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 (a URN)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process C{pid}, from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_response(sock: socket.socket, buffer: bytes) -> tuple[int, bytes, bytes]:
    """One HTTP/1.1 response with a Content-Length: (status, body, bytes left over)."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buffer += chunk
    head, _, buffer = buffer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(buffer) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response body")
        buffer += chunk
    return status, buffer[:length], buffer[length:]


def post(port: int, path: str, body: bytes, extra: bytes = b"") -> bytes:
    """The request bytes of a form POST, as the gateway's STS client sends it."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode("ascii")
        + b"Accept: application/json\r\n"
        + b"Content-Type: application/x-www-form-urlencoded\r\n"
        + extra
        + f"Content-Length: {len(body)}\r\n\r\n".encode("ascii")
        + body
    )


def run_requests(port: int, requests: list[bytes], connections: int) -> dict[int, int]:
    """Send C{requests} over C{connections} keep-alive connections; count the statuses."""
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def worker(share: list[bytes]) -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = b""
        try:
            for request in share:
                sock.sendall(request)
                status, _body, buffer = read_response(sock, buffer)
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
        finally:
            sock.close()

    threads = [
        threading.Thread(target=worker, args=(requests[i::connections],))
        for i in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def client_main(port: int, connections: int, token_file: str) -> None:
    """The load process: exchange every token in C{token_file}; print the statuses as JSON."""
    with open(token_file, encoding="ascii") as f:
        tokens = f.read().split()
    requests = []
    for i, token in enumerate(tokens):
        form = urlencode(
            [
                ("grant_type", GRANT_TYPE),
                ("subject_token", token),
                ("subject_token_type", TOKEN_TYPE),
                ("zone_id", ZONE),
                ("application_id", "app-bench"),
                ("resource", "res-bench"),
            ]
        ).encode("ascii")
        requests.append(post(port, "/oauth/2/token", form, b"X-Request-Id: req-%d\r\n" % i))
    print(json.dumps(run_requests(port, requests, connections)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4000, help="exchanges to measure")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections")
    parser.add_argument("--use", choices=("per_call", "ambient"), default="per_call")
    parser.add_argument("--client", nargs=2, metavar=("PORT", "FILE"), help=argparse.SUPPRESS)
    parser.add_argument("sts_args", nargs="*", help="extra caracal-devsts options")
    args = parser.parse_args()
    if args.client:
        client_main(int(args.client[0]), args.connections, args.client[1])
        return 0

    port = free_port()
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    twistd = twistd if os.path.exists(twistd) else shutil.which("twistd") or "twistd"
    directory = tempfile.mkdtemp(prefix="devsts-load-")
    log_path = os.path.join(directory, "devsts.log")
    argv = [sys.executable, twistd, "-n", "--pidfile=", "caracal-devsts", "--port", str(port)]
    argv += ["--bind", "127.0.0.1", "--insecure-http", *args.sts_args]
    with open(log_path, "wb") as log:
        sts = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if sts.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the dev STS did not start; see {log_path}") from None
                time.sleep(0.1)

        # Mint the subject tokens (not measured), over one keep-alive connection.
        form = urlencode([("zone_id", ZONE), ("use", args.use), ("ttl", "3600")])
        mint = post(port, "/dev/mint", form.encode("ascii"))
        tokens = []
        with socket.create_connection(("127.0.0.1", port)) as sock:
            buffer = b""
            for _ in range(args.tokens if args.use == "per_call" else 1):
                sock.sendall(mint)
                status, body, buffer = read_response(sock, buffer)
                if status != 200:
                    raise SystemExit(f"/dev/mint answered {status}")
                tokens.append(json.loads(body)["token"])
        token_file = os.path.join(directory, "tokens")
        with open(token_file, "w", encoding="ascii") as f:
            f.write("\n".join(tokens * (args.tokens // len(tokens))))

        client = [sys.executable, __file__, "--connections", str(args.connections)]
        client += ["--client", str(port), token_file]
        before, started = cpu_seconds(sts.pid), time.monotonic()
        done = subprocess.run(client, capture_output=True, text=True, check=True)
        after, elapsed = cpu_seconds(sts.pid), time.monotonic() - started
    finally:
        sts.terminate()
        sts.wait(10)
    statuses = {int(k): v for k, v in json.loads(done.stdout).items()}
    exchanges = sum(statuses.values())
    cpu_us = (after - before) / exchanges * 1e6
    print(
        f"dev STS: {exchanges} {args.use} exchanges over {args.connections} connections"
        f" in {elapsed:.2f} s"
        f" ({exchanges / elapsed:.0f}/s), statuses {statuses};"
        f" CPU {after - before:.2f} s = {cpu_us:.0f} us per exchange"
    )
    shutil.rmtree(directory, ignore_errors=True)
    return 0 if statuses == {200: exchanges} else 1


if __name__ == "__main__":
    sys.exit(main())
