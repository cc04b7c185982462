# boot: vtd
# needs: lab_dma_dirty
# tern's DMA dirty sources against the real kernel: the type1 source reports every mapped page of
# edu (vfio-pci) on every claim and none for an mtty mdev; the DMA-logging source starts, reports
# nothing and stops on mtty; DMA logging is offered by mtty and not by plain vfio-pci.
. /lab/lib.sh
run_rust_tests /lab/bin/lab_dma_dirty 3 vtd_ mtty_
