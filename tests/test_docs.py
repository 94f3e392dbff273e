"""The documentation checks: README.md is a landing page that links every docs page, every relative link
and anchor in README.md and docs/*.md resolves, and every command in their ``bash`` blocks names a
script, config and flags that exist (train_sd.py's flags are TrainConfig fields; a config's keys too).

Commands are checked, not run (most need a GPU or the hub); the ones a CPU can run are run by the tests
named next to them (the embedded default and its evaluation: tests/test_train_sd.py; the synthetic
experiment: tests/test_synthetic_experiment.py; the iterative rounds: tests/test_iterative.py).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
#: The set-up commands .ci/run and the tests' fixtures use, verbatim.
SETUP_COMMANDS = (
    "pip install -e . && python train_sd.py --config configs/tiny.yaml",
    'pip install -e ".[test]" && python -m pytest -q',
)
MAX_README_LINES = 250


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (letters of any script, digits,
    spaces, hyphens and underscores kept), spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def _outside_code(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    for line in _outside_code(path.read_text()):
        if line.startswith("#"):
            slug, n = _slug(line.lstrip("#")), 1
            while slug in anchors:  # repeated headings get -1, -2, ... as on GitHub
                slug, n = f"{_slug(line.lstrip('#'))}-{n}", n + 1
            anchors.add(slug)
    return anchors


def _links(path: Path) -> list[str]:
    return [
        m.group(1)
        for line in _outside_code(path.read_text())
        for m in re.finditer(r"\]\(([^)\s]+)\)", line)
        if not m.group(1).startswith(("http://", "https://", "mailto:"))
    ]


def _bash_commands(path: Path) -> list[str]:
    """Every command line of the page's ``bash`` blocks, continuation lines joined, comments dropped."""
    commands, block, inside = [], [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            if inside:
                joined = "\n".join(block).replace("\\\n", " ")
                commands += [c.split(" #")[0].strip() for c in joined.splitlines()]
                block = []
            inside = not inside and line.strip() == "```bash"
            continue
        if inside and not line.lstrip().startswith("#"):
            block.append(line)
    return [c for c in commands if c]


def test_readme_is_a_landing_page():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES, "README.md: move details into a docs/ page"
    for command in SETUP_COMMANDS:
        assert f"\n{command}\n" in text, f"README.md lost the set-up command {command!r}"
    linked = {(README.parent / link.split("#")[0]).resolve() for link in _links(README)}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for link in _links(page):
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link} (no heading with this anchor in {path.name})")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def _train_flags() -> set[str]:
    from diffusion_dpo.training.config import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)} | {"config", "help"}


def _project_source() -> str:
    files = [
        *ROOT.glob("*.py"),
        *ROOT.glob("eval/*.py"),
        *ROOT.glob("data/*.py"),
        *ROOT.glob("tools/*.py"),
        *ROOT.rglob("diffusion_dpo/**/*.py"),
    ]
    return "\n".join(p.read_text() for p in files)


def _script_and_args(words: list[str]) -> tuple[str, list[str]] | None:
    """``(script or module, its arguments)`` of a ``python``/``accelerate launch`` command, else None."""
    env = 0
    while env < len(words) and re.match(r"^[A-Z_]+=", words[env]):
        env += 1
    words = words[env:]
    if not words:
        return None
    if words[0] == "python":
        if words[1] == "-m":
            return words[2], words[3:]
        return words[1], words[2:]
    if words[:2] == ["accelerate", "launch"]:
        for i, word in enumerate(words[2:], start=2):
            if word.endswith(".py"):
                return word, words[i + 1 :]
            if word == "-m":
                return words[i + 1], words[i + 2 :]
    return None


def test_every_documented_command_names_what_exists():
    train_flags, source, problems = _train_flags(), _project_source(), []
    for page in PAGES:
        for command in _bash_commands(page):
            for part in re.split(r"\s*(?:&&|\|\||;)\s*", command):
                try:
                    words = shlex.split(part)
                except ValueError:
                    problems.append(f"{page.name}: unparsable command {part!r}")
                    continue
                found = _script_and_args(words)
                if found is None or found[0] in ("pytest", "pip"):
                    continue
                script, args = found
                where = f"{page.name}: {part[:80]}"
                if script.endswith(".py") and not (ROOT / script).is_file():
                    problems.append(f"{where}: no script {script}")
                if (
                    not script.endswith(".py")
                    and not (ROOT / Path(*script.split("."))).with_suffix(".py").is_file()
                ):
                    if not (ROOT / Path(*script.split(".")) / "__main__.py").is_file():
                        problems.append(f"{where}: no module {script}")
                flags = [a[2:].split("=")[0] for a in args if a.startswith("--")]
                for flag in flags:
                    known = flag in train_flags if script == "train_sd.py" else f'"--{flag}"' in source
                    if not known:
                        problems.append(f"{where}: {script} has no flag --{flag}")
                for i, arg in enumerate(args[:-1]):
                    if arg == "--config" and script == "train_sd.py":
                        config = ROOT / args[i + 1]
                        if not config.is_file():
                            problems.append(f"{where}: no config {args[i + 1]}")
                            continue
                        unknown = set(yaml.safe_load(config.read_text()) or {}) - train_flags
                        if unknown:
                            problems.append(
                                f"{where}: {args[i + 1]} has keys no flag reads: {sorted(unknown)}"
                            )
    assert not problems, "\n".join(problems)
