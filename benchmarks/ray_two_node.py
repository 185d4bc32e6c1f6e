"""A real two-node Ray cluster on one machine, over loopback, running ``jobs.cache_teacher --address``.

    python benchmarks/ray_two_node.py --workdir /tmp/ray2 [--kill-node2] [--json result.json]

Starts a head (``ray start --head``) and a second node (``ray start --address ...`` with its own
``node2`` resource), runs the cache job on a tiny random-init teacher with its render and teacher
actor pools spread over both nodes, and prints each node's share from the job's report. With
``--kill-node2`` a second run SIGKILLs the second node's Ray worker processes once the first shard
is marked; the job then finishes (Ray restarts the actors) or is re-run (it resumes), and
``--verify`` checks the store. The cluster is always stopped by killing exactly the processes it
started (found by a marker in their environment), never with a global ``ray stop``.

Ray rewrites 127.0.0.1 to the machine's routable address, so the nodes use two other loopback
addresses, 127.0.0.2 (head) and 127.0.0.3 (second node): no packet leaves ``lo``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
HEAD_IP, NODE2_IP = "127.0.0.2", "127.0.0.3"
TINY = ["--vfm", "dinov3_vits", "--model-kwargs", '{"depth": 1}', "--views", "1", "--input-size", "128",
        "--policy-epochs", "1", "2", "3", "--data", "synthetic", "--split", "val", "--shard-size", "8"]
AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all held open until every one is picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LoopbackRayCluster:
    """Head on 127.0.0.2, second node on 127.0.0.3; every process tagged by an environment marker."""

    def __init__(self, workdir: Path, cpus_per_node: int = 2):
        self.workdir, self.cpus = Path(workdir), cpus_per_node
        self.ports = free_ports(17)
        self.port = self.ports.pop()
        self.address = f"{HEAD_IP}:{self.port}"
        self.marker = uuid.uuid4().hex
        self.sessions: set[int] = set()
        # short: Ray's socket paths under it must stay within the 107-byte AF_UNIX limit
        self.temp_dir = tempfile.mkdtemp(prefix="ray2n-", dir="/tmp")
        self.env = dict(os.environ, RTDETR_RAY_CLUSTER=self.marker, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),  # env only, never logged
                        RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")

    def _node_ports(self, ip: str, worker_base: int) -> list[str]:
        return ["--node-ip-address", ip, "--num-cpus", str(self.cpus), "--disable-usage-stats",
                "--min-worker-port", str(worker_base), "--max-worker-port", str(worker_base + 99),
                *(x for flag in ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                                 "--runtime-env-agent-port", "--dashboard-agent-listen-port",
                                 "--dashboard-agent-grpc-port") for x in (flag, str(self.ports.pop())))]

    def _ray(self, args: list[str], what: str) -> None:
        # its own session: every daemon and worker it starts keeps this session id (setproctitle
        # clobbers /proc/PID/environ of the ray:: processes, so the marker alone cannot find them)
        proc = subprocess.Popen([RAY, "start", *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        self.sessions.add(proc.pid)
        stdout, stderr = proc.communicate(timeout=180)
        run = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        if run.returncode != 0:
            raise RuntimeError(f"`ray start` of the {what} failed (rc {run.returncode}): check that the ports are "
                               f"free and `ray status --address {self.address}`:\n{run.stdout[-1500:]}{run.stderr[-1500:]}")

    def start(self) -> "LoopbackRayCluster":
        base = 20000 + secrets.randbelow(200) * 100
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._ray(["--head", "--port", str(self.port), "--temp-dir", self.temp_dir,
                   "--include-dashboard", "false", "--dashboard-port", str(self.ports.pop()),
                   "--ray-client-server-port", str(self.ports.pop()), *self._node_ports(HEAD_IP, base)], "head")
        self._ray(["--address", self.address, "--resources", '{"node2": 1}', *self._node_ports(NODE2_IP, base + 100)],
                  "second node")
        self.wait_for_nodes(2)
        return self

    def alive_nodes(self) -> int:
        run = subprocess.run([RAY, "status", "--address", self.address], env=self.env, capture_output=True,
                             text=True, timeout=60)
        active = run.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return len(re.findall(r"^\s*1 node_", active, re.M))

    def wait_for_nodes(self, n: int, timeout: float = 180) -> None:
        """`ray start` returns before a node has registered: wait until the head lists ``n``."""
        deadline = time.time() + timeout
        while (alive := self.alive_nodes()) < n:
            if time.time() > deadline:
                raise RuntimeError(f"only {alive} of {n} Ray nodes joined the head at {self.address} within "
                                   f"{timeout:.0f} s: check `ray status --address {self.address}` and the raylet "
                                   f"logs in {self.temp_dir}/session_latest/logs")
            time.sleep(1)

    def processes(self) -> list[int]:
        """Every live process of this cluster: in a session of our `ray start`s, or carrying our
        environment marker (a process that called setsid itself)."""
        tag = f"RTDETR_RAY_CLUSTER={self.marker}".encode()
        pids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    state, _, _, sid = (d / "stat").read_text().rsplit(")", 1)[1].split()[:4]
                    if state != "Z" and (int(sid) in self.sessions or tag in (d / "environ").read_bytes().split(b"\0")):
                        pids.append(int(d.name))
                except (OSError, ValueError):
                    continue
        return pids

    def _cmdline(self, pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""

    def node2_workers(self) -> list[int]:
        """Ray worker processes (actors and tasks) that the second node's raylet started."""
        raylets = [p for p in self.processes() if "raylet/raylet" in self._cmdline(p)
                   and f"--node_ip_address={NODE2_IP}" in self._cmdline(p)]
        out = []
        for pid in self.processes():
            try:
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            cmd = self._cmdline(pid)
            if ppid in raylets and cmd.startswith("ray::") and not cmd.startswith(AGENTS):
                out.append(pid)
        return out

    def stop(self) -> list[int]:
        """SIGKILL every process of the cluster until none is left; returns any that survived."""
        for _ in range(50):
            pids = self.processes()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        left = self.processes()
        if not left:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


def node_shares(summary: str) -> dict:
    """{node: {"render": n, "teacher": n}} from the report lines `node X: rendered N views, ran the teacher on M`."""
    return {m[1]: {"render": int(m[2]), "teacher": int(m[3])}
            for m in re.finditer(r"^node (\S+): rendered (\d+) views, ran the teacher on (\d+)$", summary, re.M)}


def cache_job(cluster: LoopbackRayCluster, out: Path, *extra: str, kill_after_first_shard: bool = False):
    cmd = [sys.executable, "-m", "jobs.cache_teacher", *TINY, "--address", cluster.address, "--out", str(out),
           "--render-workers", "2", "--workers", "2", "--quiet", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = []
    if kill_after_first_shard:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and not (out / "done" / "000000.json").exists():
            time.sleep(0.05)
        killed = cluster.node2_workers()
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    return {"rc": proc.returncode, "stdout": stdout, "stderr": stderr[-4000:], "nodes": node_shares(stdout),
            "killed": killed}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="temp dir of the cluster and the stores (created)")
    ap.add_argument("--kill-node2", action="store_true", help="also run once with the second node's workers killed")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    cluster = LoopbackRayCluster(work)
    result = {"address": cluster.address, "temp_dir": cluster.temp_dir, "runs": {}}
    try:
        cluster.start()
        result["runs"]["clean"] = cache_job(cluster, work / "clean")
        if args.kill_node2:
            killed = cache_job(cluster, work / "killed", kill_after_first_shard=True)
            result["runs"]["killed"] = killed
            if killed["rc"] != 0 or "0 failed" not in killed["stdout"]:
                result["runs"]["rerun"] = cache_job(cluster, work / "killed")
        for name in ("clean", "killed") if args.kill_node2 else ("clean",):
            v = subprocess.run([sys.executable, "-m", "jobs.cache_teacher", *TINY, "--out", str(work / name),
                                "--verify", "4"], cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=300)
            result[f"verify_{name}"] = json.loads(v.stdout) if v.returncode in (0, 1) and v.stdout else v.stderr[-2000:]
    finally:
        result["left_after_stop"] = cluster.stop()
    for name, run in result["runs"].items():
        print(f"{name}: rc {run['rc']}, killed {len(run['killed'])} worker(s) of node 2; per node: {run['nodes']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
