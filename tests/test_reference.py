"""The docs: reference pages made from the code (every recipe key and command argument, with help text),
the site built with warnings as errors, the README kept short."""

from __future__ import annotations

import argparse
import configparser
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from expreg import reference
from expreg.config import _known_keys

REPO = Path(__file__).resolve().parents[1]


def test_every_recipe_key_and_command_argument_has_help_text():
    assert reference.missing_help() == []


def test_the_reference_pages_list_every_recipe_key_and_every_argument():
    keys = [k.key for k in reference.recipe_keys()]
    assert sorted(keys) == sorted(_known_keys())  # each key once
    page = reference.recipe_page()
    assert all(f"| `{key}` |" in page for key in keys)
    lr = next(k for k in reference.recipe_keys() if k.key == "train.lr")
    assert (lr.type, lr.default) == ("float", 3e-4) and lr.help.startswith("peak learning rate of AdamW")
    assert "| `data.prepared` | str \\| null | null |" in page  # types of optional keys, pipes escaped

    commands = reference.commands_page()
    cells = {name for row in re.findall(r"^\| (.+?) \|", commands, re.M) for name in re.findall(r"`([^`]+)`", row)}
    listed = {option.strip() for cell in cells for option in cell.split(",")}
    for _, module in reference.COMMANDS:
        parser = reference.command_parser(module)
        for action in parser._actions:
            for option in action.option_strings:
                assert option in listed or option in ("-h", "--help"), (module, option)
    assert "| `hest` `--ids` |" in commands  # a subcommand's arguments (python -m expreg.datasets hest)
    assert "| `--overwrite` | off |" in commands and "| `--out_dir` | required |" in commands


def test_every_command_is_installed_as_expreg_command_and_in_the_reference():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    scripts = setup["options.entry_points"]["console_scripts"].strip().splitlines()
    installed = {line.split("=")[0].strip(): line.split("=")[1].strip().split(":")[0] for line in scripts}
    # the README: every python -m expreg.<command> is also expreg-<command>, and nothing else is installed
    commands = {module for _, module in reference.COMMANDS if module != "run_regression"}
    assert installed == {"expreg-" + module.split(".")[1]: module for module in commands}


def test_a_key_or_argument_without_help_is_reported(tmp_path, monkeypatch):
    """What the first test relies on: a key without a comment, and an argument without help, are found."""
    recipe = tmp_path / "base.yaml"
    recipe.write_text(
        "# header\nseed: 42   # the seed\ndata:\n  image_size: 224\n  batch_size: 32  # per\n    # process\n"
    )
    assert reference.recipe_help(recipe) == {
        "seed": "the seed",
        "data.image_size": "",
        "data.batch_size": "per process",
    }

    def bare_parser(module):
        parser = argparse.ArgumentParser(prog=module)
        parser.add_argument("run_dir")
        parser.add_argument("--fast", action="store_true", help="go fast")
        return parser

    monkeypatch.setattr(reference, "command_parser", bare_parser)
    monkeypatch.setattr(reference, "COMMANDS", (("python -m expreg.x", "expreg.x"),))
    assert reference.missing_help() == ["python -m expreg.x run_dir"]


def test_the_docs_site_builds_with_warnings_as_errors(tmp_path):
    """``mkdocs build --strict``: every page in the navigation, every link and anchor found."""
    pytest.importorskip("mkdocs", reason="the dev extra installs mkdocs")
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "docs" / "mkdocs.yml")]
    result = subprocess.run([*cmd, "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    home = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert 'href="tutorial/"' in home  # the README's links into docs/pages, made site-relative
    assert (tmp_path / "site" / "reference" / "recipe" / "index.html").is_file()


def test_the_readme_stays_short():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) < 200


COMMAND_LINE = re.compile(r"^(python -m expreg\.|expreg-|(accelerate launch|torchrun|python) .*run_regression\.py)")


def _documented_commands() -> list[tuple[str, str, list[str]]]:
    """Every command of the README's and the docs pages' bash blocks: (page, line, its words as the shell
    splits them: placeholders such as ``<run>`` filled in, ``$NAME`` set in the block split unquoted)."""
    found = []
    for page in [REPO / "README.md", *sorted((REPO / "docs" / "pages").rglob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            variables = {}  # NAME='words' set in the block
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if assigned := re.match(r"^([A-Z_]+)='(.*)'$", line):
                    variables[assigned[1]] = assigned[2].split()
                    continue
                line = re.sub(r"^([A-Z_]+=\S+ )+", "", line)  # environment variables before the command
                if not COMMAND_LINE.match(line):
                    continue
                words = shlex.split(re.sub(r"<[^>]+>", "x", line).replace("[", "").replace("]", ""))
                words = [
                    part for word in words for part in (variables.get(word[1:], [word]) if word[:1] == "$" else [word])
                ]
                found.append((page.name, line, words))
    return found


def _parse_documented(words: list[str]):
    """Parse a documented command with its command's own parser; returns (args, recipe or None)."""
    script = next((i for i, w in enumerate(words) if w.endswith("run_regression.py")), None)
    if script is not None:
        module, rest = "run_regression", words[script + 1 :]
    elif words[0].startswith("expreg-"):
        module, rest = "expreg." + words[0][len("expreg-") :], words[1:]
    else:
        module, rest = words[2], words[3:]
    command = reference.command_module(module)
    if hasattr(command, "parse_args"):  # the command's own checks beside its parser's
        args = command.parse_args(rest)
    elif module == "expreg.cv":
        args = command.build_parser().parse_intermixed_args(rest)
    else:
        args = command.build_parser().parse_args(rest)
    return args, getattr(args, "recipe", None)


def test_every_documented_command_line_parses_and_its_recipe_and_overrides_load():
    """The docs cannot show a flag, a recipe or a recipe key and value the code no longer has."""
    from expreg.config import load_recipe

    commands = _documented_commands()
    assert len(commands) > 40 and any("recipes/visium.yaml" in line for _, line, _ in commands)
    assert any(line.startswith("torchrun") for _, line, _ in commands)
    for page, line, words in commands:
        try:
            args, recipe = _parse_documented(words)
        except SystemExit as err:
            raise AssertionError(f"{page}: {line!r} does not parse") from err
        if recipe and "my_recipe" not in recipe:  # a shipped recipe, with the line's overrides
            load_recipe(REPO / recipe, getattr(args, "overrides", None) or [])
        else:
            load_recipe(None, getattr(args, "overrides", None) or [])
