# boot: mock
# needs: lab_hwpt_bench
# What IOMMU_HWPT_GET_DIRTY_BITMAP costs per GiB mapped, on the iommufd selftest mock IOMMU (TCG:
# relative numbers only): prints one `HWPT-BENCH dirty=.. read=.. mode=.. ms_per_gib=..` line per
# cell and fails only if a bitmap is wrong. Also checks the selftest access object (MockAccess).
. /lab/lib.sh
run_rust_tests /lab/bin/lab_hwpt_bench 2 mock_
