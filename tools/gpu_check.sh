#!/usr/bin/env bash
# Verify a GPU machine in one command (tools/gpu_check.py says what each step checks):
#
#   tools/gpu_check.sh                    # every CUDA path of the tool, ~8 minutes on one H100
#   tools/gpu_check.sh --out DIR          # runs, gpu_check.json and gpu_check.md in DIR
#   tools/gpu_check.sh --rehearse         # the same steps on the CPU, standing in for a GPU
#
# Without CUDA (and without --rehearse) it says so in one sentence and exits 2.
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/gpu_check.py" "$@"
