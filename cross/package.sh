#!/usr/bin/env bash
# Packages built binaries for one target into OUT_DIR: a tarball and a .deb per program
# (millwright-agent always; millwright-server with the `millwright` CLI when they were built).
#
#   cross/package.sh TARGET BIN_DIR OUT_DIR
#   cross/package.sh aarch64-unknown-linux-musl target/aarch64-unknown-linux-musl/edge dist
#
# Each tarball holds the binary, the sample config (every option commented), the hardened
# systemd unit, the sysusers.d file and INSTALL.md. The .deb installs the same files (the
# config as a conffile under /etc/millwright) plus maintainer scripts that create the
# `millwright` user and restart the service on upgrade. Needs only dpkg-deb.
set -euo pipefail
cd "$(dirname "$0")/.."
source cross/tools.sh

if [ $# -ne 3 ]; then
  sed -n '2,6p' "$0" >&2
  exit 64
fi
target=$1 bin_dir=$2 out_dir=$3
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(deb_arch "$target")
mkdir -p "$out_dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# package NAME DESCRIPTION CONFIG_SOURCE CONFIG_NAME STATE_DIR BINARIES...
package() {
  local name=$1 description=$2 config_src=$3 config=$4 state=$5
  shift 5
  local bins=("$@") bin
  for bin in "${bins[@]}"; do
    if [ ! -x "$bin_dir/$bin" ]; then
      echo "error: $bin_dir/$bin is missing; build it first (cross/build.sh)" >&2
      exit 1
    fi
  done

  # Tarball: flat, ready to copy to a gateway.
  local tdir=$work/$name-$version-$target
  mkdir -p "$tdir"
  for bin in "${bins[@]}"; do install -m 0755 "$bin_dir/$bin" "$tdir/"; done
  install -m 0644 "$config_src" "$tdir/$config"
  install -m 0644 "cross/systemd/$name.service" cross/systemd/millwright.sysusers "$tdir/"
  install -m 0644 cross/INSTALL.md "$tdir/INSTALL.md"
  tar -C "$work" --owner=0 --group=0 --sort=name -czf "$out_dir/$name-$version-$target.tar.gz" \
    "$name-$version-$target"

  # .deb
  local root=$work/deb-$name
  mkdir -p "$root/DEBIAN" "$root/usr/bin" "$root/etc/millwright" "$root/lib/systemd/system" \
    "$root/usr/lib/sysusers.d" "$root/usr/share/doc/$name"
  for bin in "${bins[@]}"; do install -m 0755 "$bin_dir/$bin" "$root/usr/bin/"; done
  install -m 0640 "$config_src" "$root/etc/millwright/$config"
  install -m 0644 "cross/systemd/$name.service" "$root/lib/systemd/system/"
  install -m 0644 cross/systemd/millwright.sysusers "$root/usr/lib/sysusers.d/$name.conf"
  install -m 0644 cross/INSTALL.md "$root/usr/share/doc/$name/INSTALL.md"
  printf 'Millwright %s\nLicense: Apache-2.0\nSource: https://github.com/millwright-pdm/millwright\n' \
    "$name" >"$root/usr/share/doc/$name/copyright"
  echo "/etc/millwright/$config" >"$root/DEBIAN/conffiles"
  cat >"$root/DEBIAN/control" <<EOF
Package: $name
Version: $version-1
Architecture: $arch
Maintainer: Millwright maintainers <millwright@users.noreply.github.com>
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Section: misc
Priority: optional
Homepage: https://github.com/millwright-pdm/millwright
Description: $description
 Static binary (musl, $target). The service runs as the system user
 millwright with a hardened systemd unit; edit /etc/millwright/$config,
 then: systemctl enable --now $name
EOF
  local script
  for script in postinst prerm postrm; do
    sed -e "s/@NAME@/$name/g" -e "s/@CONFIG@/$config/g" -e "s/@STATE@/$state/g" \
      "cross/deb/$script" >"$root/DEBIAN/$script"
    chmod 0755 "$root/DEBIAN/$script"
  done
  dpkg-deb --root-owner-group -Zxz --build "$root" "$out_dir/${name}_$version-1_$arch.deb" >/dev/null
  echo "packaged $out_dir/$name-$version-$target.tar.gz and $out_dir/${name}_$version-1_$arch.deb"
}

package millwright-agent "Millwright edge agent: signed ONNX models, SQLite outbox, MQTT uplink" \
  agent/millwright-agent.example.toml agent.toml millwright millwright-agent
if [ -x "$bin_dir/millwright-server" ]; then
  package millwright-server "Millwright fleet server with embedded MQTT broker, and the millwright CLI" \
    server/millwright-server.example.toml server.toml millwright-server millwright-server millwright
fi
