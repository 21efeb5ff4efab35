#!/usr/bin/env bash
# Join a machine to a t2dist Ray cluster started with scripts/ray-head.sh.
#
#   scripts/ray-worker.sh HEAD_IP:RAY_PORT [--block] [any other `ray start` flags]
#   (or set RAY_HEAD_ADDRESS=HEAD_IP:RAY_PORT)
#
# Environment: NODE_IP, NUM_CPUS, NUM_GPUS, RESOURCES, NODE_MANAGER_PORT, OBJECT_MANAGER_PORT,
# MIN_WORKER_PORT, MAX_WORKER_PORT, RAY_AUTH_TOKEN as for ray-head.sh, and
#   RAY_CONNECT_TIMEOUT  seconds to wait for the head's port to answer before giving up (default 30)
# A head that cannot be reached is an error within RAY_CONNECT_TIMEOUT seconds (exit 2), naming the address.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/ray-env.sh
. "$here/ray-env.sh"

head="${RAY_HEAD_ADDRESS:-}"
if [[ $# -gt 0 && "$1" != --* ]]; then head="$1"; shift; fi
if [[ -z "$head" || "$head" != *:* ]]; then
    echo "usage: scripts/ray-worker.sh HEAD_IP:RAY_PORT [ray start flags]  (the head's address and GCS port)" >&2
    exit 64
fi
host="${head%:*}"; hport="${head##*:}"
timeout_s="${RAY_CONNECT_TIMEOUT:-30}"
deadline=$(( $(date +%s) + timeout_s ))
until timeout 3 bash -c "exec 3<>/dev/tcp/$host/$hport" 2>/dev/null; do
    if (( $(date +%s) >= deadline )); then
        echo "[t2dist] ERROR: cannot reach the Ray head at $host:$hport within ${timeout_s}s." >&2
        echo "[t2dist]   Is scripts/ray-head.sh running there with RAY_PORT=$hport, and is the port open from $NODE_IP?" >&2
        exit 2
    fi
    sleep 1
done

args=("--address=$head" "--node-ip-address=$NODE_IP" --disable-usage-stats)
ray_node_args

echo "[t2dist] joining the Ray cluster at $head as $NODE_IP (auth ${RAY_AUTH_MODE})"
exec "$RAY" start "${args[@]}" "$@"
