"""Prove the CUDA paths on one GPU in a few minutes, and print one short table.

    python benchmarks/gpu_check.py                 # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --cpu           # the same steps on CPU with gloo (checks the script itself)

Each step runs in its own process (torchrun with one process: a real process group, so device mistakes in
collectives show up at world size 1):
1. collectives through the one helper (`repvgg.training.distributed.all_reduce`) on CPU and CUDA tensors,
   in an NCCL-only group and in the default mixed `cpu:gloo,cuda:nccl` group;
2. `repvgg train` with --sync-bn --amp --channels-last in an NCCL-only group: trains, converts SyncBN
   blocks, checks the converted model (the run fails if it does not match);
3. `repvgg seg-train` likewise with --sync-bn --amp;
4. `benchmarks/gpu_paper_speed.py` with a short budget (A0 vs ResNet-18, 10 warm-up + 10 timed batches).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

COLLECTIVES = """
import torch, torch.distributed as dist
from repvgg.training.distributed import all_reduce, init_distributed
ctx = init_distributed("{device}")
for device in ["cpu", "{device}"]:
    t = torch.tensor([1.0, 2.0], device=device)
    assert all_reduce(t, "sum") is t and t.tolist() == [1.0, 2.0], t
    assert all_reduce(torch.tensor([3.0], device=device), "max").item() == 3.0
print("collectives ok on", dist.get_backend(), "for cpu and {device}")
dist.destroy_process_group()
"""


def _run(name: str, cmd: list[str], env: dict[str, str], timeout: int) -> dict:
    start = time.perf_counter()
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        ok, tail = result.returncode == 0, (result.stdout + result.stderr)[-1500:]
    except subprocess.TimeoutExpired as err:
        ok, tail = False, f"timed out after {timeout} s: {str(err.stderr)[-1000:]}"
    row = {"step": name, "ok": ok, "seconds": round(time.perf_counter() - start, 1)}
    if not ok:
        row["tail"] = tail
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run the same steps on CPU with gloo")
    parser.add_argument("--skip-speed", action="store_true", help="leave out the paper-speed step")
    args = parser.parse_args()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device; run with --cpu to check the script on a CPU", file=sys.stderr)
        return 1
    device = "cpu" if args.cpu else "cuda"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    base_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    only = {**base_env, "REPVGG_DIST_BACKEND": "gloo" if args.cpu else "nccl"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "collectives.py"
        script.write_text(COLLECTIVES.format(device=device))
        rows.append(_run("collectives, " + ("gloo" if args.cpu else "NCCL-only group"), [*torchrun, str(script)],
                         only, 300))
        if not args.cpu:
            rows.append(_run("collectives, cpu:gloo,cuda:nccl group", [*torchrun, str(script)], base_env, 300))
        train = [*torchrun, "-m", "repvgg", "train", "--model", "repvgg_a0", "--epochs", "2", "--batch-size", "64",
                 "--device", device, "--sync-bn", "--amp", "--channels-last", "--output", f"{tmp}/train"]
        rows.append(_run("repvgg train --sync-bn --amp --channels-last", train, only, 600))
        seg = [*torchrun, "-m", "repvgg", "seg-train", "--epochs", "2", "--device", device, "--sync-bn", "--amp",
               "--synthetic-train", "64", "--synthetic-val", "16", "--baseline", "resnet50", "--output", f"{tmp}/seg"]
        rows.append(_run("repvgg seg-train --sync-bn --amp", seg, only, 600))
        for name, folder, keys in (("train", "train", ("val_top1", "val_top1_deploy", "relative_error")),
                                   ("seg-train", "seg", ("val_miou", "val_miou_deploy", "relative_error"))):
            summary = Path(tmp) / folder / "summary.json"
            if summary.is_file():
                data = json.loads(summary.read_text())
                row = next(r for r in rows if r["step"].startswith(f"repvgg {name} "))
                row.update({k: data[k] for k in keys})
        if not args.cpu and not args.skip_speed:
            speed = [sys.executable, str(HERE / "gpu_paper_speed.py"), "--models", "repvgg_a0", "--baselines",
                     "resnet18", "--warmup", "10", "--rounds", "10", "--out", f"{tmp}/speed"]
            rows.append(_run("gpu_paper_speed.py (A0 vs ResNet-18, short)", speed, base_env, 600))
            table = Path(tmp) / "speed" / "gpu.md"
            if table.is_file():
                print(table.read_text())
    print("| step | ok | seconds | details |\n|---|---|---|---|")
    for row in rows:
        details = {k: v for k, v in row.items() if k not in ("step", "ok", "seconds", "tail")}
        print(f"| {row['step']} | {'yes' if row['ok'] else 'NO'} | {row['seconds']} | {json.dumps(details)} |")
    for row in rows:
        if not row["ok"]:
            print(f"\n--- {row['step']} failed:\n{row['tail']}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
