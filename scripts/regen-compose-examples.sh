#!/usr/bin/env bash
# Regenerate the committed compose examples (compose/examples/) from examples/*.yaml.
# tests/test_compose_examples.py fails when they are out of date with the templates.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
FLEETCTL=${FLEETCTL:-fleetctl}
[ -x .venv/bin/fleetctl ] && FLEETCTL=.venv/bin/fleetctl
"$FLEETCTL" generate --config examples/fleet.yaml --gpu "12GiB:RTX 4070 SUPER" \
    --out compose/examples/fleet --state-dir /var/lib/fleetd --no-model-files >/dev/null
"$FLEETCTL" generate --config examples/multi-gpu.yaml \
    --out compose/examples/multi-gpu --state-dir /var/lib/fleetd --no-model-files >/dev/null
echo "regenerated compose/examples/fleet and compose/examples/multi-gpu"
