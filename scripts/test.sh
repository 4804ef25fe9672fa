#!/usr/bin/env bash
# Set up (idempotent) and run every test folder. Distributed tests fork their ranks, so they run in their own
# pytest process whose parent never starts a torch thread pool.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
py="$root/.venv/bin/python"
export PYTHONWARNINGS=ignore OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
status=0
single=()
for d in tests/unit tests/ext tests/gpu; do
  [ -d "$d" ] && single+=("$d")
done
"$py" -m pytest -q "${single[@]}" || status=$?
"$py" -m pytest -q tests/distributed || status=$?
exit $status
