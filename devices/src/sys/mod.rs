//! Thin wrappers over kernel uAPIs that the rust-vmm crates do not cover: one file per uAPI, `unsafe`
//! only here.
#![allow(unsafe_code)]
