# boot: any
# needs: tern linux-guest
# tern boots Debian's cloud kernel (bzImage) with a tiny initramfs on nested KVM; the guest's init
# prints its command line and powers off.
. /lab/lib.sh
boot_linux_guest /lab/linux/vmlinuz bzimage
