"""Two-node torchrun over loopback: the docs' multi-node command (docs/cluster.md), run as two
"nodes" (two torchrun agents, each in its own working directory) that meet through the c10d
rendezvous on 127.0.0.1; killed after a checkpoint and resumed."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TRAIN = ["--size", "s", "--epochs", "2", "--img-size", "128", "--batch-size", "4", "--max-steps-per-epoch", "3",
         "--workers", "0", "--log-every", "1", "--vfm", "dinov3_vits", "--eval-max-images", "2", "--out", "runs/s"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               GLOO_SOCKET_IFNAME="lo")   # on a real cluster: the NIC the nodes share (docs/cluster.md)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _launch(node_rank: int, port: int, cwd: Path, extra=()) -> subprocess.Popen:
    """docs/cluster.md: the same command on every node, only --node_rank differs."""
    cmd = [TORCHRUN, "--nnodes", "2", "--node_rank", str(node_rank), "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"rtdetr-{port}",
           "--local_addr", "127.0.0.1", "-m", "jobs.train", *TRAIN, *extra]
    log = open(cwd / f"node{node_rank}.log", "ab")
    return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(procs) -> None:
    """SIGKILL the agents and their workers: torchrun starts each worker in a session of its own, so
    killing an agent's group alone leaves its worker running (and writing into the run folder)."""
    workers = []
    for p in procs:
        if p.poll() is None:
            children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(p.pid)], capture_output=True, text=True)
            workers += [int(pid) for pid in children.stdout.split()]
            os.killpg(p.pid, signal.SIGKILL)
    for pid in workers:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper has released everything it held)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _leftovers(tag: str) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in ps if tag in line and "ps -eo" not in line]


@pytest.mark.slow  # two 2-node launches of train S (~2 min on 2 cores)
def test_two_node_torchrun_one_lambda_one_checkpoint_and_resume(tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for d in nodes:
        d.mkdir()
    port = _free_port()
    procs = [_launch(r, port, d, ["--checkpoint-every", "1"]) for r, d in enumerate(nodes)]
    try:
        deadline = time.time() + 400
        while time.time() < deadline and all(p.poll() is None for p in procs) and \
                not any((d / "runs/s/last.pth").is_file() for d in nodes):
            time.sleep(0.1)
    finally:
        _stop(procs)   # the kill: both agents and their workers
    logs = "".join((d / f"node{r}.log").read_text(errors="replace") for r, d in enumerate(nodes))
    written = [d for d in nodes if (d / "runs/s/last.pth").is_file()]
    assert len(written) == 1, logs[-4000:]              # rank 0 alone writes checkpoints
    main, other = written[0], next(d for d in nodes if d != written[0])
    assert not list(other.rglob("*.pth")) and not (other / "runs/s/metrics.jsonl").exists()
    evals = main / "runs/s/eval.jsonl"
    assert not evals.exists() or len(evals.read_text().splitlines()) < 2, "killed too late"

    port = _free_port()   # resume: every node reads rank 0's checkpoint (shared storage on a cluster)
    procs = [_launch(r, port, d, ["--resume", str(main / "runs/s/last.pth")])
             for r, d in enumerate(nodes)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        _stop(procs)
    logs = "".join((d / f"node{r}.log").read_text(errors="replace") for r, d in enumerate(nodes))
    assert codes == [0, 0], logs[-4000:]
    assert "resumed" in logs
    assert not list(other.rglob("*.pth"))
    records = [json.loads(line) for line in evals.read_text().splitlines()]
    assert [r["epoch"] for r in records][-1] == 1
    for r in records:
        lam, weights = r["gam"]["lambda_per_rank"], r["weights_sha256_per_rank"]
        assert len(lam) == 2 and lam[0] == lam[1] == r["gam"]["lambda_new"]
        assert len(weights) == 2 and weights[0] == weights[1]      # identical weights on both ranks
    assert _leftovers(f"rtdetr-{port}") == [] and _leftovers(str(tmp_path)) == []


def test_resume_checkpoint_missing_on_a_node_is_named(tmp_path):
    from pipeline.train.trainer import TrainConfig, Trainer

    missing = tmp_path / "runs" / "s" / "last.pth"
    with pytest.raises(FileNotFoundError, match=rf"rank 0 on {socket.gethostname()}: --resume {missing}: no such run "
                                                "directory or checkpoint. In a multi-node run every node loads"):
        Trainer(TrainConfig(size="s", resume=str(missing), out=str(tmp_path / "out"), distill="none"))
