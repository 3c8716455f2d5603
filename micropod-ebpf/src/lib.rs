//! Empty library target: lets `micropod` build-depend on this crate so cargo rebuilds it when
//! the crate's dependencies change (the programs themselves are in the `micropod` bin target).
#![no_std]
