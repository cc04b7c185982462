# boot: any
# needs: vmm_dirty_tracking
# tern's KVM dirty sources (dirty log with KVM_CLEAR_DIRTY_LOG, get-and-clear, dirty ring) on the lab
# kernel's real KVM (nested SVM), not only on the host's PVM: every test of vmm/tests/dirty_tracking.rs,
# the lab-only ones included.
. /lab/lib.sh
RUST_TEST_SELECT=--include-ignored run_rust_tests /lab/bin/dirty_tracking 17
