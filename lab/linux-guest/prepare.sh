#!/usr/bin/env bash
# Usage: prepare.sh CACHE_ROOT
# Prints the directory (under CACHE_ROOT, reused when present) holding the guest a tern inside the
# lab boots in the linux-boot scenarios:
#   vmlinuz             bzImage of Debian's newest linux-image-*-cloud-amd64-unsigned
#   vmlinux             the ELF kernel extracted from it (for PVH boot), if it has a PVH note
#   initramfs.cpio.gz   busybox + an /init that prints `TERN-LINUX-INIT-OK cmdline=...` and powers off
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache_root=$1

pkg=$(apt-cache search --names-only '^linux-image-[0-9].*-cloud-amd64-unsigned$' | cut -d' ' -f1 |
    sort -V | tail -1)
[ -n "$pkg" ] || { echo "linux-guest: no linux-image-*-cloud-amd64-unsigned package in apt" >&2; exit 1; }
version=$(apt-cache show --no-all-versions "$pkg" | sed -n 's/^Version: //p' | head -1)
key=$(cat "$here/init" "$0" | sha256sum | cut -c1-12)
dir=$cache_root/${pkg}_${version}-$key
if [ -s "$dir/vmlinuz" ] && [ -s "$dir/initramfs.cpio.gz" ]; then
    echo "$dir"
    exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/tern-linux-guest.XXXXXX")
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get -o APT::Sandbox::User=root download "$pkg" >/dev/null)
dpkg-deb -x "$work"/"$pkg"_*.deb "$work/deb"
mkdir -p "$work/out"
cp "$work"/deb/boot/vmlinuz-* "$work/out/vmlinuz"

# extract-vmlinux: try each compressed-payload magic until one decompresses to an ELF image.
extract_vmlinux() {
    local img=$1 out=$2 magic cmd off
    for spec in '\x28\xb5\x2f\xfd:zstd -dcq' '\xfd\x37\x7a\x58\x5a\x00:xz -dcq' '\x1f\x8b\x08:gzip -dcq'; do
        magic=${spec%%:*}
        cmd=${spec#*:}
        for off in $(LC_ALL=C grep -obUaP "$magic" "$img" | cut -d: -f1); do
            tail -c +$((off + 1)) "$img" | $cmd >"$out" 2>/dev/null || true
            if [ "$(head -c 4 "$out" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
                return 0
            fi
        done
    done
    rm -f "$out"
    return 1
}
if extract_vmlinux "$work/out/vmlinuz" "$work/out/vmlinux"; then
    # XEN_ELFNOTE_PHYS32_ENTRY (type 18) is the PVH entry point.
    if ! readelf -n "$work/out/vmlinux" 2>/dev/null | grep -qiE 'Xen .*0x00000012|PHYS32_ENTRY'; then
        echo "linux-guest: $pkg vmlinux has no PVH note; the PVH scenario will fail" >&2
    fi
else
    echo "linux-guest: could not extract an ELF vmlinux from $pkg" >&2
fi

root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys}
cp /bin/busybox "$root/bin/busybox"
cp "$here/init" "$root/init"
chmod 755 "$root/init"
mknod -m 600 "$root/dev/console" c 5 1
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9 >"$work/out/initramfs.cpio.gz")

mkdir -p "$cache_root"
rm -rf "$dir"
mv "$work/out" "$dir"
echo "$dir"
