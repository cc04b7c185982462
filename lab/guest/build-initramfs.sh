#!/usr/bin/env bash
# Usage: build-initramfs.sh OUT.cpio.gz [--bin PATH]... [--file SRC:DEST]...
# Packs the lab guest: busybox-static, lab/guest/init as /init, lab/guest/lib.sh as /lab/lib.sh,
# lab/scenarios/*.sh under /lab/scenarios, each --bin into /lab/bin together with every shared
# library it needs (ldd) and the dynamic loader at their host paths, each --file at DEST.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
lab=$(dirname "$here")
out=$1
shift
root=$(mktemp -d "${TMPDIR:-/tmp}/tern-lab-root.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,lab/bin,lab/scenarios}

# busybox-static's /bin/busybox: the guest has no libc of its own for it.
cp /bin/busybox "$root/bin/busybox"
cp "$here/init" "$root/init"
chmod 755 "$root/init"
cp "$here/lib.sh" "$root/lab/lib.sh"
cp "$lab"/scenarios/*.sh "$root/lab/scenarios/"

copy_libs() {
    # ldd prints "name => /path (addr)" for libraries and "/path (addr)" for the loader.
    ldd "$1" 2>/dev/null | awk '/=> \// { print $3 } /^\t\// { print $1 }' | while read -r lib; do
        mkdir -p "$root$(dirname "$lib")"
        [ -e "$root$lib" ] || cp -L "$lib" "$root$lib"
    done
}

while [ $# -gt 0 ]; do
    case "$1" in
    --bin)
        cp "$2" "$root/lab/bin/"
        copy_libs "$2"
        shift 2
        ;;
    --file)
        src=${2%%:*}
        dest=${2#*:}
        mkdir -p "$root$(dirname "$dest")"
        cp "$src" "$root$dest"
        shift 2
        ;;
    *)
        echo "build-initramfs: unknown argument $1" >&2
        exit 2
        ;;
    esac
done

(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1 >"$out.partial")
mv "$out.partial" "$out"
