#!/usr/bin/env bash
# Start the Ray head node of a t2dist cluster (run it on one machine; then scripts/ray-worker.sh on the others).
#
#   scripts/ray-head.sh [--block] [any other `ray start` flags]
#
# Environment (all optional):
#   NODE_IP          address the other nodes reach this one at (default: first of `hostname -I`)
#   RAY_PORT         GCS port the workers connect to                    (default 6379)
#   DASHBOARD_PORT   dashboard + job-submission API (`ray job submit`)  (default 8265)
#   DASHBOARD_HOST   interface the dashboard listens on                 (default 0.0.0.0)
#   CLIENT_PORT      Ray client server                                  (default 10001)
#   NODE_MANAGER_PORT, OBJECT_MANAGER_PORT, MIN_WORKER_PORT, MAX_WORKER_PORT
#                    fix these when a firewall sits between the nodes (Ray picks random ports otherwise);
#                    the learner's torch.distributed rendezvous also uses a random free port on rank 0's node
#   NUM_CPUS, NUM_GPUS, RESOURCES (JSON)   what this node offers (default: what Ray detects)
#   RAY_TEMP_DIR     Ray's session directory (head only; keep the path short: socket paths < 108 bytes)
#   RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH   a shared secret: turns on Ray's token authentication
#                    (RAY_AUTH_MODE=token); every node and `ray job submit` need the same token.
#                    Without a token the cluster runs with RAY_AUTH_MODE=disabled: trusted networks only.
#   RAY              the ray executable (default: `ray` on PATH, e.g. from .venv/bin)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/ray-env.sh
. "$here/ray-env.sh"

port="${RAY_PORT:-6379}"
args=(--head "--port=$port" "--node-ip-address=$NODE_IP"
      --include-dashboard=true "--dashboard-host=${DASHBOARD_HOST:-0.0.0.0}" "--dashboard-port=${DASHBOARD_PORT:-8265}"
      "--ray-client-server-port=${CLIENT_PORT:-10001}" --disable-usage-stats)
[[ -n "${RAY_TEMP_DIR:-}" ]] && args+=("--temp-dir=$RAY_TEMP_DIR")
ray_node_args

echo "[t2dist] starting the Ray head at $NODE_IP:$port (dashboard/jobs http://$NODE_IP:${DASHBOARD_PORT:-8265}, auth ${RAY_AUTH_MODE})"
exec "$RAY" start "${args[@]}" "$@"
