#!/usr/bin/env bash
# CI proof of the edge builds (called by .ci/run; runs alone too, as root on Debian):
#  1. builds the static agent for x86_64, aarch64 and armv7 (musl) with cargo-zigbuild (x86_64
#     unoptimised, `ci-static`: it is the .deb's payload and the parity reference);
#  2. runs the agent's unit tests on aarch64 and armv7 under qemu-user;
#  3. replays committed C-MAPSS data with the signed reference bundle on each, aarch64 and
#     armv7 under qemu-user, and requires predictions equal to x86_64's within 1e-4;
#  4. packages the x86_64 agent, installs the .deb with dpkg -i, runs it (--version, then
#     `run` under a fake systemd notify socket: READY, WATCHDOG, STOPPING), purges it.
#
# The ARM agents build with the `ci-cross` profile (release without LTO, many codegen units),
# the x86_64 one with `ci-static` (unoptimised), so the three builds fit in CI's time; the
# shipped `edge` binaries come from cross/build.sh, whose sizes and parity cross/README.md
# reports.
set -euo pipefail
cd "$(dirname "$0")/.."
source cross/tools.sh
started=$(date +%s)
say() { printf -- '--- %s (%ds)\n' "$*" $(($(date +%s) - started)); }

# The profile of each target's build.
profile_for() { [ "$1" = x86_64-unknown-linux-musl ] && echo ci-static || echo ci-cross; }
target_dir=${CARGO_TARGET_DIR:-target}
out=$target_dir/ci/cross
data=data/cmapss/test_FD001_units_1-15.txt
bundle=models/rul-cnn-fd001/rul-cnn-fd001.mwb
key=models/keys/demo-release.pub.json
rm -rf "$out"
mkdir -p "$out"

say "tools: qemu-user-static, zig, cargo-zigbuild, Rust targets"
if ! command -v qemu-aarch64-static >/dev/null || ! command -v qemu-arm-static >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static >/dev/null
fi
qemu-aarch64-static --version | head -1
install_zig

for target in "${AGENT_TARGETS[@]}"; do
  prepare_target "$target"
  runner=$(qemu_for "$target")
  profile=$(profile_for "$target")
  # The binary and the unit tests in one invocation, so a std built from source is built once.
  # x86_64's unit tests already ran natively in `cargo test --workspace`.
  units=(--bin millwright-agent)
  [ -n "$runner" ] && units+=(--lib --tests)
  say "$target: build the agent${runner:+ and its unit tests} ($profile)"
  env "${TARGET_ENV[@]}" cargo zigbuild --locked --quiet --profile "$profile" --target "$target" \
    -p millwright-agent "${units[@]}" "${TARGET_ARGS[@]}"
  if [ -n "$runner" ]; then
    say "$target: unit tests under $runner"
    env "${TARGET_ENV[@]}" "CARGO_TARGET_$(target_var "$target")_RUNNER=$runner" \
      cargo-zigbuild test --locked --quiet --profile "$profile" --target "$target" \
      -p millwright-agent --lib "${TARGET_ARGS[@]}"
  fi
  say "$target: replay $data${runner:+ under $runner}"
  agent=$target_dir/$target/$profile/millwright-agent
  file "$agent" | grep -q 'statically linked' || { file "$agent"; echo "error: not static" >&2; exit 1; }
  $runner "$agent" --version
  $runner "$agent" replay --bundle "$bundle" --trusted-key "$key" --cmapss "$data" \
    --out "$out/$target.jsonl"
done

say "parity with x86_64 (max |diff| <= 1e-4)"
for target in "${AGENT_TARGETS[@]}"; do
  [ "$target" = x86_64-unknown-linux-musl ] && continue
  printf '%s: ' "$target"
  python3 cross/parity.py "$out/x86_64-unknown-linux-musl.jsonl" "$out/$target.jsonl" 1e-4
done

say ".deb: package, dpkg -i, run, dpkg --purge"
cross/package.sh x86_64-unknown-linux-musl \
  "$target_dir/x86_64-unknown-linux-musl/$(profile_for x86_64-unknown-linux-musl)" "$out/dist"
ls -l "$out/dist"
deb=$(ls "$out"/dist/millwright-agent_*_amd64.deb)
tar -tzf "$out"/dist/millwright-agent-*-x86_64-unknown-linux-musl.tar.gz
dpkg-deb --info "$deb" | sed -n '/Package:/,$p'
dpkg -i "$deb"
for f in /usr/bin/millwright-agent /etc/millwright/agent.toml \
  /lib/systemd/system/millwright-agent.service /usr/lib/sysusers.d/millwright-agent.conf; do
  [ -e "$f" ] || { echo "error: the .deb did not install $f" >&2; exit 1; }
done
getent passwd millwright
stat -c '%U:%G %a %n' /etc/millwright/agent.toml
millwright-agent --version
systemd-analyze verify /lib/systemd/system/millwright-agent.service
systemd-analyze security --offline=yes /lib/systemd/system/millwright-agent.service | tail -1

# The installed agent under a stand-in for systemd's notify socket, the watchdog armed. Its
# identity is cross/ci-identity, enrolled once with a throwaway CA (whose key was discarded) for
# this run alone: the agent loads it and its TLS client configuration, and finds no broker.
run=$(realpath "$out")/run
mkdir -p "$run"
cat >"$run/agent.toml" <<EOF
device = "gw-ci"
data_dir = "$run/data"
[identity]
dir = "$PWD/cross/ci-identity"
[uplink]
broker = "mqtts://127.0.0.1:9"
[trust]
keys = ["$PWD/$key"]
[[assets]]
id = "engine-1"
asset_type = "turbofan"
bundle = "$PWD/$bundle"
source = { kind = "cmapss", path = "$PWD/$data", unit = 1, cycles_per_second = 50.0 }
EOF
python3 - "$run" <<'EOF'
import os, signal, socket, subprocess, sys, time
run = sys.argv[1]
path = os.path.join(run, "notify.sock")
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind(path)
sock.settimeout(0.5)
env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="3000000")
agent = subprocess.Popen(["millwright-agent", "run", "--config", os.path.join(run, "agent.toml")],
                         env=env, stderr=open(os.path.join(run, "agent.log"), "w"))
seen, deadline = [], time.time() + 20
while time.time() < deadline and seen.count("WATCHDOG=1") < 3:
    try:
        seen += sock.recv(4096).decode().split()
    except socket.timeout:
        pass
agent.send_signal(signal.SIGTERM)
code = agent.wait(timeout=20)
try:
    while True:
        seen += sock.recv(4096).decode().split()
except socket.timeout:
    pass
print("notify messages:", " ".join(dict.fromkeys(seen)), f"({seen.count('WATCHDOG=1')} pings), exit {code}")
if code != 0 or "READY=1" not in seen or seen.count("WATCHDOG=1") < 3 or "STOPPING=1" not in seen:
    sys.exit("error: the agent did not notify READY, WATCHDOG and STOPPING and exit 0")
EOF

dpkg --purge millwright-agent
for f in /usr/bin/millwright-agent /etc/millwright/agent.toml \
  /lib/systemd/system/millwright-agent.service; do
  [ ! -e "$f" ] || { echo "error: dpkg --purge left $f" >&2; exit 1; }
done
echo "installed, ran and purged $(basename "$deb")"
say "edge builds proven"
