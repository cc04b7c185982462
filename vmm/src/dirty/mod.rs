//! The VMM's dirty-page sources for migration: KVM's dirty log (manual clear) and dirty ring.
