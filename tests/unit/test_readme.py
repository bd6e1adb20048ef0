"""Every command in the README's bash blocks exists, with the options and params it is given.

Running them for real is scripts/readme_commands.py --run (a fresh clone, tens of minutes); this
checks, in seconds, what a docs edit most often breaks: a renamed command or option, a params key
that does not exist, a make target or deployment that is gone, a path outside the repository.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from adps.cli import app
from adps.config import Params, override_params
from scripts.readme_commands import bash_blocks, commands, logical_lines
from tests.conftest import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent
HOSTILE_EXAMPLES = {"../../x"}  # the bad-input table's example of a category name that must be refused


def all_commands() -> list[list[str]]:
    return [
        argv
        for doc in DOCS
        for block in bash_blocks(doc.read_text())
        for line in logical_lines(block)
        for argv in commands(line)
    ]


def test_the_readme_has_commands_and_activates_the_environment_first():
    argvs = all_commands()
    assert len(argvs) > 15
    programs = [argv[0] for argv in argvs]
    assert programs.index("source") < min(i for i, p in enumerate(programs) if p in ("adps", "dvc", "prefect"))
    assert not any(arg.startswith(".venv/bin/") for argv in argvs for arg in argv[:1])


def test_every_program_is_installed_or_a_shell_builtin():
    builtins = {"source", "make", "git", "curl"}  # shell and system tools
    for argv in all_commands():
        assert argv[0] in builtins or (BIN / argv[0]).exists(), argv


def test_adps_commands_and_options_exist():
    cli = typer.main.get_command(app)
    for argv in (a for a in all_commands() if a[0] == "adps"):
        command, words = cli, 1
        while hasattr(command, "get_command"):  # a group (adps, adps review): the next word names its command
            command = command.get_command(None, argv[words])  # type: ignore[attr-defined]
            assert command is not None, f"no command adps {' '.join(argv[1 : words + 1])}"
            words += 1
        known = {opt for param in command.params for opt in param.opts + param.secondary_opts}
        for arg in argv[words:]:
            if arg.startswith("-"):
                assert arg.split("=")[0] in known, f"adps {' '.join(argv[1:words])} has no option {arg}"


def test_dvc_set_params_name_real_keys():
    for argv in (a for a in all_commands() if a[:3] == ["dvc", "exp", "run"]):
        values = dict(arg.split("=", 1) for arg in argv[3:] if "=" in arg)
        if values:
            override_params(Params(), {k: v for k, v in values.items() if k != "model.teacher_weights"})


def test_make_targets_exist():
    targets = set(re.findall(r"^([a-z-]+):", (REPO_ROOT / "Makefile").read_text(), re.MULTILINE))
    for argv in (a for a in all_commands() if a[0] == "make"):
        assert argv[1] in targets, argv


def test_prefect_deployments_exist():
    served = (REPO_ROOT / "flows" / "serve.py").read_text()
    flows = "".join(path.read_text() for path in (REPO_ROOT / "flows").glob("*.py"))
    for argv in (a for a in all_commands() if a[:3] == ["prefect", "deployment", "run"]):
        flow, deployment = argv[3].split("/")
        assert f'name="{flow}"' in flows and f'name="{deployment}"' in served, argv


@pytest.mark.parametrize("subcommand", [["metrics", "show"], ["plots", "show"], ["exp", "show"], ["push"]])
def test_dvc_subcommands_exist(subcommand):
    out = subprocess.run([str(BIN / "dvc"), *subcommand, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_docs_point_only_at_files_in_the_repository():
    """Every relative link, and every ``../`` path the docs mention, resolves inside the repository."""
    for doc in [*DOCS, REPO_ROOT / "requirements.txt"]:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if not target.startswith(("http://", "https://")):
                assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
        for mention in set(re.findall(r"(?:\.\./)+[\w.-]+", text)) - HOSTILE_EXAMPLES:
            resolved = (doc.parent / mention).resolve()
            assert resolved.is_relative_to(REPO_ROOT), f"{doc.name} points outside the repository: {mention}"
