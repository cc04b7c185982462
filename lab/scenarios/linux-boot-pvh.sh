# boot: any
# needs: tern linux-guest
# As linux-boot, but from the ELF vmlinux extracted from the same bzImage, entered through its PVH
# note.
. /lab/lib.sh
boot_linux_guest /lab/linux/vmlinux pvh
