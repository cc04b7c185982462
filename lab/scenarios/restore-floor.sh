# boot: any
# needs: lab_restore_floor
# The floor of a live update's downtime on the lab's nested KVM under TCG: the bare ioctls of
# tern's vCPU/VM state save and restore (one vCPU), a device's MSI route + irqfd, how long a
# kicked vCPU takes to leave KVM_RUN, one thread wake-up; first run and median of 15, one
# `RESTORE-FLOOR` line each (devices/tests/lab_restore_floor.rs; the host runs the same test with
# `cargo test -p tern-devices --test lab_restore_floor -- --ignored --nocapture`). Numbers only.
. /lab/lib.sh
run_rust_tests /lab/bin/lab_restore_floor 1 restore_floor
