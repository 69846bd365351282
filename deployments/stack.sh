#!/usr/bin/env bash
# Stand the local stack up, in the foreground (Ctrl-C stops all of it):
#   1. a Prefect server on http://127.0.0.1:${PERSONATUNE_PORT:-4200} (SQLite under $PREFECT_HOME, analytics off)
#   2. the process work pool `personatune-local`
#   3. the deployments of prefect.yaml (`prefect deploy --all`): finetune/personatune, watch-quotes/every-5-minutes
#   4. a process worker on that pool
# Environment: PERSONATUNE_PORT (default 4200), PREFECT_HOME (default <repo>/.prefect, so ~/.prefect is left
# alone), HF_HUB_OFFLINE (default 1; set 0 to fetch Hub models), PREFECT_WORKER_QUERY_SECONDS (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)

scripts/setup.sh
. .venv/bin/activate

PORT=${PERSONATUNE_PORT:-4200}
POOL=personatune-local  # the work pool named in prefect.yaml
export PREFECT_HOME=${PREFECT_HOME:-$ROOT/.prefect}
export PREFECT_API_URL=http://127.0.0.1:$PORT/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT=false
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
mkdir -p "$PREFECT_HOME"

# Everything started from here (server, worker, and the flow-run subprocesses the worker starts in their own
# sessions) inherits this marker, so stopping the stack stops all of it and nothing else.
export PERSONATUNE_STACK_ID="stack-$$-$RANDOM"
signal_stack() {  # signal_stack SIG: send SIG to every process carrying our marker; prints how many
    local p n=0
    for p in /proc/[0-9]*; do
        case "${p#/proc/}" in "$$" | "$BASHPID") continue ;; esac
        if grep -qxzF "PERSONATUNE_STACK_ID=$PERSONATUNE_STACK_ID" "$p/environ" 2>/dev/null; then
            kill -"$1" "${p#/proc/}" 2>/dev/null && n=$((n + 1))
        fi
    done
    echo "$n"
}
pids=()
cleanup() {
    trap - EXIT INT TERM
    echo "[stack] stopping" >&2
    for ((i=${#pids[@]}-1; i>=0; i--)); do kill -TERM "${pids[i]}" 2>/dev/null || true; done
    signal_stack TERM >/dev/null
    for _ in $(seq 40); do [ "$(signal_stack 0)" = 0 ] && break; sleep 0.5; done
    signal_stack KILL >/dev/null
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "[stack] Prefect server on http://127.0.0.1:$PORT (PREFECT_HOME=$PREFECT_HOME)"
prefect server start --host 127.0.0.1 --port "$PORT" &
pids+=($!)
python - "$PREFECT_API_URL/health" <<'EOF'
import sys, time, urllib.request
url, deadline = sys.argv[1], time.monotonic() + 180
while True:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"[stack] server at {url} not healthy after 180 s")
    time.sleep(0.5)
EOF

echo "[stack] work pool $POOL (process)"
prefect --no-prompt work-pool create "$POOL" --type process --overwrite >/dev/null
echo "[stack] deploying prefect.yaml"
prefect --no-prompt deploy --all
echo "[stack] worker on $POOL"
prefect --no-prompt worker start --pool "$POOL" --type process --install-policy never &
pids+=($!)

echo "[stack] ready: UI http://127.0.0.1:$PORT/deployments  (Ctrl-C stops server and worker)"
wait -n "${pids[@]}"
echo "[stack] a component exited; stopping the rest" >&2
exit 1
