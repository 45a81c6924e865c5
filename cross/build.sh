#!/usr/bin/env bash
# Builds the static edge binaries with cargo-zigbuild and packages them into dist/:
# millwright-agent for x86_64, aarch64 and armv7 (musl), millwright-server and millwright for
# x86_64 and aarch64. No Docker. See cross/README.md.
#
#   cross/build.sh                        # everything, profile `edge`, then cross/package.sh
#   cross/build.sh --agent-only           # just the three agents
#   cross/build.sh --targets aarch64-unknown-linux-musl --profile ci-cross --no-package
set -euo pipefail
cd "$(dirname "$0")/.."
source cross/tools.sh

profile=edge
targets=("${AGENT_TARGETS[@]}")
server_targets=("${SERVER_TARGETS[@]}")
package=yes
while [ $# -gt 0 ]; do
  case $1 in
    --profile) profile=$2; shift 2 ;;
    --targets) read -r -a targets <<<"$2"; shift 2 ;;
    --agent-only) server_targets=(); shift ;;
    --no-package) package=no; shift ;;
    -h | --help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 64 ;;
  esac
done

install_zig
target_dir=${CARGO_TARGET_DIR:-target}
# cargo calls the `dev` profile's folder `debug`.
[ "$profile" = dev ] && out_profile=debug || out_profile=$profile

mb() { awk -v b="$1" 'BEGIN { printf "%.2f MB (%.2f MiB)", b / 1e6, b / 1048576 }'; }

sizes=()
for target in "${targets[@]}"; do
  prepare_target "$target"
  # The agent alone, so that features the server enables on shared crates stay out of it.
  echo "=== $target: millwright-agent ($profile)"
  env "${TARGET_ENV[@]}" cargo zigbuild --locked --quiet --profile "$profile" --target "$target" \
    -p millwright-agent "${TARGET_ARGS[@]}"
  bins=(millwright-agent)
  if [[ " ${server_targets[*]} " == *" $target "* ]]; then
    echo "=== $target: millwright-server, millwright ($profile)"
    env "${TARGET_ENV[@]}" cargo zigbuild --locked --quiet --profile "$profile" --target "$target" \
      -p millwright-server -p millwright-cli "${TARGET_ARGS[@]}"
    bins+=(millwright-server millwright)
  fi
  for bin in "${bins[@]}"; do
    path=$target_dir/$target/$out_profile/$bin
    sizes+=("$(printf '%-32s %-18s %s' "$target" "$bin" "$(mb "$(stat -c %s "$path")")")")
  done
  if [ "$package" = yes ]; then
    cross/package.sh "$target" "$target_dir/$target/$out_profile" dist
  fi
done

echo
echo "Stripped sizes ($profile profile; the agent's bar is 15 MB):"
printf '  %s\n' "${sizes[@]}"
