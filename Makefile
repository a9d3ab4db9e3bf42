# The two commands of the README: `make demo` and `make test`. Each sets up .venv first, from the
# hashed locks in requirements/ (scripts/setup.sh says how); `make lock` regenerates those locks
# from pyproject.toml (`UPGRADE=1 make lock` also moves every pin to the newest allowed release).
.PHONY: demo test setup setup-test lock

setup:
	scripts/setup.sh

setup-test:
	scripts/setup.sh test

demo: setup
	RAY_DEDUP_LOGS=0 .venv/bin/serve run configs/demo.yaml

test: setup-test
	.venv/bin/python -m pytest -q

lock:
	scripts/setup.sh lock
