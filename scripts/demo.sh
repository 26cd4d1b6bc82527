#!/usr/bin/env bash
# The main demo (README): Example A in its short version -- a network followed by the differentiable
# track propagator, trained on hit residuals only, against pure networks and a least-squares fit.
# Under 2 minutes on 2 CPU cores. Writes hybrid_tracking.png and hybrid_tracking.h5 to out/ (or $1)
# and prints the comparison table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
out="${1:-out}"
mkdir -p "$out"
exec .venv/bin/python examples/hybrid_tracking.py --quick -o "$out"
