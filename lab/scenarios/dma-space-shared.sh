# boot: vtd
# needs: tern probe_edu
# One DMA space per VM, shared by its passthrough devices (as QEMU does): with both edu devices
# passed through, the probe kernel has each edu DMA RAM -> device -> RAM and raise its MSI — the
# second device works through the HWPT / container the first one set up — vm.info shows both in
# one IOAS on one HWPT (iommufd) or in one container (type1), and guest RAM is pinned once, not
# once per device (the process's VmPin for iommufd, VmLck for type1, against the RAM size).
. /lab/lib.sh
set -- $(edu_sysfs_all)
[ "$#" -ge 2 ] || { lab_log "need two edu devices, found $#"; exit 1; }
edu_a=$1 edu_b=$2
root=/tmp/dma-space-shared
mkdir -p "$root"
a=
trap 'kill $a 2>/dev/null' EXIT

# Usage: probe_both IOMMUFD — both devices DMA and interrupt under the probe kernel.
probe_both() {
    out=$root/probe-$1.log
    timeout -s KILL 180 tern --kernel /lab/probe/probe_edu.elf --memory 256M --serial stdout \
        --device "path=$edu_a,id=edu0,iommufd=$1" --device "path=$edu_b,id=edu1,iommufd=$1" \
        >"$out" 2>&1
    rc=$?
    cat "$out"
    [ "$rc" -eq 0 ] || { lab_log "iommufd=$1: tern exited with $rc"; return 1; }
    n=$(grep -c 'EDU: dma ok' "$out")
    m=$(grep -c 'EDU: msi ok' "$out")
    if [ "${n:-0}" -ne 2 ] || [ "${m:-0}" -ne 2 ]; then
        lab_log "iommufd=$1: want DMA and MSI verified on both devices, got ${n:-0} dma ok, ${m:-0} msi ok"
        return 1
    fi
}

# Usage: kib_of FIELD PID — the /proc/PID/status field in KiB (one number, or nothing).
kib_of() {
    sed -n "s/^$1:[[:space:]]*\([0-9][0-9]*\) kB$/\1/p" "/proc/$2/status"
}

# Usage: shared_space IOMMUFD PINFIELD — one space in vm.info, RAM pinned once.
shared_space() {
    d=$root/info-$1
    rm -rf "$d"
    mkdir -p "$d"
    ram_mib=128
    timeout -s KILL 120 tern --api-socket "$d/a.sock" --serial "file=$d/a.log" \
        --guest demo,mib=8 --memory ${ram_mib}M \
        --device "path=$edu_a,id=edu0,iommufd=$1" --device "path=$edu_b,id=edu1,iommufd=$1" \
        2>"$d/a.err" &
    a=$!
    wait_socket "$d/a.sock" || return 1
    wait_progress "$d/a.log" 0 || return 1
    ternctl --api-socket "$d/a.sock" info >"$d/info" || return 1
    pinned=$(kib_of "$2" "$a")
    cat "$d/info"
    ternctl --api-socket "$d/a.sock" shutdown-vmm || { lab_log "shutdown-vmm failed"; return 1; }
    wait_tern a tern "$d/a.err" || return 1
    # Both devices list both ids in their dma_domain.
    listed=$(grep -c '^ *"edu[01]",\{0,1\}$' "$d/info")
    [ "${listed:-0}" -eq 4 ] || { lab_log "iommufd=$1: dma_domain does not list both devices for both ($listed entries)"; return 1; }
    if [ "$1" = on ]; then
        ioas=$(grep -o '"ioas": [0-9]*' "$d/info" | sort -u | wc -l)
        hwpt_lines=$(grep -c '"hwpt": [0-9]' "$d/info")
        hwpts=$(grep -o '"hwpt": [0-9]*' "$d/info" | sort -u | wc -l)
        if [ "$ioas" -ne 1 ] || [ "${hwpt_lines:-0}" -ne 2 ] || [ "$hwpts" -ne 1 ]; then
            lab_log "iommufd: want both devices in one IOAS on one HWPT; distinct IOAS $ioas, HWPT entries ${hwpt_lines:-0}, distinct $hwpts"
            return 1
        fi
    else
        [ "$(grep -c '"backend": "type1"' "$d/info")" -eq 2 ] ||
            { lab_log "type1: want two dma_domain entries with backend type1"; return 1; }
    fi
    ram_kib=$((ram_mib * 1024))
    [ -n "$pinned" ] || { lab_log "no $2 line in /proc/$a/status"; return 1; }
    lab_log "iommufd=$1: $2 ${pinned} kB for ${ram_kib} kB of guest RAM and two devices"
    # Once: at least the RAM (it is all mapped and pinned) and less than twice it.
    if [ "$pinned" -lt "$ram_kib" ] || [ "$pinned" -ge $((ram_kib * 2)) ]; then
        lab_log "iommufd=$1: guest RAM is not pinned exactly once ($2 $pinned kB)"
        return 1
    fi
}

probe_both on || exit 1
probe_both off || exit 1
shared_space on VmPin || exit 1
shared_space off VmLck || exit 1
lab_log "two edu devices share one DMA space (iommufd: one IOAS, one HWPT; type1: one container); RAM pinned once; DMA and MSI verified on both"
