"""The cache job on a real two-node Ray cluster over loopback (benchmarks/ray_two_node.py): both
nodes render and run the teacher; killing the second node's workers mid-run loses no view and
duplicates none; the cluster leaves no process behind."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cache_teacher import main
from teacher_cache.store import Store

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOMLY INITIALISED")


def _load_script():
    import importlib.util
    spec = importlib.util.spec_from_file_location("ray_two_node", REPO / "benchmarks" / "ray_two_node.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # two Ray nodes and two cache runs (~2 min on 2 cores)
def test_two_nodes_share_the_work_and_survive_a_killed_node(tmp_path):
    script = _load_script()
    work = tmp_path / "cluster"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ray_two_node.py"), "--workdir", str(work),
                          "--kill-node2", "--json", str(tmp_path / "result.json")],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    clean = result["runs"]["clean"]
    assert clean["rc"] == 0 and "8 written" in clean["stdout"], clean["stderr"]
    ips = {node.split("/")[0]: share for node, share in clean["nodes"].items()}
    assert set(ips) == {script.HEAD_IP, script.NODE2_IP}                  # both nodes...
    assert all(s["render"] > 0 and s["teacher"] > 0 for s in ips.values())  # ...rendered and ran the teacher
    assert sum(s["teacher"] for s in ips.values()) == 64 * 4

    killed = result["runs"]["killed"]
    assert killed["killed"], "no worker of the second node was running at the kill"
    final = result["runs"].get("rerun", killed)          # Ray restarted the actors, or the re-run resumed
    assert final["rc"] == 0 and "0 failed" in final["stdout"], final["stderr"]
    for name in ("clean", "killed"):
        v = result[f"verify_{name}"]
        assert v["problems"] == [] and v["complete_shards"] == 8 and v["online_cosine_min"] >= 0.999
    assert result["left_after_stop"] == []

    reference = tmp_path / "local"     # the same job in-process: every view, once, in its place
    assert main([*script.TINY, "--out", str(reference), "--no-ray", "--quiet"]) == 0
    a, b, c = (Store.open(str(p)) for p in (reference, work / "clean", work / "killed"))
    assert (a.tokens[:] == b.tokens[:]).all() and (a.tokens[:] == c.tokens[:]).all()
    assert (a.scale[:] == c.scale[:]).all()
    ps = subprocess.run(["ps", "-eo", "stat,args"], capture_output=True, text=True).stdout.splitlines()
    assert [line for line in ps if (str(work) in line or result["temp_dir"] in line) and not line.startswith("Z")] == []


def test_unreachable_ray_address_is_named_with_what_to_check(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]          # nothing listens here once closed
    with pytest.raises(SystemExit) as e:
        main([*_load_script().TINY, "--model-kwargs", '{"depth": 1}', "--out", str(tmp_path / "store"),
              "--address", f"127.0.0.1:{port}", "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"cannot reach Ray at --address 127.0.0.1:{port}" in err and "ray status" in err
