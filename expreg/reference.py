"""The docs' reference pages, made from the code so that they cannot drift (``docs/hooks.py`` builds them).

- Recipe keys: every key of ``expreg.config`` with its type and default from the dataclasses, and its help
  from the comments of ``recipes/base.yaml``, the template every recipe starts from (``tests/test_config.py``
  checks that it lists every key at its default).
- Commands: every command's arguments, from the ``build_parser()`` of each command module.

``missing_help()`` lists keys and arguments without help text; ``tests/test_reference.py`` requires none.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import importlib.util
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from expreg import config

REPO = Path(__file__).resolve().parents[1]
BASE_RECIPE = REPO / "recipes" / "base.yaml"
# (how it is run, module): every command, in the order of the pipeline
COMMANDS = (
    ("python -m expreg.prepare", "expreg.prepare"),
    ("python -m expreg.splits", "expreg.splits"),
    ("accelerate launch run_regression.py", "run_regression"),
    ("python -m expreg.cv", "expreg.cv"),
    ("python -m expreg.predict", "expreg.predict"),
    ("python -m expreg.map", "expreg.map"),
    ("python -m expreg.aggregate", "expreg.aggregate"),
    ("python -m expreg.plots", "expreg.plots"),
    ("python -m expreg.hub", "expreg.hub"),
    ("python -m expreg.datasets", "expreg.datasets"),
)
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[a-z_]+):(?P<value>[^#]*)(#\s?(?P<help>.*))?$")
_MORE = re.compile(r"^ +# ?(?P<help>.*)$")  # an indented comment line goes on with the key above it


@dataclass(frozen=True)
class RecipeKey:
    key: str  # section.name, or a top-level name (seed)
    type: str
    default: object
    help: str


@dataclass(frozen=True)
class Argument:
    command: str  # as it is run, with a subcommand where there is one
    name: str  # "--flag" (and its aliases) or a positional's name
    default: object
    required: bool
    help: str


def recipe_help(path: Path = BASE_RECIPE) -> dict[str, str]:
    """``section.key`` -> the comment beside it (and the indented comment lines under it) in ``path``."""
    found: dict[str, str] = {}
    section, last = None, None
    for line in path.read_text(encoding="utf-8").splitlines():
        more = _MORE.match(line)
        if more and last is not None:
            found[last] = f"{found[last]} {more['help'].strip()}".strip()
            continue
        key = _KEY.match(line)
        if not key:
            last = None
            continue
        if not key["indent"] and not key["value"].strip():  # a section: data:, model:, ...
            section, last = key["key"], None
            continue
        last = key["key"] if not key["indent"] else f"{section}.{key['key']}"
        found[last] = (key["help"] or "").strip()
    return found


def _type_name(annotation) -> str:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def recipe_keys() -> list[RecipeKey]:
    """Every recipe key, in ``recipes/base.yaml``'s order: type and default from the dataclasses."""
    helps = recipe_help()
    sections = {"": config.RunConfig, **config._SECTIONS}
    keys = []
    for section, cls in sections.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if section == "" and f.name in config._SECTIONS:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            key = f"{section}.{f.name}" if section else f.name
            keys.append(RecipeKey(key, _type_name(hints[f.name]), default, helps.get(key, "")))
    order = {key: i for i, key in enumerate(helps)}
    return sorted(keys, key=lambda k: order.get(k.key, len(order)))


@functools.cache
def command_module(module: str) -> types.ModuleType:
    """A command's module; ``run_regression`` is read from the repository's top level (once)."""
    if module == "run_regression":
        spec = importlib.util.spec_from_file_location(module, REPO / "run_regression.py")
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        return loaded
    return importlib.import_module(module)


def command_parser(module: str) -> argparse.ArgumentParser:
    """A command module's ``build_parser()``."""
    return command_module(module).build_parser()


def _arguments(command: str, parser: argparse.ArgumentParser) -> list[Argument]:
    found = []
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _arguments(f"{command} {name}", sub)
            continue
        name = ", ".join(action.option_strings) or action.dest
        text = formatter._expand_help(action) if action.help else ""
        if text and action.choices and not _lists_all(text, action.choices):
            text += f" (one of: {', '.join(map(str, action.choices))})"
        switch = isinstance(action, argparse._StoreTrueAction)
        default = "switch" if switch else None if action.default in (None, argparse.SUPPRESS) else action.default
        found.append(Argument(command, name, default, bool(action.required), text))
    return found


def _lists_all(text: str, choices) -> bool:
    return all(str(choice) in text for choice in choices)


def command_arguments() -> list[Argument]:
    """Every argument of every command (a subcommand's under ``<command> <subcommand>``)."""
    return [a for run, module in COMMANDS for a in _arguments(run, command_parser(module))]


def missing_help() -> list[str]:
    """Recipe keys and command arguments that have no help text."""
    keys = [f"recipe key {k.key}" for k in recipe_keys() if not k.help]
    arguments = [f"{a.command} {a.name}" for a in command_arguments() if not a.help]
    return keys + arguments


def _cell(text: str) -> str:
    """Text for a Markdown table cell: pipes escaped, angle brackets and asterisks shown as typed."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*")


def _value(value) -> str:
    if value == "switch":  # a flag without a value (store_true): off unless given
        return "off"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`"


def recipe_page() -> str:
    """``reference/recipe.md``: one table per recipe section."""
    lines = [
        "# Recipe keys",
        "",
        "Every key a recipe can set, with its type and default (from `expreg/config.py`) and what it does (from",
        "the comments of `recipes/base.yaml`, the template to copy). Set a key in a recipe's section, or on the",
        "command line as `section.key=value` (`seed=value` at the top); built-in defaults < recipe < command",
        "line. An unknown key is an error that suggests the key meant.",
        "",
        "*Generated from the code by `expreg.reference` when the docs are built.*",
    ]
    section = None
    for k in recipe_keys():
        here = k.key.split(".")[0] if "." in k.key else "top level"
        if here != section:
            section = here
            lines += ["", f"## {section}", "", "| key | type | default | what it does |", "|---|---|---|---|"]
        lines.append(f"| `{k.key}` | {_cell(k.type)} | {_value(k.default)} | {_cell(k.help)} |")
    return "\n".join(lines) + "\n"


def commands_page() -> str:
    """``reference/commands.md``: each command's usage and arguments."""
    lines = [
        "# Commands",
        "",
        "Every command's arguments (from each command's `build_parser()`). Each `python -m expreg.<command>` is",
        "also installed as `expreg-<command>`. `--help` prints the same.",
        "",
        "*Generated from the code by `expreg.reference` when the docs are built.*",
    ]
    for run, module in COMMANDS:
        parser = command_parser(module)
        lines += ["", f"## `{run}`", "", parser.description or "", ""]
        lines += ["| argument | default | what it does |", "|---|---|---|"]
        for a in _arguments(run, parser):
            sub = a.command[len(run) :].strip()
            name = f"`{sub}` `{a.name}`" if sub else f"`{a.name}`"
            default = "required" if a.required else _value(a.default)
            lines.append(f"| {name} | {default} | {_cell(a.help)} |")
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """The generated pages, by their path under the docs folder."""
    return {"reference/recipe.md": recipe_page(), "reference/commands.md": commands_page()}
