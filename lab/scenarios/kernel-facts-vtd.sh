# boot: vtd
# needs: lab_kernel_facts
# Kernel facts behind tern's dirty-tracking backend choice, on emulated VT-d with edu bound to
# vfio-pci: type1 reports every mapped page dirty; VT-d has no dirty tracking; mtty migrates.
. /lab/lib.sh
run_rust_tests /lab/bin/lab_kernel_facts 4 vtd_ mtty_
