"""The repository stands on its own: no pointer outside it, docs that exist, every flag explained."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Split so this file does not match its own needles.
OUTSIDE = ["../" + "shared", "EVALUATION" + ".md", "DEFENSES" + ".md", "DESIGN" + ".md", "CONVENTIONS" + ".md"]


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [ROOT / line for line in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an unpacked sdist)
        files = [p for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts]
    return [p for p in files if p.is_file() and p.suffix in {".py", ".md", ".toml", ".yaml", ".yml", ".txt", ""}]


def test_nothing_points_outside_the_repository():
    hits = []
    for path in tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            for needle in OUTSIDE:
                if needle in line:
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {needle}")
    assert not hits, "files refer to notes outside the repository:\n" + "\n".join(hits)


def test_readme_is_short_and_its_links_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode("utf-8")) < 16 * 1024, f"README.md is {len(readme.encode())} bytes (limit 16 KiB)"
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert local, "README links to no document"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_docs_link_to_existing_files():
    missing = []
    for doc in (ROOT / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if not re.match(r"[a-z]+://", link) and not (doc.parent / link).exists():
                missing.append(f"{doc.name}: {link}")
    assert not missing, missing


def test_every_flag_the_code_raises_is_explained_in_the_docs():
    checks = (ROOT / "study" / "evaluation" / "checks.py").read_text(encoding="utf-8")
    raised = set(re.findall(r'Flag\(\s*"(R\d+)"', checks))
    assert len(raised) >= 10, f"found only {sorted(raised)} in study/evaluation/checks.py: the pattern is stale"
    doc = (ROOT / "docs" / "evaluation.md").read_text(encoding="utf-8")
    in_table = set(re.findall(r"^\| (R\d+) \|", doc, flags=re.M))
    explained = set(re.findall(r"^- \*\*(R\d+) —", doc, flags=re.M))
    assert raised <= in_table, f"flags missing from the table in docs/evaluation.md: {sorted(raised - in_table)}"
    assert raised <= explained, f"flags without an explanation in docs/evaluation.md: {sorted(raised - explained)}"


def test_every_module_using_the_mlflow_server_shares_its_scheduling_scope() -> None:
    """conftest's SHARED_SERVER_MODULES is written by hand; a new module using the session's
    MLflow server (or its logged study) must be in it, or make test builds them twice again."""
    from conftest import SHARED_SERVER_MODULES

    tests = Path(__file__).resolve().parent
    users = {f"tests/{f.name}" for f in tests.glob("test_*.py") if f.name != Path(__file__).name
             and re.search(r"\b(mlflow_server|logged_study)\b", f.read_text())}
    assert users == set(SHARED_SERVER_MODULES)
