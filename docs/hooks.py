"""mkdocs hook: the pages made from the code and the benchmarks when the site is built (none are stored).

- ``reference/recipe.md`` and ``reference/commands.md``: ``expreg.reference`` (every recipe key and command
  argument, with its help text);
- ``results.md``: ``benchmarks/RESULTS.md``, where the benchmark scripts' measurements are recorded;
- ``index.md``: the repository's ``README.md``, its links into ``docs/pages/`` made relative to the site.
"""

from pathlib import Path

from mkdocs.structure.files import File

from expreg import reference

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"


def home_page() -> str:
    """The README as the site's home page: its links to docs pages, the results and the picture rewritten."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return text.replace("](docs/pages/", "](").replace("](benchmarks/RESULTS.md)", "](results.md)")


def on_files(files, config):
    for name, text in reference.pages().items():
        files.append(File.generated(config, name, content=text))
    files.append(File.generated(config, "index.md", content=home_page()))
    files.append(File.generated(config, "results.md", content=RESULTS.read_text(encoding="utf-8")))
    return files
