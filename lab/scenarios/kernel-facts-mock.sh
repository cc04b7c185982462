# boot: mock
# needs: lab_kernel_facts
# Kernel facts of iommufd hardware dirty tracking, on the iommufd selftest mock IOMMU: the
# capability is reported, and GET_DIRTY_BITMAP returns exactly the bits IOMMU_TEST_OP_DIRTY set.
. /lab/lib.sh
run_rust_tests /lab/bin/lab_kernel_facts 4 mock_ mtty_
