//! A file of laid-out weights kept between runs (the panel cache): its
//! header, offsets and layout names. Weights it hands back are multiplied
//! with, as the encoder would, so a layout that points outside the file
//! shows up here and not in a user's run.
#![no_main]

use libfuzzer_sys::fuzz_target;
use segattn::fnv::fnv1a_64;
use segattn::model::{PanelCache, Precision};
use segattn_fuzz::{scratch, scratch_file};

/// The key the seed files were written under.
const KEY: &str = "fuzz";

fuzz_target!(|bytes: &[u8]| {
    scratch_file(&format!("panels/{:016x}.panels", fnv1a_64(KEY.bytes())), bytes);
    let cache = PanelCache::new(scratch().join("panels"));
    for (_, weight) in cache.read(KEY, Precision::F32).into_iter().flatten() {
        let (_, inputs) = weight.shape();
        let x = vec![1.0; inputs * 3];
        segattn_kernels::matmul(&x, &weight).expect("the shapes it was read with");
    }
});
