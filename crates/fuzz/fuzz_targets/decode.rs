//! Image decoding as `segattn run` does it by default (strict: a damaged
//! file is an error), then the resize to the model's input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use segattn::image_io::{self, Decoding};
use segattn::preprocess;

/// Small, so that a header claiming a huge picture is refused rather than
/// allocated: the limit is what is under test, not the machine's memory.
const MAX_PIXELS: u64 = 1 << 20;

fuzz_target!(|bytes: &[u8]| {
    let Ok(photo) = image_io::decode(bytes, Decoding::strict(MAX_PIXELS)) else {
        return;
    };
    assert!(u64::from(photo.width()) * u64::from(photo.height()) <= MAX_PIXELS);
    if let Ok(pixels) = preprocess::model_input(&photo, 32, 16) {
        let dims = pixels.dims().to_vec();
        assert!(dims[2] % 16 == 0 && dims[3] % 16 == 0, "input {dims:?} is not whole patches");
    }
});
