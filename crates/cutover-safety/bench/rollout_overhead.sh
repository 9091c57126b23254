#!/usr/bin/env bash
# Time from `deploy` to `promoted` of a one-step canary (analysis off, health checks every
# 100 ms, scale_down_delay 0s), N rollouts per setup, medians: with nothing of CONTRACT §9
# configured, and with a `pre_deploy` hook (`true`) and one smoke check. Give several cutover
# binaries (e.g. one built from before release safety) to compare them in the same run.
#
#   crates/cutover-safety/bench/rollout_overhead.sh target/release/cutover [other/cutover ...]
set -euo pipefail
N=${N:-15}
[ $# -ge 1 ] || set -- target/release/cutover
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

run() { # binary, label, extra-toml
  local exe; exe=$(realpath "$1")
  local dir; dir=$(mktemp -d)
  local api web; api=$(free_port); web=$(free_port)
  cat > "$dir/cutover.toml" <<TOML
[daemon]
api = "127.0.0.1:$api"
state_dir = "state"

[services.web]
listen = "127.0.0.1:$web"
command = ["cutover", "demo-app", "--port", "{port}", "--version", "{version}"]
instances = 2
scale_down_delay = "0s"
drain_timeout = "1s"
analysis = false

[services.web.health]
interval = "100ms"
timeout = "80ms"
healthy_threshold = 1

[services.web.canary]
steps = [ { weight = 100 } ]
$3
TOML
  (cd "$dir" && exec "$exe" up >"$dir/daemon.log" 2>&1) &
  local pid=$!
  for _ in $(seq 100); do "$exe" -c "$dir/cutover.toml" status >/dev/null 2>&1 && break; sleep 0.1; done
  sleep 1
  for i in $(seq 2 $((N + 1))); do
    "$exe" -c "$dir/cutover.toml" deploy web "v$i" --wait >/dev/null 2>&1 || { echo "deploy v$i failed" >&2; cat "$dir/daemon.log" >&2; }
  done
  "$exe" -c "$dir/cutover.toml" history --json --limit "$N" | python3 -c '
import json, sys, datetime, statistics
label = sys.argv[1]
p = lambda s: datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))
d = [(p(r["finished_at"]) - p(r["started_at"])).total_seconds() * 1000 for r in json.load(sys.stdin)["rollouts"]]
print(f"{label:<58} median {statistics.median(d):7.0f} ms   min {min(d):5.0f}   max {max(d):5.0f}   n={len(d)}")
' "$2"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
}

GUARDED='
[services.web.hooks]
pre_deploy = ["true"]

[[services.web.smoke]]
path = "/healthz"'
for exe in "$@"; do
  run "$exe" "$exe: nothing configured" ""
  run "$exe" "$exe: pre_deploy hook + smoke check" "$GUARDED" 2>/dev/null || echo "$exe: (does not know hooks/smoke)"
done
