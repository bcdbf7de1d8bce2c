.PHONY: quality style test test-fast

quality:  ## lint and format check, as CI
	ruff check . && ruff format --check .

style:  ## apply lint fixes and formatting
	ruff check . --fix && ruff format .

test:  ## the whole suite, as CI
	HF_HUB_OFFLINE=1 pytest

test-fast:  ## without the slow multi-process tests
	HF_HUB_OFFLINE=1 pytest -m "not slow"
