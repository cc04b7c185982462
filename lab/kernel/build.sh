#!/usr/bin/env bash
# Usage: build.sh [--config-only] OUT_DIR
# Builds the lab kernel from Debian's linux-source-6.12 with config-fragment (asserted) and
# config-trims (not asserted), and installs into OUT_DIR: bzImage, config, uapi-headers.tar.gz
# (make headers_install) and iommufd_test.h. ~1,500 CPU-seconds. Needs the packages that
# scripts/lab installs before calling it (build-essential bc bison flex libelf-dev libssl-dev rsync).
# --config-only stops after the asserted olddefconfig and writes OUT_DIR/config only (a quick check
# of the recipe against a new linux-source-6.12).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
config_only=
if [ "${1:-}" = --config-only ]; then
    config_only=1
    shift
fi
out=$1
work=$(mktemp -d "${TMPDIR:-/tmp}/tern-lab-kernel.XXXXXX")
trap 'rm -rf "$work"' EXIT

cd "$work"
apt-get -o APT::Sandbox::User=root download linux-source-6.12 >/dev/null
dpkg -x linux-source-6.12_*.deb deb
tar -xf deb/usr/src/linux-source-6.12.tar.xz
cd linux-source-6.12

make -s x86_64_defconfig
make -s kvm_guest.config
scripts/kconfig/merge_config.sh -m .config "$here/config-fragment" "$here/config-trims" >/dev/null
make -s olddefconfig
"$here/check-config.sh" .config "$here/config-fragment"
if [ -n "$config_only" ]; then
    mkdir -p "$out"
    cp .config "$out/config"
    echo "lab kernel: config of $(make -s kernelversion) satisfies the fragment: $out/config"
    exit 0
fi

start=$(date +%s)
if ! make -j"$(nproc)" bzImage >"$work/build.log" 2>&1; then
    tail -50 "$work/build.log" >&2
    exit 1
fi
echo "lab kernel: bzImage built in $(($(date +%s) - start)) s"
make -s headers_install INSTALL_HDR_PATH="$work/hdr"

rm -rf "$out.partial"
mkdir -p "$out.partial"
cp arch/x86/boot/bzImage "$out.partial/bzImage"
cp .config "$out.partial/config"
cp drivers/iommu/iommufd/iommufd_test.h "$out.partial/iommufd_test.h"
tar -czf "$out.partial/uapi-headers.tar.gz" -C "$work/hdr" .
rm -rf "$out"
mv "$out.partial" "$out"
