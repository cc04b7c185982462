# boot: any
# needs: lab_vfio_migration
# tern's VFIO migration v2 device-state layer on the kernel's mtty sample (both boots create the
# two mtty-2 instances of MTTY_UUIDS): capabilities, PRE_COPY + STOP_COPY of one instance's UART
# state into the other, the P2P switchover path, a corrupt stream refused and the device reset,
# and a negative check that the destination state is exactly what the stream carried.
. /lab/lib.sh
run_rust_tests /lab/bin/lab_vfio_migration 5 --nocapture mtty_
