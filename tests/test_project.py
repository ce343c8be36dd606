"""The project's own files tell the truth: the README's install line installs what its command needs, the license
is in the repository and matches the package metadata, the changelog covers this version, and `make test` checks
the types beside the lint."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(spec: str) -> set[str]:
    """The distributions ``pip install -e SPEC`` installs from this project: its core and the extras named, with the
    extras they name in turn (``repvgg[train,deploy]``)."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    wanted = re.findall(r"[\w-]+", spec.partition("[")[2]) if "[" in spec else []
    found = {re.split(r"[<>=\[ ;]", r)[0].lower() for r in PYPROJECT["project"]["dependencies"]}
    while wanted:
        for requirement in extras.get(wanted.pop(), []):
            name = re.split(r"[<>=\[ ;]", requirement)[0].lower()
            if name == "repvgg":
                wanted += re.findall(r"[\w-]+", requirement.partition("[")[2])
            else:
                found.add(name)
    return found


def test_the_readme_installs_what_its_commands_need() -> None:
    text = " ".join((ROOT / "README.md").read_text().split())
    sentences = [s for s in re.split(r"(?<=[.)])\s", text) if "pip install -e" in s and "repvgg train" in s]
    assert sentences, "the README says how to install the package and run `repvgg train`"
    for sentence in sentences:
        spec = re.search(r"pip install -e '?([^'` ]+)", sentence)[1]
        assert {"timm", "scikit-learn", "matplotlib"} <= _requirements(spec), sentence  # what `train` imports


def test_the_install_check_sees_a_missing_extra() -> None:
    assert "timm" not in _requirements(".") and "timm" in _requirements(".[all]")


def test_the_license_is_in_the_repository_and_matches_the_metadata() -> None:
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in license_text
    declared = PYPROJECT["project"]["license"]
    assert (declared if isinstance(declared, str) else declared["text"]) == "MIT"


def test_the_changelog_covers_this_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    version = PYPROJECT["project"]["version"]
    headings = re.findall(r"^## \[([^\]]+)\]", changelog, flags=re.MULTILINE)
    assert headings and headings[0] in ("Unreleased", version) and version in headings
    newest = changelog.split("\n## [")[1]
    assert re.search(r"^- ", newest, flags=re.MULTILINE), "the newest section lists its changes"


def test_make_test_checks_types_and_lint_before_the_suite() -> None:
    recipe = (ROOT / "Makefile").read_text().split("\ntest:")[1].split("\n\n")[0]
    lines = [line.strip() for line in recipe.splitlines() if line.startswith("\t")]
    assert any(line.endswith("ruff check src tests benchmarks") for line in lines)
    assert any("mypy" in line and "src/repvgg" in line for line in lines)
    assert [i for i, line in enumerate(lines) if "pytest" in line][0] > [i for i, line in enumerate(lines)
                                                                         if "mypy" in line][0]
