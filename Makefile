.PHONY: quality style test test-fast docs

quality:  ## lint and format check, as CI
	ruff check . && ruff format --check .

style:  ## apply lint fixes and formatting
	ruff check . --fix && ruff format .

test:  ## both test tiers, as CI
	HF_HUB_OFFLINE=1 pytest && HF_HUB_OFFLINE=1 pytest -m slow

test-fast:  ## the default tier only
	HF_HUB_OFFLINE=1 pytest

docs:  ## the docs site, warnings as errors, as CI (serve it with: mkdocs serve -f docs/mkdocs.yml)
	mkdocs build --strict -f docs/mkdocs.yml
