//! Weights laid out for the kernels, kept on disk between runs and mapped
//! back in. Laying out a ViT-S's 87 MB of f32 weights means writing as much
//! fresh memory, and the page faults of that cost more than the layout;
//! a mapped file's pages come from the page cache instead, shared by every
//! process that maps it.
//!
//! A file is named after its key: the checkpoint's path and identity
//! (device, inode, size, modification time), the precision and segattn's
//! version, so a changed checkpoint or a new segattn never reads an old
//! layout. Each weight also names the kernel layout it holds, which must be
//! the one this CPU runs now, and a checksum over all of it is verified on
//! every read. Anything that does not match is not used: the weights are
//! laid out from the checkpoint again and the file is replaced. The eight
//! files written last are kept.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::fused::{PackedWeight, Precision};
use crate::fnv::fnv1a_64;

const MAGIC: &[u8; 16] = b"segattn panels\0\x02";
/// Values start at a multiple of this many bytes, for the vector loads.
const ALIGN: usize = 64;
/// Files kept: writing one more removes the oldest written.
const KEEP: usize = 8;

/// A directory of laid-out weights.
#[derive(Debug, Clone)]
pub struct PanelCache {
    dir: PathBuf,
    min_bytes: usize,
}

#[derive(Serialize, Deserialize)]
struct Header {
    key: String,
    checksum: String,
    weights: Vec<StoredWeight>,
}

#[derive(Serialize, Deserialize)]
struct StoredWeight {
    /// The checkpoint's name for it, which loading asks for it by.
    name: String,
    outputs: usize,
    inputs: usize,
    layout: String,
    start: usize,
}

/// A mapped file's values, for the weights that point into it.
struct MappedValues {
    map: memmap2::Mmap,
    offset: usize,
}

impl AsRef<[f32]> for MappedValues {
    fn as_ref(&self) -> &[f32] {
        // SAFETY: every bit pattern is an f32; `read` checked that the
        // values are aligned and whole, and the map is never written.
        let (before, values, _) = unsafe { self.map[self.offset..].align_to::<f32>() };
        debug_assert!(before.is_empty());
        values
    }
}

impl PanelCache {
    /// Weights of at least 4 MiB laid out, in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, min_bytes: 4 << 20 }
    }

    /// Keeps models of any size, small test models too.
    pub fn keeping_any_size(self) -> Self {
        Self { min_bytes: 0, ..self }
    }

    /// `SEGATTN_CACHE_DIR`, else `$XDG_CACHE_HOME/segattn`, else
    /// `~/.cache/segattn`; none when `SEGATTN_CACHE=off` or no home is known.
    pub fn from_env() -> Option<Self> {
        if std::env::var_os("SEGATTN_CACHE").is_some_and(|v| v == "off") {
            return None;
        }
        let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        let dir = non_empty("SEGATTN_CACHE_DIR")
            .or_else(|| non_empty("XDG_CACHE_HOME").map(|d| d.join("segattn")))
            .or_else(|| non_empty("HOME").map(|d| d.join(".cache").join("segattn")))?;
        Some(Self::new(dir))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key of `weights` (a checkpoint file) laid out in `precision`;
    /// none for a file whose identity cannot be read.
    #[cfg(unix)]
    pub fn key(&self, weights: &Path, precision: Precision) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let path = weights.canonicalize().ok()?;
        let meta = std::fs::metadata(&path).ok()?;
        let identity = format!("{}:{}:{}:{}.{}", meta.dev(), meta.ino(), meta.len(), meta.mtime(), meta.mtime_nsec());
        Some(format!("segattn {}\n{}\n{identity}\n{precision:?}", env!("CARGO_PKG_VERSION"), path.display()))
    }

    /// Without a device and inode to tell a replaced file by, nothing is kept.
    #[cfg(not(unix))]
    pub fn key(&self, _: &Path, _: Precision) -> Option<String> {
        None
    }

    fn file(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{:016x}.panels", fnv1a_64(key.bytes())))
    }

    /// The weights stored under `key`, by name, if the file is there,
    /// whole, and laid out for this CPU's kernels.
    pub fn read(&self, key: &str, precision: Precision) -> Option<Vec<(String, PackedWeight)>> {
        self.try_read(key, precision).ok()
    }

    fn try_read(&self, key: &str, precision: Precision) -> Result<Vec<(String, PackedWeight)>> {
        let file = std::fs::File::open(self.file(key))?;
        // SAFETY: mapped read-only; a file replaced while mapped stays as it
        // was (replacement is a rename), and one truncated in place would
        // fail the checksum's reads no worse than any mmap reader.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        if map.len() < 24 || &map[..16] != MAGIC || cfg!(target_endian = "big") {
            bail!("not a panel file");
        }
        let header_end = usize::try_from(u64::from_le_bytes(map[16..24].try_into()?))
            .ok()
            .and_then(|len| len.checked_add(24))
            .filter(|&end| end <= map.len())
            .context("short")?;
        let header: Header = serde_json::from_slice(&map[24..header_end])?;
        let offset = header_end.next_multiple_of(ALIGN);
        if header.key != key || offset > map.len() || !(map.len() - offset).is_multiple_of(4) {
            bail!("another key, or a broken file");
        }
        let values: Arc<dyn AsRef<[f32]> + Send + Sync> = Arc::new(MappedValues { map, offset });
        let weights = header.weights.into_iter().map(|w| {
            let weight = PackedWeight::from_panels(precision, w.outputs, w.inputs, &w.layout, values.clone(), w.start);
            weight.map(|weight| (w.name, weight))
        });
        let weights = weights.collect::<Result<Vec<_>, _>>()?;
        let parts: Vec<&[u8]> = weights.iter().map(|(_, w)| bytes_of(w.panels())).collect();
        if checksum(&parts) != header.checksum {
            bail!("checksum");
        }
        Ok(weights)
    }

    /// Stores `weights`, each under its name, under `key`, replacing what
    /// was there, if they are big enough to be worth it. A cache that cannot
    /// be written is no cache; the caller goes on.
    pub fn write(&self, key: &str, weights: &[(String, PackedWeight)]) -> Result<()> {
        let total: usize = weights.iter().map(|(_, w)| w.panels().len()).sum();
        if total * 4 < self.min_bytes || cfg!(target_endian = "big") {
            return Ok(());
        }
        // On a little-endian machine an f32 slice is its file bytes already.
        let parts: Vec<&[u8]> = weights.iter().map(|(_, w)| bytes_of(w.panels())).collect();
        let mut stored = Vec::with_capacity(weights.len());
        let mut start = 0;
        for (name, weight) in weights {
            let (outputs, inputs) = weight.shape();
            stored.push(StoredWeight { name: name.clone(), outputs, inputs, layout: weight.layout_name(), start });
            start += weight.panels().len();
        }
        let header = Header { key: key.to_string(), checksum: checksum(&parts), weights: stored };
        let header = serde_json::to_vec(&header)?;
        let padding = (24 + header.len()).next_multiple_of(ALIGN) - (24 + header.len());
        std::fs::create_dir_all(&self.dir)?;
        let mut file = std::io::BufWriter::new(tempfile::NamedTempFile::new_in(&self.dir)?);
        file.write_all(MAGIC)?;
        file.write_all(&(header.len() as u64).to_le_bytes())?;
        file.write_all(&header)?;
        file.write_all(&vec![0; padding])?;
        for part in &parts {
            file.write_all(part)?;
        }
        file.into_inner()?.persist(self.file(key))?;
        self.remove_all_but_newest(KEEP);
        Ok(())
    }

    /// Bounds the cache's size: every checkpoint or version seen leaves a
    /// file, so only the `keep` written last stay. A temporary file of a
    /// write that was interrupted (by a signal, say) goes after ten minutes.
    fn remove_all_but_newest(&self, keep: usize) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
            .filter_map(|entry| {
                let entry = entry.ok()?;
                // tempfile's names, for a write a signal cut short.
                if crate::temp_files::remove_if_stale(&entry, |name| name.starts_with(".tmp")) {
                    return None;
                }
                let meta = entry.metadata().ok()?;
                let path = entry.path();
                let ours = meta.is_file() && path.extension().is_some_and(|e| e == "panels");
                ours.then_some((meta.modified().ok()?, path))
            })
            .collect();
        files.sort();
        for (_, path) in files.iter().rev().skip(keep) {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn bytes_of(values: &[f32]) -> &[u8] {
    // SAFETY: any f32 is 4 initialized bytes, and u8 has no alignment.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), std::mem::size_of_val(values)) }
}

/// Fletcher-style sums (a running sum and the sum of running sums) over
/// 8-byte words of each part, a megabyte at a time in parallel, then FNV-1a
/// over all of those: a change of any byte, or a swap of two words, changes it.
fn checksum(parts: &[&[u8]]) -> String {
    let chunks: Vec<&[u8]> = parts.iter().flat_map(|part| part.chunks(1 << 20)).collect();
    let sums: Vec<u64> = chunks
        .par_iter()
        .flat_map_iter(|chunk| {
            let (mut a, mut b) = ([0u64; 8], [0u64; 8]);
            let mut words = chunk.chunks_exact(64);
            for block in words.by_ref() {
                for lane in 0..8 {
                    let word = u64::from_le_bytes(block[8 * lane..8 * lane + 8].try_into().expect("8 bytes"));
                    a[lane] = a[lane].wrapping_add(word);
                    b[lane] = b[lane].wrapping_add(a[lane]);
                }
            }
            let tail = fnv1a_64(words.remainder().iter().copied());
            a.into_iter().chain(b).chain([tail, chunk.len() as u64]).collect::<Vec<_>>()
        })
        .collect();
    format!("{:016x}", fnv1a_64(sums.iter().flat_map(|s| s.to_le_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight(seed: usize) -> (String, PackedWeight) {
        let values: Vec<f32> = (0..6 * 5).map(|i| (i * seed) as f32 * 0.1).collect();
        (format!("layer{seed}.weight"), PackedWeight::new(Precision::F32, &values, 6, 5).unwrap())
    }

    #[test]
    fn weights_come_back_under_their_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PanelCache::new(dir.path().to_path_buf()).keeping_any_size();
        let (a, b) = (weight(1), weight(2));
        cache.write("one", &[a.clone(), b.clone()]).unwrap();
        let read = cache.read("one", Precision::F32).unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!((&read[0].0, &read[1].0), (&a.0, &b.0));
        assert_eq!((read[0].1.panels(), read[1].1.panels()), (a.1.panels(), b.1.panels()));
        assert_eq!(read[1].1.shape(), (6, 5));
        assert!(cache.read("two", Precision::F32).is_none());
    }

    #[test]
    fn only_the_files_written_last_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PanelCache::new(dir.path().to_path_buf()).keeping_any_size();
        let keys: Vec<String> = (0..KEEP + 3).map(|i| format!("key {i}")).collect();
        for key in &keys {
            cache.write(key, &[weight(3)]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let kept: Vec<bool> = keys.iter().map(|key| cache.read(key, Precision::F32).is_some()).collect();
        assert_eq!(kept, [vec![false; 3], vec![true; KEEP]].concat());
    }

    /// Sizes and offsets in a file are not trusted: past the file, or past
    /// what a usize holds, they make the file unreadable, never a panic.
    #[test]
    fn sizes_past_the_file_or_past_usize_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PanelCache::new(dir.path().to_path_buf()).keeping_any_size();
        let (name, a) = weight(1);
        cache.write("k", &[(name.clone(), a.clone())]).unwrap();
        let path = cache.file("k");
        let good = std::fs::read(&path).unwrap();
        let layout = a.layout_name();
        let mut files = Vec::new();
        for header_len in [u64::MAX, u64::MAX - 23, good.len() as u64] {
            files.push([&good[..16], &header_len.to_le_bytes(), &good[24..]].concat());
        }
        for (outputs, inputs, start) in [(6, 5, usize::MAX), (usize::MAX, usize::MAX, 0), (6, usize::MAX, 1)] {
            let weights = vec![StoredWeight { name: name.clone(), outputs, inputs, layout: layout.clone(), start }];
            let header = serde_json::to_vec(&Header { key: "k".into(), checksum: String::new(), weights }).unwrap();
            let offset = (24 + header.len()).next_multiple_of(ALIGN);
            let mut file = [&MAGIC[..], &(header.len() as u64).to_le_bytes(), &header].concat();
            file.resize(offset, 0);
            file.extend(bytes_of(a.panels()));
            files.push(file);
        }
        for file in files {
            std::fs::write(&path, file).unwrap();
            assert!(cache.read("k", Precision::F32).is_none());
        }
    }

    #[test]
    fn small_weights_are_not_worth_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PanelCache::new(dir.path().to_path_buf());
        cache.write("small", &[weight(1)]).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
