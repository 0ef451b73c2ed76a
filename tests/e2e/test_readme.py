"""The README as a user reads it: its command reference is the program's own, and its offline examples run as
written, from a copy of the repository's recipes with the shipped tiny model and data."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import typer.main
from conftest import REPO
from typer.testing import CliRunner

from lorafit.cli import app

MARK = "<!-- offline example: tests/e2e/test_readme.py runs these lines -->"
runner = CliRunner()


def readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def block_after(text: str, start: int) -> list[str]:
    """The lines of the first fenced code block after position `start`."""
    opening = text.index("```", start)
    body = text.index("\n", opening) + 1
    return text[body:text.index("```", body)].splitlines()


def documented_usage() -> dict[str, str]:
    """The synopsis under "## Commands": command name ("" for the program itself) -> its line."""
    lines = block_after(readme(), readme().index("## Commands"))
    return {line.split()[1] if not line.split()[1].startswith("-") else "": line for line in lines}


def program_usage() -> dict[str, tuple[set[str], list[str]]]:
    """command -> (its options but --help and --debug, which every command has; its arguments in order)."""
    group = typer.main.get_command(app)
    usage = {"": ({o for p in group.params for o in p.opts if o.startswith("--")} - {"--help"}, [])}
    for name, command in group.commands.items():
        options = {o for p in command.params if p.param_type_name == "option" for o in p.opts if o.startswith("--")}
        arguments = [p.name.upper() for p in command.params if p.param_type_name == "argument"]
        usage[name] = (options - {"--help", "--debug"}, arguments)
    return usage


def test_the_command_reference_is_the_programs():
    documented, program = documented_usage(), program_usage()
    assert set(documented) == set(program)
    for name, line in documented.items():
        options, arguments = program[name]
        assert set(re.findall(r"--[a-z][a-z-]*", line)) == options, name
        assert re.match(rf"lorafit {name}\s*((?:[A-Z_]+ )*)", line).group(1).split() == arguments, name


def offline_examples() -> list[tuple[str, list[str]]]:
    """(command line, the output lines the README shows under it) for every marked block."""
    text, examples = readme(), []
    for found in re.finditer(re.escape(MARK), text):
        lines = block_after(text, found.end())
        prompted = any(line.startswith("$ ") for line in lines)
        for line in lines:
            if prompted and not line.startswith("$ "):
                examples[-1][1].append(line)
            elif line.strip() and not line.startswith("#"):
                examples.append((line.removeprefix("$ "), []))
    return examples


def test_the_offline_examples_run_as_written(tmp_path, monkeypatch):
    shutil.copytree(REPO / "recipes", tmp_path / "recipes")  # runs/ lands in tmp_path, next to the copy
    (tmp_path / "data").symlink_to(REPO / "data")
    monkeypatch.chdir(tmp_path)
    examples = offline_examples()
    assert len(examples) >= 5
    for line, shown in examples:
        words = shlex.split(line)
        if words[0] == "lorafit":
            result = runner.invoke(app, words[1:], env={"COLUMNS": "120"})
            assert result.exit_code == 0, (line, result.stderr)
            printed = result.stdout
        else:
            assert words[0] == "python", line
            printed = subprocess.run([sys.executable, *words[1:]], check=True, capture_output=True, text=True).stdout
        for number in re.findall(r"\d{1,3}(?:,\d{3})+", "\n".join(shown)):  # the counts the README quotes
            assert number in printed, (line, number)
