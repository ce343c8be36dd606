"""The documentation builds, strictly: a broken link, a missing page or a renamed function in the API reference
fails the suite."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_process

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)  # above run_process's own limit, which ends the process
def test_the_docs_build_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra is not installed")
    site = tmp_path / "site"
    result = run_process([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                          str(ROOT / "mkdocs.yml"), "--site-dir", str(site)], timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    api = (site / "api" / "index.html").read_text()
    assert "create_model" in api and "reparameterize_model" in api and "check_output_path" in api
    # Docstrings cross-reference as Markdown: no Sphinx role reaches the reader as text (Markdown turns its
    # backquotes into <code>), and a reference became a link to its entry.
    for role in ("func", "class", "data", "mod", "meth", "attr"):
        assert f":{role}:`" not in api and f":{role}:<code>" not in api, role
    assert 'href="#repvgg.nn.registry.list_models"' in api and "][repvgg." not in api
    assert (site / "reliability" / "index.html").is_file() and (site / "results" / "cpu.png").is_file()
    shutil.rmtree(site)


def test_the_docs_check_catches_a_broken_reference(tmp_path: Path) -> None:
    """A positive control: a page pointing at a function that does not exist fails the strict build."""
    pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra is not installed")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# broken\n\n::: repvgg.io.loading.no_such_function\n")
    config = tmp_path / "mkdocs.yml"
    plugin = f"plugins:\n  - mkdocstrings:\n      handlers:\n        python:\n          paths: [{ROOT / 'src'}]\n"
    config.write_text(f"site_name: broken\ndocs_dir: {docs}\n{plugin}")
    result = run_process([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                          "--site-dir", str(tmp_path / "site")], timeout=600)
    assert result.returncode != 0 and "no_such_function" in result.stderr


def test_the_docs_check_catches_a_raw_sphinx_role(tmp_path: Path) -> None:
    """A positive control: a page holding a Sphinx role (raw text in Markdown) fails the strict build with the
    project's hook, naming the page and the role; the same page with plain code in its place builds."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed")
    docs = tmp_path / "docs"
    docs.mkdir()
    config = tmp_path / "mkdocs.yml"
    hook = ROOT / "docs" / "hooks" / "no_raw_roles.py"
    config.write_text(f"site_name: roles\ndocs_dir: {docs}\nhooks:\n  - {hook}\n")

    def build(page: str) -> subprocess.CompletedProcess:
        (docs / "index.md").write_text(f"# roles\n\n{page}\n")
        return run_process([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                            "--site-dir", str(tmp_path / "site")], timeout=600)

    result = build("See :func:`repvgg.io.loading.load_model`.")
    assert result.returncode != 0, result.stderr[-4000:]
    assert "index.md" in result.stderr and ":func:`repvgg.io.loading.load_model`" in result.stderr, result.stderr
    result = build("See `load_model`.")
    assert result.returncode == 0, result.stderr[-4000:]


def _block(text: str, opening: str) -> str:
    """The fenced block of ``text`` whose first line after the fence starts with ``opening``."""
    for block in text.split("```")[1::2]:
        body = block.split("\n", 1)[1]
        if body.startswith(opening):
            return body
    raise AssertionError(f"no block starting with {opening!r}")


def _launch(argv: list[str]) -> list[str]:
    """``torchrun ... -m repvgg ARGS`` checked by torchrun's own parser; ``ARGS`` returned."""
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(argv[1:])
    assert parsed.module and parsed.training_script == "repvgg", argv
    return list(parsed.training_script_args)


def test_the_slurm_script_launches_a_run_the_cli_accepts() -> None:
    import shlex

    from repvgg.cli import build_parser

    script = _block((ROOT / "docs" / "training.md").read_text(), "#!/bin/bash")
    command = script[script.index("\nsrun ") + 6:].replace("\\\n", " ").split("\n")[0]
    shell = {"$SLURM_NNODES": "2", "$head": "node0", "$SLURM_JOB_ID": "7", "$run": "/shared/runs/b3",
             "$resume": "--resume /shared/runs/b3"}  # what Slurm and the script fill in (a requeued job's)
    for name, value in sorted(shell.items(), key=lambda item: -len(item[0])):
        command = command.replace(name, value)
    argv = shlex.split(command)
    args = build_parser().parse_args(_launch(argv))
    assert (args.command, args.model, args.epochs, args.output) == ("train", "repvgg_b3", 200, "/shared/runs/b3")
    assert "--rdzv-backend" in argv and argv[argv.index("--rdzv-backend") + 1] == "c10d"
    assert 'export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"' in script  # else each task gets one CPU (22.05+)


def test_the_pytorchjob_manifest_fits_the_training_operators_schema() -> None:
    import shlex

    import yaml

    from repvgg.cli import build_parser

    models = pytest.importorskip("kubeflow.training.models", reason="kubeflow-training (its schema) is not installed")
    import kubernetes.client.models as kubernetes_models

    manifest = yaml.safe_load(_block((ROOT / "docs" / "training.md").read_text(), "apiVersion: kubeflow.org/v1"))
    _fits(manifest, "KubeflowOrgV1PyTorchJob", (models, kubernetes_models), "manifest")
    assert manifest["kind"] == "PyTorchJob" and manifest["spec"]["elasticPolicy"]["rdzvBackend"] == "c10d"
    worker = manifest["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == manifest["spec"]["elasticPolicy"]["minReplicas"]
    (container,) = worker["template"]["spec"]["containers"]
    shell, flag, script = container["command"]  # a restarted pod continues the run: --resume once last.pt exists
    assert (shell, flag) == ("sh", "-c") and "[ -f /shared/runs/b3/last.pt ]" in script
    launch = script[script.index("exec torchrun ") + 5:].replace("$resume", "--resume /shared/runs/b3")
    args = build_parser().parse_args(_launch(shlex.split(launch)))
    assert (args.command, args.model, args.output, args.resume) == ("train", "repvgg_b3", "/shared/runs/b3",
                                                                     "/shared/runs/b3")
    assert "maxRestarts" not in manifest["spec"]["elasticPolicy"]  # torchrun's restarts would not --resume


def _fits(value: object, kind: str, modules: tuple, where: str) -> None:
    """``value`` has only fields the OpenAPI model ``kind`` knows (by their JSON names), recursively."""
    if kind.startswith("list[") and kind.endswith("]"):
        assert isinstance(value, list), f"{where}: a list"
        for i, item in enumerate(value):
            _fits(item, kind[5:-1], modules, f"{where}[{i}]")
        return
    if kind.startswith("dict(str, ") and kind.endswith(")"):
        assert isinstance(value, dict), f"{where}: a mapping"
        for key, item in value.items():
            _fits(item, kind[10:-1], modules, f"{where}.{key}")
        return
    model = next((getattr(m, kind) for m in modules if hasattr(m, kind)), None)
    if model is None:  # str, int, bool, object, quantities: values, not structures
        assert not isinstance(value, dict) or kind == "object" or kind.startswith("dict"), f"{where}: {kind}"
        return
    assert isinstance(value, dict), f"{where}: a {kind} object, got {value!r}"
    fields = {json_name: model.openapi_types[name] for name, json_name in model.attribute_map.items()}
    for key, item in value.items():
        assert key in fields, f"{where}.{key}: not a field of {kind} ({', '.join(sorted(fields))})"
        _fits(item, fields[key], modules, f"{where}.{key}")


def _unknown_flags(text: str) -> list[str]:
    """Each ``repvgg COMMAND ... --flag`` in ``text``'s code (fenced blocks, then inline spans) whose command or flag
    the CLI does not have, as ``"COMMAND --flag"``."""
    import re

    from repvgg.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    fenced = text.split("```")
    code = fenced[1::2] + re.findall(r"`([^`\n]+)`", "".join(fenced[0::2]))
    unknown = []
    for line in (line for snippet in code for line in snippet.replace("\\\n", " ").splitlines()):
        for command, rest in re.findall(r"\brepvgg ([a-z][a-z_-]*)((?:[^#|;]*))", line):
            parser = commands.get(command.replace("-", "_"), commands.get(command))
            if parser is None:
                unknown.append(command)
                continue
            options = {o for action in parser._actions for o in action.option_strings}
            unknown += [f"{command} {flag}" for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest)
                        if flag not in options]
    return unknown


def test_every_command_and_flag_the_docs_show_is_the_clis() -> None:
    """The README and every page show only commands and flags the CLI takes (a renamed or removed flag fails here);
    a positive control: a made-up flag and a made-up command are found."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    found = {page.name: unknown for page in pages if (unknown := _unknown_flags(page.read_text()))}
    assert not found, found
    made_up = "Run `repvgg predict runs/a0 x.jpg --topk 3 --no-such-flag` or\n```bash\nrepvgg frobnicate --json\n```\n"
    assert _unknown_flags(made_up) == ["frobnicate", "predict --no-such-flag"]
