#!/usr/bin/env bash
# Fresh machine to test results in one command: set up .venv, then pytest (flags pass through).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
exec .venv/bin/python -m pytest "$@"
