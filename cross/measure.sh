#!/usr/bin/env bash
# Measures an agent binary the way cross/README.md reports it: stripped size, offline replay
# time (best of N runs over a C-MAPSS file), and RSS under the demo load: 5 assets replaying
# train_FD001 units 1-5 at 10 cycles/s, model loaded, uplink connected over mqtts:// to a real
# server with identity on (the `millwright` CLI beside SERVER sets the fleet up).
#
#   cross/measure.sh AGENT SERVER [CMAPSS_FILE] [RUNS]
#   cross/measure.sh target/x86_64-unknown-linux-musl/edge/millwright-agent \
#                    target/release/millwright-server ../shared/data/cmapss/test_FD001.txt 5
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  sed -n '2,10p' "$0" >&2
  exit 64
fi
agent=$(realpath "$1") server=$(realpath "$2")
cmapss=${3:-data/cmapss/test_FD001_units_1-15.txt}
runs=${4:-5}
repo=$(pwd)
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

size=$(stat -c %s "$agent")
awk -v b="$size" 'BEGIN { printf "size: %d bytes = %.2f MB\n", b, b / 1e6 }'

best=
for _ in $(seq "$runs"); do
  start=$(date +%s.%N)
  "$agent" replay --bundle models/rul-cnn-fd001/rul-cnn-fd001.mwb \
    --trusted-key models/keys/demo-release.pub.json --cmapss "$cmapss" \
    --out "$work/replay.jsonl" 2>/dev/null
  t=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { print e - s }')
  if [ -z "$best" ] || awk -v t="$t" -v b="$best" 'BEGIN { exit !(t < b) }'; then best=$t; fi
done
printf 'replay: %d predictions from %s, best of %d: %.3f s\n' \
  "$(wc -l <"$work/replay.jsonl")" "$(basename "$cmapss")" "$runs" "$best"

# The demo load as deployed: a server with its embedded broker on free ports, TLS and identity
# on (a fresh fleet CA, the server's certificate and message key, an admin token), and one
# enrolled agent with 5 assets on mqtts://. The `millwright` CLI is the one beside SERVER.
cli=$(dirname "$server")/millwright
[ -x "$cli" ] || { echo "error: $cli is missing (built with the server)" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mqtt=$(free_port) http=$(free_port)
"$cli" ca create --out-dir "$work/ca" >/dev/null
"$cli" ca server-cert --ca "$work/ca" --dns localhost --ip 127.0.0.1 --out-dir "$work/ca" >/dev/null
"$cli" keygen --out-dir "$work" --name server >/dev/null
cat >"$work/server.toml" <<EOF
data_dir = "$work/server"
http_listen = "127.0.0.1:$http"
[identity]
server_key = "$work/server.secret.json"
ca = "$work/ca/ca.crt.pem"
cert = "$work/ca/millwright-server.crt.pem"
key = "$work/ca/millwright-server.key.pem"
[mqtt]
embedded_listen = "127.0.0.1:$mqtt"
EOF
token=$("$cli" user add --name measure --role admin --config "$work/server.toml" 2>/dev/null)
"$server" --config "$work/server.toml" 2>"$work/server.log" &
pids+=($!)
export MILLWRIGHT_SERVER=https://127.0.0.1:$http MILLWRIGHT_TOKEN=$token
export MILLWRIGHT_CA=$work/ca/ca.crt.pem
for _ in $(seq 50); do
  curl -sf --cacert "$MILLWRIGHT_CA" "$MILLWRIGHT_SERVER/api/v1/health" >/dev/null && break
  sleep 0.2
done
"$cli" device enroll gw-rss --ca "$work/ca" --out-dir "$work/identity" >/dev/null
cat >"$work/agent.toml" <<EOF
device = "gw-rss"
data_dir = "$work/agent"
[identity]
dir = "$work/identity"
[uplink]
broker = "mqtts://127.0.0.1:$mqtt"
[trust]
keys = ["$repo/models/keys/demo-release.pub.json"]
EOF
for unit in 1 2 3 4 5; do
  cat >>"$work/agent.toml" <<EOF
[[assets]]
id = "engine-$unit"
asset_type = "turbofan"
bundle = "$repo/models/rul-cnn-fd001/rul-cnn-fd001.mwb"
source = { kind = "cmapss", path = "$repo/data/cmapss/train_FD001_units_1-6.txt", unit = $unit, cycles_per_second = 10.0 }
EOF
done
"$agent" run --config "$work/agent.toml" 2>"$work/agent.log" &
agent_pid=$!
pids+=("$agent_pid")
sleep 20
grep -E '^(VmHWM|VmRSS|RssAnon|RssFile)' "/proc/$agent_pid/status" | tr -s ' \t' ' ' |
  awk '{ printf "%s %.1f MiB  ", $1, $2 / 1024 } END { print "" }'
stored=$(curl -s --cacert "$MILLWRIGHT_CA" -H "Authorization: Bearer $token" \
  "$MILLWRIGHT_SERVER/api/v1/devices" | grep -o '"predictions":[0-9]*' || true)
echo "after 20 s of the demo load; server reports ${stored:-nothing}"
