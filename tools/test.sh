#!/usr/bin/env bash
# Runs the whole test suite (creates .venv on first use). Extra arguments go to pytest.
set -euo pipefail
TWEETJAX_EXTRAS="test,hf,tensorboard,beam" source "$(dirname "$0")/_venv.sh"
workers="${TWEETJAX_TEST_WORKERS:-$(nproc)}"
exec python -m pytest -n "$workers" --durations=15 "$@"
