//! The `size`/`argsz` field every extensible VFIO and iommufd ioctl argument starts with.

use std::mem::size_of;

/// `size_of::<T>()` as the `u32` the kernel's `size`/`argsz` fields hold.
pub fn argsz<T>() -> u32 {
    u32::try_from(size_of::<T>()).expect("uAPI argument structs are far smaller than 4 GiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argsz_is_the_struct_size() {
        assert_eq!(argsz::<[u64; 9]>(), 72);
    }
}
