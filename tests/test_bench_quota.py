# -*- test-case-name: tests.test_bench_quota -*-
"""
C{bench/run.py --cpu-quota}: the quota arithmetic, the refusal of quotas the
machine cannot give, finding the cpu controller, and the cgroup files the
bench writes, moves and removes, against a temporary directory standing in
for the cgroup mount (no real cgroup is touched).
"""

from __future__ import annotations

import importlib.util
import os
import shutil

from twisted.trial.unittest import SynchronousTestCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench():
    """C{bench/run.py} as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location(
        "caracal_bench_run", os.path.join(REPO, "bench", "run.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def read(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read()


class QuotaArithmeticTests(SynchronousTestCase):
    """CORES of a core as a CFS quota, and what a machine can give."""

    def test_quota_per_period(self) -> None:
        """0.4 of a core is 40 ms per 100 ms period; 1.5 cores 150 ms."""
        self.assertEqual(bench.cfs_quota_us(0.4), 40_000)
        self.assertEqual(bench.cfs_quota_us(1.5), 150_000)
        self.assertEqual(bench.cfs_quota_us(0.25, period_us=200_000), 50_000)

    def test_quota_below_kernel_minimum(self) -> None:
        """Under 1 ms per period the kernel refuses the quota: the bench says so first."""
        self.assertRaises(bench.BenchError, bench.cfs_quota_us, 0.005)

    def test_fits_leaving_one_core(self) -> None:
        """Two workers of 0.4 on 2 cores leave 1.2 cores for the rig: accepted."""
        self.assertIsNone(bench.quota_problem(0.4, 2, 2))
        self.assertIsNone(bench.quota_problem(0.5, 2, 2))

    def test_refused_when_rig_has_no_core(self) -> None:
        """N x CORES above cores - 1 is refused, as are quotas that are not positive."""
        self.assertIn("more than the 2 cores minus one", bench.quota_problem(0.6, 2, 2))
        self.assertIsNotNone(bench.quota_problem(0.4, 1, 1))
        self.assertIsNotNone(bench.quota_problem(0, 1, 8))

    def test_command_line_refuses(self) -> None:
        """parse_args exits (status 2) for a quota the machine cannot give N workers."""
        cpus = os.cpu_count() or 1
        error = self.assertRaises(
            SystemExit,
            bench.parse_args,
            ["--targets", "per_call,workers", "--workers", str(cpus), "--cpu-quota", "1"],
        )
        self.assertEqual(error.code, 2)

    def test_command_line_quota_needs_gateway_target(self) -> None:
        """--cpu-quota with only the bare target is an error, not silently ignored."""
        self.assertRaises(
            SystemExit, bench.parse_args, ["--targets", "bare", "--cpu-quota", "0.01"]
        )

    def test_no_quota_by_default(self) -> None:
        """Without the option nothing is limited (the bench behaves as before)."""
        self.assertIsNone(bench.parse_args([]).cpu_quota)


class FindCgroupTests(SynchronousTestCase):
    """Which hierarchy holds a writable cpu controller, from a mounts table."""

    def mounts(self, *lines: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="ascii") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def test_v1_cpu(self) -> None:
        """A v1 hierarchy with the cpu controller and cpu.cfs_quota_us is chosen."""
        root = self.mktemp()
        os.makedirs(root)
        open(os.path.join(root, "cpu.cfs_quota_us"), "w").close()
        table = self.mounts(
            "cgroup /x/memory cgroup rw,memory 0 0",
            f"cgroup {root} cgroup rw,relatime,cpu 0 0",
        )
        self.assertEqual(bench.find_cpu_cgroup(table), ("v1", root))

    def cgroup2(self, controllers: str) -> tuple[str, str]:
        """A cgroup2 mount offering C{controllers}: its root and the mount table naming it."""
        root = self.mktemp()
        os.makedirs(root)
        with open(os.path.join(root, "cgroup.controllers"), "w") as f:
            f.write(controllers + "\n")
        return root, self.mounts(f"cgroup2 {root} cgroup2 rw 0 0")

    def test_v2_cpu(self) -> None:
        """Without v1 cpu, a cgroup2 mount offering cpu is chosen."""
        root, table = self.cgroup2("cpuset cpu io memory pids")
        self.assertEqual(bench.find_cpu_cgroup(table), ("v2", root))

    def test_neither(self) -> None:
        """No cpu controller anywhere (a cgroup2 without cpu): a clear error."""
        _root, table = self.cgroup2("memory pids")
        error = self.assertRaises(bench.BenchError, bench.find_cpu_cgroup, table)
        self.assertIn("needs a writable cgroup cpu controller", str(error))


class CpuCgroupsTests(SynchronousTestCase):
    """The files written into a stand-in cgroup mount, and their removal."""

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.removed = []

    def rmdir(self, path: str) -> None:
        # cgroupfs removes a cgroup with its control files; a plain
        # directory needs them removed first.
        self.removed.append(path)
        shutil.rmtree(path)

    def cgroups(self, version: str = "v1") -> bench.CpuCgroups:
        return bench.CpuCgroups(0.4, version, self.root, prefix="t", rmdir=self.rmdir)

    def test_v1_files(self) -> None:
        """v1: period, quota (0.4 of a core), a tenfold weight, then the pid."""
        path = self.cgroups().limit("workers-worker-1", 4242)
        self.assertEqual(path, os.path.join(self.root, "t-workers-worker-1"))
        self.assertEqual(read(os.path.join(path, "cpu.cfs_period_us")), "100000")
        self.assertEqual(read(os.path.join(path, "cpu.cfs_quota_us")), "40000")
        self.assertEqual(read(os.path.join(path, "cpu.shares")), "10240")
        self.assertEqual(read(os.path.join(path, "cgroup.procs")), "4242")

    def test_v2_files(self) -> None:
        """v2: cpu enabled for the children, C{cpu.max} "quota period", a weight, the pid."""
        with open(os.path.join(self.root, "cgroup.subtree_control"), "w") as f:
            f.write("memory\n")
        path = self.cgroups("v2").limit("per_call-gateway", 4242)
        self.assertEqual(read(os.path.join(self.root, "cgroup.subtree_control")), "+cpu")
        self.assertEqual(read(os.path.join(path, "cpu.max")), "40000 100000")
        self.assertEqual(read(os.path.join(path, "cpu.weight")), "1000")
        self.assertEqual(read(os.path.join(path, "cgroup.procs")), "4242")

    def test_uncapped_rig(self) -> None:
        """The rig's cgroup is weighted but has no quota."""
        path = self.cgroups().limit("rig", 4242, capped=False)
        self.assertEqual(read(os.path.join(path, "cpu.shares")), "10240")
        self.assertFalse(os.path.exists(os.path.join(path, "cpu.cfs_quota_us")))

    def test_release_moves_back_and_removes(self) -> None:
        """Releasing moves the cgroup's processes back where they were, then removes it."""
        groups = self.cgroups()
        path = groups.limit("per_call-gateway", os.getpid())
        groups.release(path)
        self.assertEqual(self.removed, [path])
        self.assertEqual(groups.made, [])
        # This process is in the hierarchy's root here (/proc/self/cgroup
        # names no directory of the stand-in mount).
        self.assertEqual(read(os.path.join(self.root, "cgroup.procs")), str(os.getpid()))

    def test_remove_all(self) -> None:
        """Teardown removes every cgroup made, newest first, and reports what it could not."""
        groups = self.cgroups()
        first = groups.limit("rig", 11, capped=False)
        second = groups.limit("workers-worker-1", 12)
        self.assertEqual(groups.remove_all(), [])
        self.assertEqual(self.removed, [second, first])
        self.assertEqual(os.listdir(self.root), ["cgroup.procs"])

    def test_remove_all_reports_failures(self) -> None:
        """A cgroup that cannot be removed is named in the problems, the others still go."""
        groups = bench.CpuCgroups(0.4, "v1", self.root, prefix="t", rmdir=os.rmdir)
        groups.limit("rig", 11, capped=False)
        problems = groups.remove_all()
        self.assertEqual(len(problems), 1)
        self.assertIn("could not remove cgroup", problems[0])

    def test_stat(self) -> None:
        """cpu.stat of v1 (throttled_time in ns) and v2 (throttled_usec) read alike."""
        path = os.path.join(self.root, "g")
        os.makedirs(path)
        with open(os.path.join(path, "cpu.stat"), "w") as f:
            f.write("nr_periods 150\nnr_throttled 140\nthrottled_time 9000000\n")
        self.assertEqual(
            bench.CpuCgroups.stat(path),
            {"periods": 150, "throttled_periods": 140, "throttled_us": 9000},
        )
        with open(os.path.join(path, "cpu.stat"), "w") as f:
            f.write("usage_usec 5\nnr_periods 10\nnr_throttled 3\nthrottled_usec 70\n")
        self.assertEqual(
            bench.CpuCgroups.stat(path),
            {"periods": 10, "throttled_periods": 3, "throttled_us": 70},
        )


class ReportTests(SynchronousTestCase):
    """The quota in the table's header and each limited process's line."""

    def test_header_and_lines(self) -> None:
        """The header names the quota; each limited process shows its share and throttling."""
        result = {
            "requests": 100, "seconds": 1.0, "rps": 100.0, "p50_ms": 1.0, "p99_ms": 2.0,
            "errors": 0, "valid": True, "tokens_exhausted": 0,
            "cpu_quota": {"cores": 0.4, "processes": {
                "gateway": {"core_share": 0.4, "at_quota": True, "periods": 10,
                            "throttled_periods": 9, "throttled_us": 1},
            }},
        }  # fmt: skip
        settings = {"cpu_quota": {"cores": 0.4, "cgroup": "v1", "quota_us": 40000,
                                  "period_us": 100000}}  # fmt: skip
        table = bench.format_table({"per_call": result}, {}, [], settings)
        self.assertTrue(table.startswith("cpu quota: 0.4 of a core"))
        self.assertIn(
            "cpu quota during per_call (0.4 of a core): gateway 40% (throttled in 9 of 10 periods)",
            table,
        )
        # Without a quota the table starts with its column titles, as before.
        plain = bench.format_table({"per_call": result}, {}, [], {"cpu_quota": None})
        self.assertTrue(plain.startswith("target "))


class MeasuredCommandTests(SynchronousTestCase):
    """The command a report records."""

    def test_out_path_left_out(self) -> None:
        """Where the report went (a machine path) is not recorded; every other option is."""
        for argv in (
            ["--duration", "15", "--out", "reports/run.json", "--idle", "1000"],
            ["--duration", "15", "--out=reports/run.json", "--idle", "1000"],
        ):
            self.assertEqual(
                bench.measured_command(argv),
                "python bench/run.py --duration 15 --idle 1000",
            )
