//! The pickle of a PyTorch `pytorch_model.bin`: the input is `data.pkl`,
//! put back into the fixture's archive with the tensors' storage files and
//! right checksums, so that mutations reach the unpickler rather than stop
//! at the zip reader.
#![no_main]

use std::io::{Read, Write};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use segattn::model::Vit;
use segattn_fuzz::{check_model, fixture, scratch_file};
use zip::write::SimpleFileOptions;

/// The fixture archive's entries, `data.pkl` among them by name only.
fn entries() -> &'static [(String, Vec<u8>)] {
    static ENTRIES: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    ENTRIES.get_or_init(|| {
        let file = std::fs::File::open(fixture("dino_vit_pickle/pytorch_model.bin")).expect("fixture");
        let mut archive = zip::ZipArchive::new(file).expect("fixture archive");
        (0..archive.len())
            .map(|i| {
                let mut entry = archive.by_index(i).expect("fixture entry");
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).expect("fixture entry");
                (entry.name().expect("fixture entry name").to_string(), bytes)
            })
            .collect()
    })
}

fn archive_with(pickle: &[u8]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in entries() {
        zip.start_file(name.as_str(), stored).expect("in memory");
        zip.write_all(if name.ends_with("/data.pkl") { pickle } else { bytes }).expect("in memory");
    }
    zip.finish().expect("in memory").into_inner()
}

fuzz_target!(|pickle: &[u8]| {
    let path = scratch_file("pickle/pytorch_model.bin", &archive_with(pickle));
    if let Ok(model) = Vit::load(&path) {
        check_model(&model);
    }
});
