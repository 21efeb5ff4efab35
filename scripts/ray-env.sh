# Sourced by ray-head.sh and ray-worker.sh: the settings every node of a t2dist cluster shares.
RAY="${RAY:-ray}"
if ! command -v "$RAY" >/dev/null 2>&1; then
    echo "[t2dist] ERROR: '$RAY' not found; activate the venv (. .venv/bin/activate) or set RAY=/path/to/ray" >&2
    exit 127
fi
NODE_IP="${NODE_IP:-$(hostname -I 2>/dev/null | awk '{print $1}')}"
NODE_IP="${NODE_IP:-127.0.0.1}"
export RAY_USAGE_STATS_ENABLED=0
if [[ -n "${RAY_AUTH_TOKEN:-}" || -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
else
    export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
fi
# tests and CPU runs: DeepSpeed must not probe for CUDA on a CPU node
if ! command -v nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"; fi

ray_node_args() {  # append this node's resources and fixed ports to the caller's args array
    [[ -n "${NUM_CPUS:-}" ]] && args+=("--num-cpus=$NUM_CPUS")
    [[ -n "${NUM_GPUS:-}" ]] && args+=("--num-gpus=$NUM_GPUS")
    [[ -n "${RESOURCES:-}" ]] && args+=("--resources=$RESOURCES")
    [[ -n "${NODE_MANAGER_PORT:-}" ]] && args+=("--node-manager-port=$NODE_MANAGER_PORT")
    [[ -n "${OBJECT_MANAGER_PORT:-}" ]] && args+=("--object-manager-port=$OBJECT_MANAGER_PORT")
    [[ -n "${MIN_WORKER_PORT:-}" ]] && args+=("--min-worker-port=$MIN_WORKER_PORT")
    [[ -n "${MAX_WORKER_PORT:-}" ]] && args+=("--max-worker-port=$MAX_WORKER_PORT")
    return 0
}
