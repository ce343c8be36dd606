"""Collectives: one helper, correct for NCCL, gloo and mixed groups; every job uses it."""

from __future__ import annotations

import ast

import pytest
import torch

from test_layout import PACKAGE
from repvgg.training.distributed import all_reduce, backend_device_types, collective_device


def test_backend_device_rule() -> None:
    assert backend_device_types("nccl") == {"cuda"}
    assert backend_device_types("gloo") == {"cpu", "cuda"}
    assert backend_device_types("cpu:gloo,cuda:nccl") == {"cpu", "cuda"}
    assert backend_device_types("cuda:nccl") == {"cuda"}
    cpu = torch.device("cpu")
    assert collective_device(cpu, "gloo") == cpu
    assert collective_device(cpu, "cpu:gloo,cuda:nccl") == cpu
    assert collective_device(torch.device("cuda", 1), "cpu:gloo,cuda:nccl") == torch.device("cuda", 1)
    assert collective_device(torch.device("cuda", 0), "mpi") == cpu


def test_a_cpu_tensor_goes_to_the_gpu_under_nccl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collective_device(torch.device("cpu"), "nccl") == torch.device("cuda", 3)


def test_all_reduce_in_a_real_group_reduces_in_place(tmp_path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        seen: list[torch.device] = []
        original = dist.all_reduce

        def checked(tensor: torch.Tensor, *args, **kwargs):
            # what NCCL does to a tensor on a device it cannot take: refuse it
            assert tensor.device.type in backend_device_types(), tensor.device
            seen.append(tensor.device)
            return original(tensor, *args, **kwargs)

        dist.all_reduce = checked
        try:
            t = torch.tensor([1.0, 5.0], dtype=torch.float64)
            assert all_reduce(t, "max") is t and t.tolist() == [1.0, 5.0]
        finally:
            dist.all_reduce = original
        assert seen == [torch.device("cpu")]
        with pytest.raises(ValueError, match="op"):
            all_reduce(t, "mean")
    finally:
        dist.destroy_process_group()


COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "broadcast", "reduce", "reduce_scatter",
               "all_to_all", "gather", "scatter"}


def collective_calls(source: str) -> list[int]:
    """Lines of ``source`` that call a ``torch.distributed`` collective, however it was imported: through the
    module (``torch.distributed.x``, ``import torch.distributed as d``, ``from torch import distributed``) or by
    name (``from torch.distributed import all_reduce [as f]``)."""
    tree = ast.parse(source)
    modules, functions = {"torch.distributed"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            modules |= {a.asname or a.name for a in node.names if a.name == "distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            functions |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in COLLECTIVES and ast.unparse(func.value) in modules:
            lines.append(node.lineno)
        elif isinstance(func, ast.Name) and func.id in functions:
            lines.append(node.lineno)
    return lines


def test_the_collective_finder_sees_every_way_of_calling_one() -> None:
    cases = ["import torch\ntorch.distributed.all_reduce(t)",
             "import torch.distributed as dist\ndist.broadcast(t, 0)",
             "import torch.distributed as d\nd.all_gather(xs, t)",
             "from torch import distributed\ndistributed.reduce(t, 0)",
             "from torch.distributed import all_reduce\nall_reduce(t)",
             "from torch.distributed import all_reduce as ar\nar(t)"]
    for source in cases:
        assert collective_calls(source) == [2], source
    assert collective_calls("from repvgg.training.distributed import all_reduce\nall_reduce(t)") == []


def test_every_collective_goes_through_the_one_helper() -> None:
    """Only ``training/distributed.py`` calls ``torch.distributed`` collectives; every job calls its helper."""
    offenders = [f"{path.relative_to(PACKAGE)}:{line}" for path in PACKAGE.rglob("*.py")
                 if path.relative_to(PACKAGE).as_posix() != "training/distributed.py"
                 for line in collective_calls(path.read_text())]
    assert not offenders, offenders
    assert collective_calls((PACKAGE / "training" / "distributed.py").read_text())  # the helper itself is seen
