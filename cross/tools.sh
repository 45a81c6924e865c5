# Sourced by cross/build.sh and cross/ci.sh: the pinned cross toolchain and the cargo arguments
# each target needs. Not a standalone script.

# zig is the C compiler and linker for every target (rusqlite's bundled SQLite, mimalloc, tract's
# assembly kernels) and brings musl for each; cargo-zigbuild wires it into cargo.
ZIGLANG_VERSION=0.15.2
CARGO_ZIGBUILD_VERSION=0.24.0

AGENT_TARGETS=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf)
SERVER_TARGETS=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl)

# Installs the pinned zig and cargo-zigbuild from PyPI unless they are already there.
install_zig() {
  local have
  have=$(python3 -m ziglang version 2>/dev/null || true)
  if [ "$have" != "$ZIGLANG_VERSION" ] || ! command -v cargo-zigbuild >/dev/null 2>&1 ||
    [ "$(cargo-zigbuild --version 2>/dev/null | awk '{print $2}')" != "$CARGO_ZIGBUILD_VERSION" ]; then
    python3 -m pip install --quiet --disable-pip-version-check \
      "ziglang==$ZIGLANG_VERSION" "cargo-zigbuild==$CARGO_ZIGBUILD_VERSION"
  fi
  echo "zig $(python3 -m ziglang version), $(cargo-zigbuild --version)"
}

# Adds the Rust standard library for a target. Sets TARGET_ARGS (extra cargo arguments) and
# TARGET_ENV (extra environment, `env` style) for that target.
#
# If the prebuilt std cannot be downloaded (some mirrors lack armv7-unknown-linux-musleabihf),
# std is built from source instead: `-Zbuild-std` on the stable compiler (RUSTC_BOOTSTRAP=1),
# linked against zig's musl C runtime rather than the missing self-contained one.
prepare_target() {
  local target=$1
  TARGET_ARGS=()
  TARGET_ENV=()
  if rustup target list --installed | grep -qx "$target" ||
    rustup target add "$target" >/dev/null 2>&1; then
    return
  fi
  echo "note: no prebuilt Rust std for $target from the rustup server;" \
    "building std from rust-src (-Zbuild-std)" >&2
  rustup component add rust-src >/dev/null 2>&1 || rustup component add rust-src
  TARGET_ARGS=(-Zbuild-std=std,panic_abort)
  TARGET_ENV=(RUSTC_BOOTSTRAP=1 "CARGO_TARGET_$(target_var "$target")_RUSTFLAGS=-C link-self-contained=no")
}

# aarch64-unknown-linux-musl -> AARCH64_UNKNOWN_LINUX_MUSL (cargo's per-target variable names).
target_var() {
  echo "$1" | tr 'a-z.-' 'A-Z__'
}

# The qemu-user emulator that runs a target's binaries, or nothing for the host's own.
qemu_for() {
  case $1 in
    aarch64-*) echo qemu-aarch64-static ;;
    armv7-*) echo qemu-arm-static ;;
    x86_64-*) ;;
    *) echo "unknown target $1" >&2; return 1 ;;
  esac
}

# Debian's name for a target's architecture.
deb_arch() {
  case $1 in
    x86_64-*) echo amd64 ;;
    aarch64-*) echo arm64 ;;
    armv7-*) echo armhf ;;
    *) echo "unknown target $1" >&2; return 1 ;;
  esac
}
