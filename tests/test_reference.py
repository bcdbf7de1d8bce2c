"""The docs: reference pages made from the code (every recipe key and command argument, with help text),
the site built with warnings as errors, the README kept short."""

from __future__ import annotations

import argparse
import configparser
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
    for _, module in reference.COMMANDS:
        parser = reference.command_parser(module)
        for action in parser._actions:
            for option in action.option_strings:
                assert option in commands or option in ("-h", "--help"), (module, option)
    assert "| `hest` `--ids` |" in commands  # a subcommand's arguments (python -m expreg.datasets hest)
    assert "| `--overwrite` | off |" in commands and "| `--out_dir` | required |" in commands


def test_every_installed_command_is_in_the_reference():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    scripts = setup["options.entry_points"]["console_scripts"].strip().splitlines()
    modules = {line.split("=")[1].strip().split(":")[0] for line in scripts}
    assert modules <= {module for _, module in reference.COMMANDS}


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


def _documented_commands() -> list[tuple[str, str]]:
    """Every command line of the README's and the docs pages' bash blocks: (page, line)."""
    import re

    found = []
    for page in [REPO / "README.md", *sorted((REPO / "docs" / "pages").rglob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            variables = {}  # NAME='words' set in the block, used as $NAME (split into words, as the shell does)
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if assigned := re.match(r"^([A-Z_]+)='(.*)'$", line):
                    variables[assigned[1]] = assigned[2]
                for name, value in variables.items():
                    line = line.replace(f"${name}", value)
                if re.match(r"(python -m expreg\.|accelerate launch .*run_regression\.py|expreg-)", line):
                    found.append((page.name, line))
    return found


def _parse_documented(line: str) -> None:
    """Parse ``line`` with its command's own parser (placeholders such as ``<run>`` filled in)."""
    import re
    import shlex

    from expreg.config import parse_overrides

    words = shlex.split(re.sub(r"<[^>]+>", "x", line).replace("[", "").replace("]", ""))
    if words[0] == "accelerate":
        module, rest = (
            "run_regression",
            words[1 + next(i for i, w in enumerate(words) if w.endswith("run_regression.py")) :],
        )
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
    for key in parse_overrides(getattr(args, "overrides", None) or []):
        assert key in _known_keys(), f"{line}: unknown recipe key {key}"


def test_every_documented_command_line_parses_with_its_commands_arguments():
    """The docs cannot show a flag or a recipe key the code no longer has."""
    lines = _documented_commands()
    assert len(lines) > 40 and any("recipes/visium.yaml" in line for _, line in lines)
    for page, line in lines:
        try:
            _parse_documented(line)
        except SystemExit as err:
            raise AssertionError(f"{page}: {line!r} does not parse") from err
