#!/usr/bin/python3
"""Deployment as operators do it: the Kubernetes manifests in
deploy/kubernetes/ sized and guarded for what the process does (admin port,
workers, memory per connection), and the README's instructions on a fresh
Debian 12.
"""

import json
import os
import re
import signal
import socket
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
sys.path.insert(0, HERE)
import harness as H  # noqa: E402
from test_k8s_manifests import ManifestCase, by_kind, resolve_port  # noqa: E402
from test_operations import ADMIN_RE, http_get  # noqa: E402

DOCS = os.path.join(H.SOURCE_ROOT, "docs")
ADMIN_MAX_CONNECTIONS = 64  # operations.md, "The admin listener"


def read_text(*parts):
    with open(os.path.join(H.SOURCE_ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def mib(quantity):
    """A Kubernetes memory quantity (Mi, Gi, M, G, plain bytes) in MiB."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|K|M|G)?", str(quantity))
    assert m, quantity
    n = int(m.group(1))
    factor = {None: 1, "Ki": 1024, "Mi": 1024 ** 2, "Gi": 1024 ** 3,
              "K": 1000, "M": 1000 ** 2, "G": 1000 ** 3}[m.group(2)]
    return n * factor / 1024.0 ** 2


def documented_default(key):
    """The default of a top-level key from configuration.md's table."""
    doc = read_text("docs", "configuration.md")
    m = re.search(r"^\| `%s` \| integer \| `(\d+)` \|" % re.escape(key), doc, re.M)
    assert m, "configuration.md has no default for %s" % key
    return int(m.group(1))


def probe(port, path, timeout):
    """One kubelet-style HTTP GET with a deadline: the status, or None when
    no answer came within |timeout| (what the kubelet counts as a failure)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"GET %s HTTP/1.1\r\nHost: 10.0.0.1:9901\r\nConnection: close\r\n\r\n"
                      % path.encode())
            data = b""
            deadline = time.monotonic() + timeout
            while b"\r\n" not in data and time.monotonic() < deadline:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------
# Kubernetes

class GatewayAdminPortReachableTest(H.SparkgateTestCase):
    """gateway.yaml: the admin port (9901, bound on 0.0.0.0 so the kubelet
    can probe it) takes at most 64 connections and then stops accepting
    (operations.md); whoever holds 64 idle connections makes the kubelet's
    /healthz wait past `timeoutSeconds`, and three failed liveness probes
    restart the replica. A tenant's Spark executors run user code in the
    cluster, so the port must not be open to every pod: a NetworkPolicy
    admits it only from the `monitoring` namespace (kubelet probes are not
    subject to NetworkPolicy), unless the admin listener serves probes at
    its cap."""

    def test_probe_starved_by_idle_connections_and_port_open_to_all(self):
        case = ManifestCase("gateway.yaml")
        live = case.sg["livenessProbe"]
        probe_timeout = live.get("timeoutSeconds", 1)
        admin_cfg = case.config["admin"]
        admin_port_in_pod = admin_cfg["port"]
        self.assertEqual(resolve_port(case.sg, live["httpGet"]["port"]), admin_port_in_pod)

        # The gateway's admin listener, on loopback here.
        up = self.standin()
        sg = self.start_sparkgate(H.base_config(
            up.port, listeners=[H.h2c_listener("dev")],
            admin={"address": "127.0.0.1", "port": 0}))
        admin = int(sg.wait_for_log(ADMIN_RE, timeout=5).group(1))
        self.assertEqual(probe(admin, "/healthz", probe_timeout), 200)
        held = []
        self.addCleanup(lambda: [s.close() for s in held])
        for _ in range(ADMIN_MAX_CONNECTIONS):
            held.append(socket.create_connection(("127.0.0.1", admin), timeout=5))
        time.sleep(0.3)
        starved = probe(admin, "/healthz", probe_timeout) is None
        for s in held:
            s.close()
        held.clear()
        if not starved:
            return  # the admin listener serves probes at its cap: fine
        # The probe failed: only a NetworkPolicy keeps the cluster's other
        # pods away from the port.
        labels = case.deployment["spec"]["template"]["metadata"]["labels"]
        guarded = False
        for pol in by_kind(case.docs, "NetworkPolicy"):
            sel = pol["spec"].get("podSelector", {}).get("matchLabels", {})
            if not all(labels.get(k) == v for k, v in sel.items()):
                continue
            if "Ingress" not in pol["spec"].get("policyTypes", ["Ingress"]):
                continue
            # Every rule that admits the admin port must name its sources.
            rules = pol["spec"].get("ingress", [])
            admits_admin_from_anyone = any(
                not r.get("from") and (not r.get("ports") or any(
                    p.get("port") in (admin_port_in_pod, "admin") for p in r["ports"]))
                for r in rules)
            if not admits_admin_from_anyone:
                guarded = True
        self.assertTrue(
            guarded,
            "gateway.yaml: %d idle connections to the admin port made /healthz miss the "
            "liveness probe's %ss timeout, and no NetworkPolicy restricts who reaches port %d "
            "(the sidecar's admits it only from the monitoring namespace)"
            % (ADMIN_MAX_CONNECTIONS, probe_timeout, admin_port_in_pod))


class ManifestMemoryLimitTest(H.SparkgateTestCase):
    """The memory limit of the sparkgate container must hold the
    connections that `max_connections` admits: performance.md gives about
    34 KiB per idle TLS connection that has not yet been trimmed (no call
    in flight). Over the
    limit the kernel OOM-kills the container (every connection and call in
    flight lost) where sparkgate's own cap would refuse a connection,
    logged and counted."""

    def test_limit_covers_max_connections_of_idle_connections(self):
        perf = read_text("docs", "performance.md")
        # The untrimmed figure: connections that worked within the last second.
        m = re.search(r"count\s+about\s+([\d.]+)\s+KiB\s+per\s+connection", perf)
        self.assertIsNotNone(m, "performance.md: the idle connection figure moved")
        kib_per_conn = float(m.group(1))
        problems = []
        for name in ("sidecar.yaml", "gateway.yaml"):
            case = ManifestCase(name)
            limit = case.sg.get("resources", {}).get("limits", {}).get("memory")
            if limit is None:
                continue
            cap = case.config.get("max_connections", documented_default("max_connections"))
            if cap == 0:
                problems.append("%s: max_connections 0 (no cap) under a %s limit" % (name, limit))
                continue
            need = cap * kib_per_conn / 1024.0
            if need > mib(limit):
                problems.append("%s: max_connections %d x %.1f KiB = %.0f MiB of idle "
                                "connections > limits.memory %s" % (name, cap, kib_per_conn,
                                                                    need, limit))
        self.assertEqual(problems, [])


class GatewayWorkersPinnedTest(H.SparkgateTestCase):
    """`"workers": 0` is one worker per CPU the process may run on, and a
    CPU request sets no affinity: in a pod, every CPU of the node. Tenant
    limits are counted per worker and each worker costs memory, so both
    would follow the node the pod lands on: every manifest sets `workers`."""

    def test_every_manifest_pins_workers(self):
        for name in ("sidecar.yaml", "gateway.yaml"):
            case = ManifestCase(name)
            workers = case.config.get("workers", documented_default("workers"))
            self.assertGreater(workers, 0, "%s: \"workers\": 0 starts one worker per CPU of "
                               "the node, whatever the pod requests (%s)"
                               % (name, case.sg.get("resources", {}).get("requests")))


# ---------------------------------------------------------------------------
# Start-up signals (systemd ExecReload / logrotate, the Kubernetes reloader)

# ---------------------------------------------------------------------------
# README on a fresh Debian 12

class ReadmePysparkInstallTest(H.SparkgateTestCase):
    """README.md, "Call it": PySpark for the same root on a fresh Debian 12
    that ran scripts/demo. A bare `pip install` fails there twice over: pip
    is not installed, and Debian 12's Python is EXTERNALLY-MANAGED (PEP
    668). The README says how: a virtual environment (`apt-get install
    python3-venv; python3 -m venv /opt/pyspark; /opt/pyspark/bin/pip install
    "pyspark[connect]"`) and that environment's python for the snippet."""

    def test_pip_instruction_works_on_debian_12(self):
        readme = read_text("README.md")
        if "pip install" not in readme:
            return
        managed = [p for p in ("/usr/lib/python3.11/EXTERNALLY-MANAGED",)
                   if os.path.exists(p)]
        if not managed:
            self.skipTest("not Debian 12's python3.11")
        self.assertTrue(re.search(r"venv|virtualenv|pipx|--break-system-packages", readme),
                        "README says `pip install \"pyspark[connect]\"`, which Debian 12 "
                        "refuses (%s; pip not installed by scripts/install-deps)" % managed[0])


if __name__ == "__main__":
    H.main()
