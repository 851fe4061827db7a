#!/usr/bin/env bash
# Fresh machine to lab table in one command: set up .venv, then `partlab lab` (flags pass through).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
exec .venv/bin/partlab lab "$@"
