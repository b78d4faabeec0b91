//! Finding a checkpoint on disk and reading its tensors under whichever of
//! the published naming schemes it uses.
//!
//! Four schemes are in circulation for the same architecture:
//! Hugging Face `ViTModel` / `Dinov2Model` as published (transformers 4.x),
//! the names transformers >= 5 writes (`q_proj`, `layers.N`, ...), and the
//! torch-hub names of the original DINO / DINOv2 repositories (fused `qkv`).
//! [`Layout`] resolves each role of a block to the name this file uses.
//! Weights are read from safetensors (memory-mapped) or, for repositories
//! that never converted, from a PyTorch `pytorch_model.bin` / `.pth` archive.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use candle_core::safetensors::{Load, MmapedSafetensors, SliceSafetensors};
use candle_core::{DType, Device, Tensor};

use super::torch_archive::TorchArchive;

/// Where the weights (and optionally their `config.json`) live.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// The checkpoint file; for a model compiled into the binary, the name
    /// messages call it by.
    pub weights: PathBuf,
    pub config: Option<PathBuf>,
    /// Compiled into the binary: `weights` names no file.
    pub embedded: bool,
}

impl ModelFiles {
    /// A model compiled into the binary, called `name` in messages.
    pub fn embedded(name: &str) -> Self {
        Self { weights: name.into(), config: None, embedded: true }
    }

    /// The files on disk the model was read from: none for an embedded one.
    pub fn on_disk(&self) -> Vec<&Path> {
        let weights = (!self.embedded).then_some(self.weights.as_path());
        weights.into_iter().chain(self.config.as_deref()).collect()
    }

    /// `path` is a checkpoint file or a directory holding `model.safetensors`
    /// (or, failing that, `pytorch_model.bin`), as a Hugging Face snapshot does.
    pub fn locate(path: &Path) -> Result<Self> {
        let (weights, dir) = if path.is_dir() {
            let weights = WEIGHT_FILES.iter().map(|name| path.join(name)).find(|p| p.is_file()).ok_or_else(|| {
                anyhow!("{}: no model.safetensors or pytorch_model.bin in this directory", path.display())
            })?;
            (weights, path.to_path_buf())
        } else if path.is_file() {
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            (path.to_path_buf(), dir)
        } else {
            bail!("{}: no such file or directory", path.display());
        };
        let config = Some(dir.join("config.json")).filter(|p| p.is_file());
        Ok(Self { weights, config, embedded: false })
    }
}

/// The weight files of a Hugging Face model repository, in order of preference.
pub const WEIGHT_FILES: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];

const PREFIXES: [&str; 5] = ["", "model.", "vit.", "dinov2.", "backbone."];
const HF_PATCH: &str = "embeddings.patch_embeddings.projection";
const HUB_PATCH: &str = "patch_embed.proj";
/// Safetensors metadata key holding a `config.json`, for a model that is one file.
pub const CONFIG_METADATA_KEY: &str = "config";

/// Names of a checkpoint that no encoder tensor maps to, and that are fine to carry.
fn is_ignorable(name: &str) -> bool {
    name.starts_with("pooler.") || name.ends_with("mask_token")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// Hugging Face `embeddings.*` / `encoder.layer.N.*` (4.x) or `layers.N.*` (5.x).
    HuggingFace,
    /// The original repositories: `pos_embed`, `blocks.N.attn.qkv`, ...
    TorchHub,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvNames {
    Separate([&'static str; 3]),
    Fused(&'static str),
}

/// The name each tensor role has in one checkpoint (without its prefix).
#[derive(Debug, Clone)]
pub struct Layout {
    pub naming: Naming,
    pub cls_token: &'static str,
    pub pos_embed: &'static str,
    pub register_tokens: &'static str,
    pub patch_embed: &'static str,
    /// Convolutions before the patch projection, `{stem}.{i}` (segattn's own model).
    pub stem: &'static str,
    pub final_norm: &'static str,
    pub block_prefix: &'static str,
    pub norm1: &'static str,
    pub norm2: &'static str,
    pub qkv: QkvNames,
    pub attn_out: &'static str,
    pub fc1: &'static str,
    pub fc2: &'static str,
    pub layer_scale: [&'static str; 2],
}

impl Layout {
    pub fn block(&self, index: usize, role: &str) -> String {
        format!("{}{index}.{role}", self.block_prefix)
    }
}

/// Every format reads a tensor only when asked for it.
enum Tensors {
    Safetensors(MmapedSafetensors),
    /// A safetensors file compiled into the binary.
    Embedded(SliceSafetensors<'static>),
    Pickle(TorchArchive),
}

impl Tensors {
    fn open(path: &Path) -> Result<Self> {
        // PyTorch >= 1.6 saves a zip archive; safetensors starts with a header length.
        let mut magic = [0u8; 4];
        let is_zip = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok_and(|()| magic == *b"PK\x03\x04");
        let pickle_name = path.extension().is_some_and(|e| ["bin", "pth", "pt"].iter().any(|x| e == *x));
        if is_zip || pickle_name {
            let tensors = TorchArchive::open(path)
                .map_err(|e| anyhow!("{}: not a readable PyTorch checkpoint: {e:#}", path.display()))?;
            return Ok(Self::Pickle(tensors));
        }
        // SAFETY: the file is mapped read-only; like every mmap reader we rely
        // on nobody truncating the checkpoint while it is in use.
        let tensors = unsafe { MmapedSafetensors::new(path) }
            .map_err(|e| anyhow!("{}: not a readable safetensors file: {}", path.display(), root_cause(&e)))?;
        Ok(Self::Safetensors(tensors))
    }

    fn names(&self) -> BTreeSet<String> {
        match self {
            Self::Safetensors(t) => t.tensors().into_iter().map(|(name, _)| name).collect(),
            Self::Embedded(t) => t.tensors().into_iter().map(|(name, _)| name).collect(),
            Self::Pickle(t) => t.tensors().keys().cloned().collect(),
        }
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match self {
            Self::Safetensors(t) => t.get(name).ok().map(|v| v.shape().to_vec()),
            Self::Embedded(t) => t.get(name).ok().map(|v| v.shape().to_vec()),
            Self::Pickle(t) => t.tensors().get(name).map(|info| info.shape.clone()),
        }
    }

    fn dtype(&self, name: &str) -> Option<DType> {
        match self {
            Self::Safetensors(t) => t.get(name).ok().and_then(|v| DType::try_from(v.dtype()).ok()),
            Self::Embedded(t) => t.get(name).ok().and_then(|v| DType::try_from(v.dtype()).ok()),
            Self::Pickle(t) => t.tensors().get(name).and_then(|info| info.dtype),
        }
    }

    /// A tensor in CPU memory: the fused kernels are CPU code.
    fn load(&self, name: &str) -> Result<Tensor> {
        Ok(match self {
            Self::Safetensors(t) => t.get(name)?.load(&Device::Cpu)?,
            Self::Embedded(t) => t.load(name, &Device::Cpu)?,
            Self::Pickle(t) => t.load(name)?,
        })
    }
}

/// A float tensor's values as a safetensors file stores them (little-endian),
/// read in place.
#[derive(Clone, Copy)]
pub enum StoredValues<'a> {
    F32(&'a [u8]),
    F16(&'a [u8]),
    BF16(&'a [u8]),
}

impl StoredValues<'_> {
    /// Fills `into` with the values from index `first` on, as f32.
    pub fn read(&self, first: usize, into: &mut [f32]) {
        let len = into.len();
        match self {
            Self::F32(bytes) => match Self::aligned_f32s(bytes) {
                Some(values) => into.copy_from_slice(&values[first..first + len]),
                None => {
                    let bytes = bytes[4 * first..4 * (first + len)].chunks_exact(4);
                    into.iter_mut().zip(bytes).for_each(|(v, b)| *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                }
            },
            Self::F16(bytes) => {
                let halves = bytes[2 * first..2 * (first + len)].chunks_exact(2);
                into.iter_mut().zip(halves).for_each(|(v, b)| *v = half::f16::from_le_bytes([b[0], b[1]]).to_f32());
            }
            Self::BF16(bytes) => {
                let halves = bytes[2 * first..2 * (first + len)].chunks_exact(2);
                into.iter_mut()
                    .zip(halves)
                    .for_each(|(v, b)| *v = f32::from_bits(u32::from(b[1]) << 24 | u32::from(b[0]) << 16));
            }
        }
    }

    /// `bytes` as `f32`s in place, when they are aligned for it (safetensors
    /// pads its header to 8 bytes, so most are).
    fn aligned_f32s(bytes: &[u8]) -> Option<&[f32]> {
        if cfg!(target_endian = "big") {
            return None;
        }
        // SAFETY: every bit pattern is a valid f32, and `align_to` returns
        // only the part of `bytes` that is aligned for one.
        let (before, values, after) = unsafe { bytes.align_to::<f32>() };
        (before.is_empty() && after.is_empty()).then_some(values)
    }
}

/// A tensor's values, where they lie or loaded.
pub enum StoredRows<'a> {
    InPlace(StoredValues<'a>),
    Loaded(Vec<f32>),
}

impl StoredRows<'_> {
    /// Fills `into` with the values from index `first` on, as f32.
    pub fn read(&self, first: usize, into: &mut [f32]) {
        match self {
            Self::InPlace(values) => values.read(first, into),
            Self::Loaded(values) => into.copy_from_slice(&values[first..first + into.len()]),
        }
    }
}

/// A checkpoint file, read through the prefix its names carry.
pub struct TensorStore {
    path: PathBuf,
    tensors: Tensors,
    names: BTreeSet<String>,
    prefix: &'static str,
    metadata: HashMap<String, String>,
}

impl TensorStore {
    pub fn open(path: &Path) -> Result<Self> {
        let tensors = Tensors::open(path)?;
        let metadata = match tensors {
            Tensors::Safetensors(_) => safetensors_metadata(&map_file(path)?)
                .map_err(|e| anyhow!("{}: not a readable safetensors file: {e}", path.display()))?,
            _ => HashMap::new(),
        };
        Self::new(path.to_path_buf(), tensors, metadata)
    }

    /// A safetensors file held in memory for the life of the program, named
    /// `name` in messages.
    pub fn embedded(name: &str, bytes: &'static [u8]) -> Result<Self> {
        let tensors =
            SliceSafetensors::new(bytes).map_err(|e| anyhow!("{name}: not a readable safetensors file: {e}"))?;
        let metadata =
            safetensors_metadata(bytes).map_err(|e| anyhow!("{name}: not a readable safetensors file: {e}"))?;
        Self::new(PathBuf::from(name), Tensors::Embedded(tensors), metadata)
    }

    fn new(path: PathBuf, tensors: Tensors, metadata: HashMap<String, String>) -> Result<Self> {
        let names = tensors.names();
        let prefix = PREFIXES
            .iter()
            .find(|p| [HF_PATCH, HUB_PATCH].iter().any(|n| names.contains(&format!("{p}{n}.weight"))))
            .ok_or_else(|| {
                anyhow!(
                    "{}: not a ViT checkpoint: no `{HF_PATCH}.weight` or `{HUB_PATCH}.weight` \
                     (optionally under model./vit./dinov2./backbone.); it holds {}",
                    path.display(),
                    list_some(names.iter())
                )
            })?;
        Ok(Self { path, tensors, names, prefix, metadata })
    }

    /// The safetensors `__metadata__` entry `key`.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn has(&self, name: &str) -> bool {
        self.names.contains(&format!("{}{name}", self.prefix))
    }

    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.shape(&format!("{}{name}", self.prefix))
    }

    /// Names under this checkpoint's prefix, with the prefix removed.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().filter_map(|n| n.strip_prefix(self.prefix))
    }

    /// Fails unless `name` is there, has `shape` and holds floats.
    pub fn check(&self, name: &str, shape: &[usize]) -> Result<()> {
        self.checked(name, shape).map(drop)
    }

    /// `name` with this checkpoint's prefix, checked to have `shape` and to
    /// hold floats.
    fn checked(&self, name: &str, shape: &[usize]) -> Result<String> {
        let full = format!("{}{name}", self.prefix);
        let actual =
            self.tensors.shape(&full).ok_or_else(|| anyhow!("{}: missing tensor `{full}`", self.path.display()))?;
        if actual != shape {
            bail!("{}: tensor `{full}` has shape {:?}, expected {:?}", self.path.display(), actual, shape);
        }
        match self.tensors.dtype(&full) {
            _ if self.holds_floats(name) => Ok(full),
            dtype => bail!(
                "{}: tensor `{full}` has dtype {}, expected a float type (F32, F16, BF16)",
                self.path.display(),
                dtype.map_or("unknown to candle".to_string(), |d| format!("{d:?}").to_uppercase())
            ),
        }
    }

    /// Loads `name` as f32, checking its shape, that it holds floats, and
    /// that they are all finite.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = self.checked(name, shape)?;
        let tensor = self
            .tensors
            .load(&full)
            .and_then(|t| Ok(t.to_dtype(DType::F32)?))
            .with_context(|| format!("{}: cannot read tensor `{full}`", self.path.display()))?;
        // One NaN or infinity anywhere makes every output NaN: a broken
        // checkpoint, not a mask. The sum is infinite or NaN exactly then
        // (finite weights summing past f32's 3e38 do not occur).
        let sum = tensor.sum_all().and_then(|s| s.to_scalar::<f32>())?;
        if !sum.is_finite() {
            // Finite values can still overflow the sum: those are too large
            // to compute with, which is a different fault to report.
            let values = tensor.flatten_all().and_then(|t| t.to_vec1::<f32>())?;
            if values.iter().all(|v| v.is_finite()) {
                let largest = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                bail!(
                    "{}: tensor `{}{name}` holds values as large as {largest:e}, beyond what f32 arithmetic \
                     survives (a damaged or mis-scaled checkpoint)",
                    self.path.display(),
                    self.prefix
                );
            }
            bail!("{}", self.not_finite(name));
        }
        Ok(tensor)
    }

    /// `name`'s values, its shape and type checked: read in place from the
    /// file's bytes where the format allows (safetensors in f32, f16 or
    /// bf16), their finiteness then the reader's, in its pass; else loaded
    /// as [`TensorStore::tensor`] loads them.
    pub fn rows(&self, name: &str, shape: &[usize]) -> Result<StoredRows<'_>> {
        let full = self.checked(name, shape)?;
        let view = match &self.tensors {
            Tensors::Safetensors(t) => Some(t.get(&full)),
            Tensors::Embedded(t) => Some(t.get(&full)),
            Tensors::Pickle(_) => None,
        };
        let view = view.transpose().with_context(|| format!("{}: cannot read tensor `{full}`", self.path.display()))?;
        let in_place = view.and_then(|view| match view.dtype() {
            safetensors::Dtype::F32 => Some(StoredValues::F32(view.data())),
            safetensors::Dtype::F16 => Some(StoredValues::F16(view.data())),
            safetensors::Dtype::BF16 => Some(StoredValues::BF16(view.data())),
            _ => None,
        });
        Ok(match in_place {
            Some(values) => StoredRows::InPlace(values),
            None => StoredRows::Loaded(self.tensor(name, shape)?.flatten_all()?.to_vec1()?),
        })
    }

    /// Whether `name` holds floating-point values (not a buffer of integers).
    pub fn holds_floats(&self, name: &str) -> bool {
        let full = format!("{}{name}", self.prefix);
        matches!(self.tensors.dtype(&full), Some(DType::F32 | DType::F16 | DType::BF16 | DType::F64))
    }

    /// All of the safetensors `__metadata__`.
    pub fn all_metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The message for a tensor holding NaN or infinite values.
    pub fn not_finite(&self, name: &str) -> String {
        format!("{}: tensor `{}{name}` holds NaN or infinite values", self.path.display(), self.prefix)
    }

    /// Works out which naming scheme the file uses, role by role.
    pub fn layout(&self) -> Layout {
        let naming = if self.has(&format!("{HF_PATCH}.weight")) { Naming::HuggingFace } else { Naming::TorchHub };
        match naming {
            Naming::HuggingFace => {
                let block_prefix = if self.has("layers.0.layernorm_before.weight") || self.has("layers.0.norm1.weight")
                {
                    "layers."
                } else {
                    "encoder.layer."
                };
                let pick = |alternatives: &[&'static str]| {
                    *alternatives
                        .iter()
                        .find(|role| self.has(&format!("{block_prefix}0.{role}.weight")))
                        .unwrap_or(&alternatives[0])
                };
                let qkv = if self.has(&format!("{block_prefix}0.attention.q_proj.weight")) {
                    QkvNames::Separate(["attention.q_proj", "attention.k_proj", "attention.v_proj"])
                } else {
                    QkvNames::Separate([
                        "attention.attention.query",
                        "attention.attention.key",
                        "attention.attention.value",
                    ])
                };
                Layout {
                    naming,
                    cls_token: "embeddings.cls_token",
                    pos_embed: "embeddings.position_embeddings",
                    register_tokens: "embeddings.register_tokens",
                    patch_embed: HF_PATCH,
                    stem: "embeddings.patch_embeddings.stem",
                    final_norm: "layernorm",
                    block_prefix,
                    norm1: pick(&["layernorm_before", "norm1"]),
                    norm2: pick(&["layernorm_after", "norm2"]),
                    qkv,
                    attn_out: pick(&["attention.output.dense", "attention.o_proj"]),
                    fc1: pick(&["intermediate.dense", "mlp.fc1"]),
                    fc2: pick(&["output.dense", "mlp.fc2"]),
                    layer_scale: ["layer_scale1.lambda1", "layer_scale2.lambda1"],
                }
            }
            Naming::TorchHub => Layout {
                naming,
                cls_token: "cls_token",
                pos_embed: "pos_embed",
                register_tokens: "register_tokens",
                patch_embed: HUB_PATCH,
                stem: "patch_embed.stem",
                final_norm: "norm",
                block_prefix: "blocks.",
                norm1: "norm1",
                norm2: "norm2",
                qkv: QkvNames::Fused("attn.qkv"),
                attn_out: "attn.proj",
                fc1: "mlp.fc1",
                fc2: "mlp.fc2",
                layer_scale: ["ls1.gamma", "ls2.gamma"],
            },
        }
    }

    /// Number of blocks present: one more than the highest block index.
    pub fn count_blocks(&self, layout: &Layout) -> usize {
        self.names()
            .filter_map(|n| n.strip_prefix(layout.block_prefix)?.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |last| last + 1)
    }

    /// Fails with the missing names (and the names nothing asked for, which
    /// usually explain why) when `required` is not all present.
    pub fn check_complete(&self, required: &[String]) -> Result<()> {
        let missing: Vec<String> =
            required.iter().filter(|n| !self.has(n)).map(|n| format!("{}{n}", self.prefix)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let wanted: BTreeSet<&str> = required.iter().map(String::as_str).collect();
        let unexpected: Vec<String> = self
            .names()
            .filter(|n| !wanted.contains(n) && !is_ignorable(n))
            .map(|n| format!("{}{n}", self.prefix))
            .collect();
        let mut message =
            format!("{}: {} tensor(s) missing: {}", self.path.display(), missing.len(), list_some(missing.iter()));
        if !unexpected.is_empty() {
            message += &format!("; unexpected: {}", list_some(unexpected.iter()));
        }
        Err(anyhow!(message))
    }
}

/// `path` mapped read-only, for the safetensors crate to read in place.
pub fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|e| anyhow!("{}: cannot open: {e}", path.display()))?;
    // SAFETY: a read-only mapping; like every mmap reader we rely on nobody
    // truncating the file while it is in use.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| anyhow!("{}: cannot map: {e}", path.display()))
}

/// The `__metadata__` of a safetensors file's bytes, read from its header
/// by the safetensors crate (one parser for files, embedded models and heads).
pub fn safetensors_metadata(bytes: &[u8]) -> Result<HashMap<String, String>, safetensors::SafeTensorError> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)?;
    Ok(header.metadata().clone().unwrap_or_default())
}

/// Up to ten names, then how many more.
fn list_some<S: AsRef<str>>(names: impl ExactSizeIterator<Item = S>) -> String {
    let total = names.len();
    let shown: Vec<String> = names.take(10).map(|n| n.as_ref().to_string()).collect();
    let mut text = shown.join(", ");
    if total > 10 {
        text += &format!(" (and {} more)", total - 10);
    }
    text
}

/// candle wraps I/O and parse errors with path context we already give.
fn root_cause(error: &candle_core::Error) -> String {
    match error {
        candle_core::Error::WithPath { inner, .. } => root_cause(inner),
        candle_core::Error::WithBacktrace { inner, .. } => root_cause(inner),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_half_precision_value_converts_as_candle_converts_it() {
        let bytes: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
        let candle = Tensor::from_raw_buffer(&bytes, DType::F16, &[1 << 16], &Device::Cpu).unwrap();
        let expected: Vec<f32> = candle.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
        let mut ours = vec![0.0; 1 << 16];
        StoredValues::F16(&bytes).read(0, &mut ours);
        for (i, (ours, e)) in ours.iter().zip(&expected).enumerate() {
            assert!(ours.to_bits() == e.to_bits() || (ours.is_nan() && e.is_nan()), "{i:#06x}: {ours} vs {e}");
        }
        let mut two = [0.0; 2];
        StoredValues::BF16(&[0x80, 0x3f, 0x00, 0xc0]).read(0, &mut two);
        assert_eq!(two, [1.0, -2.0]);
        StoredValues::F32(&[0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0xc0]).read(1, &mut two[..1]);
        assert_eq!(two[0], -2.0);
    }
}
