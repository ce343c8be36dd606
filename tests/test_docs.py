"""The documentation builds, strictly: a broken link, a missing page or a renamed function in the API reference
fails the suite."""

from __future__ import annotations

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
