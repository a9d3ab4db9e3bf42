# The two commands of the README: `make demo` and `make test`. Each sets up .venv first.
.PHONY: demo test setup setup-test

setup:
	scripts/setup.sh

setup-test:
	scripts/setup.sh test

demo: setup
	RAY_DEDUP_LOGS=0 .venv/bin/serve run configs/demo.yaml

test: setup-test
	.venv/bin/python -m pytest -q
