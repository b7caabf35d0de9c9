#!/usr/bin/env bash
# The peers harness (../shared/peers, see its README) on a bigger workload: our
# `medium` shape (6 layers, width 384, GPT-2 MLP 1536 / Llama 1024, about 12M
# parameters) at 256 tokens, batch 32, d about 4096. Everything else (tools,
# venv, interleaving, quiet-machine checks, the table) is the harness's own.
# From anywhere (it measures this checkout unless PEERS_PROJECT says otherwise):
#   PEERS_THREADS=1 bash benchmarks/peers_shape.sh
# Knobs: the harness's own (PEERS_THREADS, PEERS_REPS, PEERS_TOOLS, PEERS_MODELS, ...),
# and PEERS_SHAPE (medium), PEERS_N / PEERS_WARMUP_N (default 128 / 32 here: one
# example costs about 16 times the default workload's), PEERS_DIR (the harness).
set -eu
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PEERS=${PEERS_DIR:-$HERE/../../shared/peers}
[ -f "$PEERS/run_peers.sh" ] || { echo "no peers harness at $PEERS: set PEERS_DIR" >&2; exit 2; }
# This checkout is the one measured, wherever the script is started from.
export PEERS_PROJECT=${PEERS_PROJECT:-$(cd "$HERE/.." && pwd)}
export PEERS_SHAPE=${PEERS_SHAPE:-medium}
export PEERS_N=${PEERS_N:-128} PEERS_WARMUP_N=${PEERS_WARMUP_N:-32}
export PEERS_RESULTS=${PEERS_RESULTS:-$HOME/.cache/trackstar-peers/results-$PEERS_SHAPE}
# The harness puts its own directory first on PYTHONPATH; ours comes after it and
# only adds sitecustomize.py, which the harness's directory does not have.
export PYTHONPATH="$HERE/peers_shape${PYTHONPATH:+:$PYTHONPATH}"
exec bash "$PEERS/run_peers.sh"
