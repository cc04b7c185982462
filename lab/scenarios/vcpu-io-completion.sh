# boot: any
# needs: vmm_io_completion
# A vCPU paused right after a port I/O exit has the instruction completed before its state is read
# (vmm/tests/io_completion.rs), on the lab kernel's real KVM (nested SVM): there an OUT, not only an
# IN, is left pending by KVM until the next KVM_RUN — this host's PVM emulator finishes an OUT
# before its exit, so only here can the OUT case fail.
. /lab/lib.sh
RUST_TEST_SELECT=--include-ignored run_rust_tests /lab/bin/io_completion 2
