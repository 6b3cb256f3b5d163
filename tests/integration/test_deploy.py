# -*- test-case-name: tests.integration.test_deploy -*-
"""
Tests for C{deploy/kubernetes/} and the C{Dockerfile} (SPEC 16): every
manifest validates against the Kubernetes schemas that C{kubernetes-validate}
ships (no network needed), and the Deployment has the properties the SPEC
lists: probes, a grace period above the drain, a non-root read-only pod with
no capabilities, secrets as files for every C{*_FILE} variable, C{--workers}
following the CPU limit.
"""

from __future__ import annotations

import glob
import os
import re

from twisted.python.reflect import namedAny
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from caracal.gateway.config import SECRET_FILE_VARIABLES
from caracal.gateway.tap import DRAIN_TIMEOUT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MANIFESTS = os.path.join(ROOT, "deploy", "kubernetes")
DOCKERFILE = os.path.join(ROOT, "Dockerfile")

#: The oldest Kubernetes the manifests promise to work on, and the newest the
#: installed schemas know.
KUBERNETES_VERSIONS = ("1.30.0", None)

_PLACEHOLDER = re.compile(r"^<[^<>]+>$")


def _validator():
    try:
        import yaml
        from kubernetes_validate import utils
    except ImportError:
        raise SkipTest("kubernetes-validate is not installed: pip install '.[test]'") from None
    return yaml, utils


def load_manifests() -> dict[str, dict]:
    """Every resource under deploy/kubernetes, by C{Kind/name}."""
    yaml, _ = _validator()
    resources = {}
    for path in sorted(glob.glob(os.path.join(MANIFESTS, "*.yaml"))):
        with open(path, encoding="utf-8") as manifest:
            for document in yaml.safe_load_all(manifest):
                if document:
                    resources[f"{document['kind']}/{document['metadata']['name']}"] = document
    return resources


class SchemaTests(SynchronousTestCase):
    """The manifests are valid Kubernetes resources."""

    def test_every_manifest_validates(self) -> None:
        """Strict validation (no unknown field) against old and new schema versions."""
        _, utils = _validator()
        resources = load_manifests()
        self.assertTrue(resources)
        for version in KUBERNETES_VERSIONS:
            version = version or utils.latest_version()
            for name, resource in resources.items():
                try:
                    utils.validate(resource, version, strict=True)
                except utils.ValidationError as error:
                    self.fail(f"{name} invalid for Kubernetes {version}: {error.message}")

    def test_validator_rejects_a_broken_manifest(self) -> None:
        """The validation above can fail: a misspelt field is refused."""
        _, utils = _validator()
        deployment = load_manifests()["Deployment/caracal-gateway"]
        broken = {**deployment, "spec": {**deployment["spec"], "replicaz": 3}}
        self.assertRaises(
            utils.ValidationError, utils.validate, broken, utils.latest_version(), True
        )

    def test_every_kind_shipped(self) -> None:
        """The SPEC's list: Deployment, Service, PodDisruptionBudget, HPA, NetworkPolicy."""
        kinds = {name.split("/")[0] for name in load_manifests()}
        for kind in (
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "NetworkPolicy",
        ):
            self.assertIn(kind, kinds)


class DeploymentTests(SynchronousTestCase):
    """The Deployment's pod is what SPEC 16 asks for."""

    def setUp(self) -> None:
        self.resources = load_manifests()
        self.deployment = self.resources["Deployment/caracal-gateway"]
        self.pod = self.deployment["spec"]["template"]["spec"]
        (self.container,) = self.pod["containers"]
        self.env = {item["name"]: item for item in self.container.get("env", [])}
        self.labels = self.deployment["spec"]["template"]["metadata"]["labels"]
        self.port = next(p for p in self.container["ports"] if p["containerPort"] == 8081)

    def test_command_is_twistd_with_workers_from_cpu_limit(self) -> None:
        """
        C{twistd -n caracal-gateway --workers N}, N the CPU limit in whole
        cores (the kubelet expands C{$(GATEWAY_WORKERS)}), and twistd's own
        parser accepts the line.
        """
        from twisted.scripts.twistd import ServerOptions

        command = self.container["command"] + self.container["args"]
        self.assertEqual(command[0], "twistd")
        workers = command[command.index("--workers") + 1]
        self.assertEqual(workers, "$(GATEWAY_WORKERS)")
        source = self.env["GATEWAY_WORKERS"]["valueFrom"]["resourceFieldRef"]
        self.assertEqual(source["resource"], "limits.cpu")
        self.assertEqual(source["containerName"], self.container["name"])
        self.assertEqual(str(source["divisor"]), "1")
        cpu = str(self.container["resources"]["limits"]["cpu"])
        self.assertRegex(cpu, r"^[1-9][0-9]*$", "a whole number of cores")

        options = ServerOptions()
        options.parseOptions([cpu if arg == workers else arg for arg in command[1:]])
        self.assertTrue(options["nodaemon"])
        self.assertEqual(options["pidfile"], "", "no pidfile on a read-only root")
        self.assertIs(options["logger"], namedAny("caracal.gateway.logfile.observer"))
        self.assertEqual(options.subCommand, "caracal-gateway")
        self.assertEqual(options.subOptions["workers"], int(cpu))

    def probe(self, kind: str) -> dict:
        probe = self.container[kind]["httpGet"]
        self.assertIn(probe["port"], (self.port["name"], self.port["containerPort"]))
        self.assertEqual(probe["scheme"], "HTTPS", "the gateway's port speaks TLS")
        return probe

    def test_probes(self) -> None:
        """Readiness on /ready, liveness and startup on /health, over HTTPS."""
        self.assertEqual(self.probe("readinessProbe")["path"], "/ready")
        self.assertEqual(self.probe("livenessProbe")["path"], "/health")
        self.assertEqual(self.probe("startupProbe")["path"], "/health")
        startup = self.container["startupProbe"]
        # A starting gateway waits up to 10 s for its state before listening.
        self.assertGreater(startup["periodSeconds"] * startup["failureThreshold"], 10)

    def test_grace_period_covers_pause_and_drain(self) -> None:
        """preStop pauses first; the grace period outlasts the pause plus the 25 s drain."""
        command = self.container["lifecycle"]["preStop"]["exec"]["command"]
        self.assertEqual(command[0], "sleep")
        pause = int(command[1])
        self.assertGreater(pause, 0)
        self.assertGreater(self.pod["terminationGracePeriodSeconds"], pause + DRAIN_TIMEOUT)

    def test_rollout_keeps_capacity(self) -> None:
        """A new pod comes up before an old one goes."""
        rolling = self.deployment["spec"]["strategy"]["rollingUpdate"]
        self.assertEqual(rolling["maxUnavailable"], 0)
        self.assertGreaterEqual(self.deployment["spec"]["replicas"], 2)

    def test_security_context(self) -> None:
        """Non-root, read-only root, no privilege escalation, no capabilities, RuntimeDefault."""
        pod = self.pod["securityContext"]
        container = self.container["securityContext"]
        self.assertTrue(pod["runAsNonRoot"])
        self.assertGreater(pod["runAsUser"], 0)
        self.assertEqual(pod["seccompProfile"]["type"], "RuntimeDefault")
        self.assertTrue(container["readOnlyRootFilesystem"])
        self.assertFalse(container["allowPrivilegeEscalation"])
        self.assertFalse(container.get("privileged", False))
        self.assertEqual(container["capabilities"]["drop"], ["ALL"])
        self.assertNotIn("add", container["capabilities"])
        self.assertFalse(self.pod["automountServiceAccountToken"])

    def volume_at(self, path: str) -> dict:
        """The volume mounted at the directory holding C{path}."""
        for mount in self.container["volumeMounts"]:
            if path == mount["mountPath"] or path.startswith(mount["mountPath"] + "/"):
                return mount, next(v for v in self.pod["volumes"] if v["name"] == mount["name"])
        self.fail(f"nothing mounted at {path}")

    def test_secrets_as_files(self) -> None:
        """
        Every C{*_FILE} secret names a file of a read-only secret volume
        holding that key, and the secret itself is in no environment.
        """
        configmap = self.resources["ConfigMap/caracal-gateway"]["data"]
        for name in sorted(SECRET_FILE_VARIABLES):
            self.assertNotIn(name, self.env)
            self.assertNotIn(name, configmap)
            path = self.env[f"{name}_FILE"]["value"]
            mount, volume = self.volume_at(path)
            self.assertTrue(mount["readOnly"], name)
            self.assertIn("secret", volume, name)
            relative = path[len(mount["mountPath"]) + 1 :]
            self.assertIn(relative, [item["path"] for item in volume["secret"]["items"]])
            self.assertEqual(volume["secret"]["defaultMode"] & 0o007, 0, "not world-readable")
        for name in ("TLS_CERT_FILE", "TLS_KEY_FILE"):
            _, volume = self.volume_at(self.env[name]["value"])
            self.assertIn("secret", volume, name)

    def test_writable_directories_are_empty_dirs(self) -> None:
        """The audit spool and /tmp are emptyDirs; every other mount is read-only."""
        for path in (self.env["AUDIT_SPOOL_DIR"]["value"], "/tmp"):
            mount, volume = self.volume_at(path)
            self.assertEqual(mount["mountPath"], path)
            self.assertIn("emptyDir", volume)
        for mount in self.container["volumeMounts"]:
            volume = next(v for v in self.pod["volumes"] if v["name"] == mount["name"])
            if "emptyDir" not in volume:
                self.assertTrue(mount.get("readOnly"), mount["name"])

    def test_no_secret_values(self) -> None:
        """The example Secret holds placeholders only, and no env value is inline secret."""
        secret = self.resources["Secret/caracal-gateway"]
        for key, value in secret["stringData"].items():
            self.assertRegex(value, _PLACEHOLDER, key)
        volume_keys = set()
        for volume in self.pod["volumes"]:
            if volume.get("secret", {}).get("secretName") == "caracal-gateway":
                volume_keys = {item["key"] for item in volume["secret"]["items"]}
        self.assertEqual(volume_keys, set(secret["stringData"]))

    def test_other_resources_select_the_pods(self) -> None:
        """Service, PDB, NetworkPolicy select the pod's labels; the HPA scales the Deployment."""

        def selects(selector: dict) -> bool:
            return all(self.labels.get(k) == v for k, v in selector.items())

        service = self.resources["Service/caracal-gateway"]["spec"]
        self.assertTrue(selects(service["selector"]))
        self.assertIn(service["ports"][0]["targetPort"], (self.port["name"], 8081))
        pdb = self.resources["PodDisruptionBudget/caracal-gateway"]["spec"]
        self.assertTrue(selects(pdb["selector"]["matchLabels"]))
        self.assertLess(pdb["maxUnavailable"], self.deployment["spec"]["replicas"])
        policy = self.resources["NetworkPolicy/caracal-gateway"]["spec"]
        self.assertTrue(selects(policy["podSelector"]["matchLabels"]))
        ingress_ports = [port["port"] for rule in policy["ingress"] for port in rule["ports"]]
        self.assertIn(8081, ingress_ports)
        hpa = self.resources["HorizontalPodAutoscaler/caracal-gateway"]["spec"]
        self.assertEqual(hpa["scaleTargetRef"]["kind"], "Deployment")
        self.assertEqual(hpa["scaleTargetRef"]["name"], self.deployment["metadata"]["name"])
        self.assertGreaterEqual(hpa["minReplicas"], 2)


class DockerfileTests(SynchronousTestCase):
    """The image: multi-stage, slim, non-root, no build tools in the final stage."""

    def setUp(self) -> None:
        with open(DOCKERFILE, encoding="utf-8") as dockerfile:
            text = dockerfile.read()
        # Join continued lines, drop comments.
        text = re.sub(r"\\\n(\s*#.*\n)*", " ", text)
        self.lines = [
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")
        ]
        starts = [i for i, line in enumerate(self.lines) if line.upper().startswith("FROM ")]
        self.stages = len(starts)
        self.final = self.lines[starts[-1] :]
        self.arguments = {
            line.split()[1].split("=")[0]: line.split("=", 1)[1]
            for line in self.lines
            if line.upper().startswith("ARG ") and "=" in line
        }

    def test_multi_stage_slim(self) -> None:
        """At least two stages; the final one is a slim Python image."""
        self.assertGreaterEqual(self.stages, 2)
        base = self.final[0].split()[1]
        base = self.arguments.get(base.strip("${}"), base)
        self.assertRegex(base, r"^python:3\.1[1-9][.0-9]*-slim")

    def test_non_root_user(self) -> None:
        """The final stage runs as the numeric user the Deployment names."""
        users = [line.split()[1] for line in self.final if line.upper().startswith("USER ")]
        self.assertTrue(users)
        uid = users[-1].split(":")[0]
        pod = load_manifests()["Deployment/caracal-gateway"]["spec"]["template"]["spec"]
        self.assertEqual(int(uid), pod["securityContext"]["runAsUser"])

    def test_no_build_tools_in_final_stage(self) -> None:
        """Nothing is compiled or installed with a package manager in the final stage."""
        final = " ".join(self.final)
        for tool in ("apt-get install", "gcc", "build-essential", "pip install", "-dev "):
            self.assertNotIn(tool, final)
        self.assertIn("COPY --from=build", final)

    def test_entrypoint(self) -> None:
        """twistd in the foreground, no pidfile, the caracal-gateway plugin."""
        entrypoint = next(line for line in self.final if line.upper().startswith("ENTRYPOINT"))
        for part in ('"twistd"', '"--nodaemon"', '"--pidfile="', '"caracal-gateway"'):
            self.assertIn(part, entrypoint)
