"""Training across machines: two torchrun agents meeting through the c10d rendezvous, as two nodes of a cluster do
(here on one machine, each agent one process), train exactly as one agent with two processes, and a node that dies
leaves the run resumable."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import started_process, wait_for, write_image_folder

from repvgg.io.checkpoint import load_checkpoint

#: The fields of a metrics.jsonl row that are timings (they differ between any two runs).
_TIMINGS = ("epoch_time_s", "train_images_per_s", "data_wait_s_per_step")


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _two_nodes(endpoint: str, train: list[str], logs: Path) -> list[list[str]]:
    """Two ``torchrun`` commands, one process each, meeting through the c10d rendezvous at ``endpoint`` as two
    machines do (the first hosts its store)."""
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
             "--rdzv-conf", f"is_host={node == 0},join_timeout=300", "--log-dir", str(logs / f"node{node}"),
             "-m", "repvgg", *train] for node in (0, 1)]


def _process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(line).items() if k not in _TIMINGS}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(1500)  # above run_process's own limit, which ends the processes
def test_two_nodes_through_the_c10d_rendezvous_train_as_two_processes_on_one(tmp_path: Path) -> None:
    """Two torchrun agents, one process each, meeting through the c10d rendezvous (node ranks told by it), give the
    metrics of one agent with two processes, bit for bit but for timings; and the one-node run is exact too (the
    evaluation shards add up, the odd image counted once)."""
    data = write_image_folder(tmp_path / "data", classes=3, per_class=5, size=16)  # 15 images: an odd count
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = ["train", "--model", "repvgg_tiny", "--device", "cpu", "--data", str(data), "--img-size", "16",
             "--batch-size", "4", "--epochs", "1", "--no-inference-speed", "--output"]
    one = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--log-dir", str(tmp_path / "logs" / "one-agent"), "-m", "repvgg", *train, str(tmp_path / "one")]
    two = _two_nodes(f"127.0.0.1:{_free_port()}", [*train, str(tmp_path / "two")], tmp_path / "logs")
    logs = tmp_path / "logs"
    with started_process(one, logs / "one", env=env) as reference, \
            started_process(two[0], logs / "agent0", env=env) as first, \
            started_process(two[1], logs / "agent1", env=env) as second:  # at once: much of it is waiting
        for proc, log in ((reference, "one"), (first, "agent0"), (second, "agent1")):
            assert proc.wait(timeout=1200) == 0, (logs / log / "stderr.txt").read_text()[-3000:]
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["val_images"] == 15
    assert summary["val_top1"] == summary["val_top1_deploy"]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    assert _metrics(tmp_path / "two") == _metrics(tmp_path / "one")


@pytest.mark.timeout(1500)
def test_a_node_killed_mid_epoch_leaves_a_resumable_checkpoint(tmp_path: Path) -> None:
    """One of two nodes dies (SIGKILL to its agent and worker) in the middle of an epoch: the other stops too, and
    the run folder holds the last finished epoch's ``last.pt`` and its metrics."""
    data = write_image_folder(tmp_path / "data", classes=3, per_class=24, size=16)
    out = tmp_path / "run"
    train = ["train", "--model", "repvgg_tiny", "--device", "cpu", "--data", str(data), "--img-size", "16",
             "--batch-size", "4", "--epochs", "50", "--no-inference-speed", "--output", str(out)]
    commands = _two_nodes(f"127.0.0.1:{_free_port()}", train, tmp_path / "logs")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with started_process(commands[0], tmp_path / "logs" / "agent0", env=env) as first, \
            started_process(commands[1], tmp_path / "logs" / "agent1", env=env) as second:
        assert wait_for((out / "last.pt").exists, first, timeout=900), \
            (tmp_path / "logs" / "agent0" / "stderr.txt").read_text()[-3000:]
        time.sleep(0.3)  # into the next epoch
        for pid in _process_tree(second.pid):  # the machine is gone: its agent and its worker (its own session)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        second.wait()
        assert first.wait(timeout=600) != 0  # the surviving node cannot go on alone
    told = (tmp_path / "logs" / "agent0" / "stderr.txt").read_text()
    assert "epoch 50/50" not in told
    assert "another process of this 2-process run stopped" in told and "--resume RUN" in told, told[-3000:]
    state = load_checkpoint(out)  # as a process killed alone leaves it (test_train.py resumes such a checkpoint)
    assert 1 <= state["epoch"] < 50 and len(_metrics(out)) == state["epoch"]
