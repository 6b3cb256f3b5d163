"""
Instructions per gateway call, counted by valgrind's callgrind: a figure that
does not move with what else the machine is doing, for comparing two versions
of the code (the CPU-time figures of bench/run.py need a quiet machine).

    .venv/bin/python bench/count.py [--calls 400] [--connections 8] [--mode per_call]
        [--target gateway|bare] [--keep]

It starts what bench/run.py starts for the target (the upstream; for the
gateway also the dev STS, a temporary database and the gateway itself, with
the production logger), the measured server under
C{valgrind --tool=callgrind --instr-atstart=no}, sends C{--warmup} calls
uncounted, switches counting on (C{callgrind_control -i on}), sends
C{--calls} calls over C{--connections} keep-alive TLS connections, switches
it off and prints the server's instructions per call. Under valgrind the
server runs some 50 times slower, so the counted calls see fewer calls in
flight per reactor turn than under wrk: compare counts with each other, not
with bench/run.py's microseconds.
"""

from __future__ import annotations

import argparse
import glob
import http.client
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run as bench_run  # noqa: E402  (bench/run.py, beside this file)


def _callgrind(pid: int, *args: str) -> None:
    subprocess.run(
        ["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120
    )


def _send(port: int, ca_file: str, headers_for, count: int, connections: int) -> None:
    """C{count} GETs over C{connections} keep-alive TLS connections; each must answer 200."""
    failures: list[str] = []
    lock = threading.Lock()
    remaining = [count]

    def one_connection() -> None:
        context = ssl.create_default_context(cafile=ca_file)
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=120)
        try:
            while True:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                    headers = headers_for()
                connection.request("GET", bench_run.PATH, headers=headers)
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    failures.append(f"{response.status}")
                    return
        finally:
            connection.close()

    threads = [threading.Thread(target=one_connection) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise bench_run.BenchError(f"calls failed: {failures[:5]}")


def _instructions(directory: str) -> int:
    """The instructions (Ir) counted in every callgrind dump in C{directory}."""
    total = 0
    for path in glob.glob(os.path.join(directory, "callgrind.out.*")):
        with open(path) as dump:
            total += sum(int(line.split()[1]) for line in dump if line.startswith("totals:"))
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/count.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--mode", choices=("per_call", "ambient"), default="per_call")
    parser.add_argument("--target", choices=("gateway", "bare"), default="gateway")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    options = parser.parse_args(argv)
    if shutil.which("callgrind_control") is None:
        print("bench/count.py needs valgrind (apt-get install -y valgrind)", file=sys.stderr)
        return 2

    args = bench_run.parse_args(["--quiet", "--targets", "ambient"])
    bench = bench_run.Bench(args)
    dumps = os.path.join(bench.directory, "callgrind")
    os.makedirs(dumps)
    valgrind = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={dumps}/callgrind.out.%p",
    ]
    plain_python = bench_run.python_command
    plain_twistd = bench_run.twistd_command
    if options.target == "gateway":
        bench_run.twistd_command = lambda *a: (
            valgrind + plain_twistd(*a) if "caracal-gateway" in a else plain_twistd(*a)
        )
    else:
        bench_run.python_command = lambda script, *a: (
            valgrind + plain_python(script, *a) if a[:1] == ("bare",) else plain_python(script, *a)
        )
    bench_run.START_TIMEOUT = 300.0
    try:
        bench.start_upstream_and_certs()
        if options.target == "gateway":
            bench.start_gateway()
            port, name = bench.gateway_port, "gateway"
            if options.mode == "per_call":
                tokens = bench_run.mint_tokens(
                    bench.sts_port, bench.zone, options.warmup + options.calls, "per_call"
                )
            else:
                [token] = bench_run.mint_tokens(bench.sts_port, bench.zone, 1, "ambient")
                tokens = [token] * (options.warmup + options.calls)
            tokens.reverse()

            def headers_for():
                return bench.gateway_headers(tokens.pop())
        else:
            bench.start_bare()
            port, name = bench.bare_port, "bare"

            def headers_for():
                return {}

        pid = bench.processes.pid(name)
        _send(port, bench.ca, headers_for, options.warmup, options.connections)
        _callgrind(pid, "-i", "on")
        started = time.monotonic()
        _send(port, bench.ca, headers_for, options.calls, options.connections)
        _callgrind(pid, "-i", "off")
        _callgrind(pid, "-d")
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + 60
        total = 0
        while time.monotonic() < deadline and not total:
            time.sleep(0.5)
            total = _instructions(dumps)
        print(
            f"{name} {options.mode if name == 'gateway' else ''}: {options.calls} calls over "
            f"{options.connections} connections in {elapsed:.1f} s under callgrind: "
            f"{total / options.calls:,.0f} instructions per call"
        )
        return 0 if total else 1
    finally:
        bench.args.keep_temp = options.keep
        bench.teardown()


if __name__ == "__main__":
    sys.exit(main())
