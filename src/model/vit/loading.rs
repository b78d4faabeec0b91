//! Reading a checkpoint into the encoder's layers, as candle hands a
//! `VarBuilder` to each layer's `new`: [`Weights`] gives tensors and linear
//! layers by the checkpoint's names, checked, with each weight matrix laid
//! out for the kernels once, or taken from the layout an earlier run kept
//! ([`PanelCache`]) under the same name.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Result, anyhow, bail};
use candle_core::Tensor;

use super::{Layers, Linear, Vit};
use crate::fnv::fnv1a_64;
use crate::model::builtin;
use crate::model::config::{HfConfig, VitConfig};
use crate::model::fused::{self, PackedWeight, Precision};
use crate::model::panel_cache::PanelCache;
use crate::model::weights::{CONFIG_METADATA_KEY, Layout, ModelFiles, TensorStore};

/// Safetensors metadata key: the input's short side the model was trained for.
pub const SHORT_SIDE_METADATA_KEY: &str = "segattn_short_side";

/// A checkpoint being read into layers: its tensors under their names, the
/// model's shape, and what its products multiply in.
pub(super) struct Weights<'a> {
    store: &'a TensorStore,
    pub(super) layout: &'a Layout,
    pub(super) config: &'a VitConfig,
    precision: Precision,
    /// Weight matrices an earlier run laid out, by name.
    laid_out: HashMap<String, PackedWeight>,
    /// Weight matrices laid out here, by name, to be kept for the next run.
    packed: Mutex<Vec<(String, PackedWeight)>>,
    /// Every name a layer read, so that the rest are the checkpoint's extras.
    read: Mutex<BTreeSet<String>>,
}

impl Weights<'_> {
    /// `name`, checked to have `shape`, hold floats, and be finite.
    pub(super) fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.mark_read(name);
        self.store.tensor(name, shape)
    }

    /// `name`, a vector of `len` values, checked as [`Weights::tensor`].
    pub(super) fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        Ok(self.tensor(name, &[len])?.to_vec1()?)
    }

    fn mark_read(&self, name: &str) {
        self.read.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string());
    }

    /// The layers `names` as one linear layer, their outputs one after
    /// another (a fused qkv projection from separate q, k and v). Each
    /// `{name}.weight` has `shape`: its outputs, then whatever its inputs
    /// are (a patch projection's channels and pixels). W is laid out for the
    /// product in one pass over the values where they lie, its finiteness
    /// checked on the way, or taken as an earlier run laid it out.
    pub(super) fn linear(&self, names: &[String], shape: &[usize]) -> Result<Linear> {
        let (outputs, inputs) = (shape[0], shape[1..].iter().product::<usize>());
        let mut bias = Vec::with_capacity(names.len() * outputs);
        for name in names {
            bias.extend(self.vector(&format!("{name}.bias"), outputs)?);
        }
        let weight_names: Vec<String> = names.iter().map(|name| format!("{name}.weight")).collect();
        for name in &weight_names {
            self.store.check(name, shape)?;
            self.mark_read(name);
        }
        let key = weight_names.join("+");
        if let Some(weight) = self.laid_out.get(&key).filter(|w| w.shape() == (names.len() * outputs, inputs)) {
            return Ok(Linear { weight: weight.clone(), bias });
        }
        let stored = weight_names.iter().map(|name| self.store.rows(name, shape)).collect::<Result<Vec<_>>>()?;
        let not_finite = AtomicUsize::new(usize::MAX);
        let weight = fused::pack_rows(self.precision, names.len() * outputs, inputs, |output, first, into| {
            let (part, row) = (output / outputs, output % outputs);
            stored[part].read(row * inputs + first, into);
            // Without a branch per value, so that it vectorizes: the largest
            // magnitude's bits are an infinity's or a NaN's exactly when one is.
            let largest = into.iter().map(|v| v.to_bits() & 0x7fff_ffff).max().unwrap_or(0);
            if largest >= f32::INFINITY.to_bits() {
                not_finite.fetch_min(part, Ordering::Relaxed);
            }
        })?;
        if let Some(name) = weight_names.get(not_finite.into_inner()) {
            bail!("{}", self.store.not_finite(name));
        }
        self.packed.lock().unwrap_or_else(|e| e.into_inner()).push((key, weight.clone()));
        Ok(Linear { weight, bias })
    }
}

/// The file's metadata entry `key` as a `T` that `valid` accepts, if the file
/// has one; anything else there is a broken checkpoint.
pub(super) fn metadata_value<T: FromStr>(
    store: &TensorStore,
    key: &str,
    what: &str,
    valid: impl Fn(&T) -> bool,
) -> Result<Option<T>> {
    let Some(text) = store.metadata(key) else { return Ok(None) };
    let value = text.parse::<T>().ok().filter(valid);
    value.map(Some).ok_or_else(|| anyhow!("{}: metadata {key} is {text:?}, not {what}", store.path().display()))
}

impl Vit {
    /// Loads a checkpoint from a `.safetensors` file or a Hugging Face snapshot directory.
    /// It runs on the CPU: the fused kernels are CPU code.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_in(path, Precision::F32)
    }

    /// [`Vit::load`], its linear layers and attention multiplying in `precision` where
    /// this CPU has it (else in f32: [`Vit::precision`] says which).
    pub fn load_in(path: &Path, precision: Precision) -> Result<Self> {
        Self::load_cached(path, precision, None)
    }

    /// [`Vit::load_in`], taking the laid-out weights from `cache` when an
    /// earlier run left them there for this file, and leaving them there
    /// otherwise.
    pub fn load_cached(path: &Path, precision: Precision, cache: Option<&PanelCache>) -> Result<Self> {
        let files = ModelFiles::locate(path)?;
        let store = TensorStore::open(&files.weights)?;
        Self::from_store(store, files, precision, cache)
    }

    /// segattn's own model, compiled into the binary ([`builtin`]).
    pub fn builtin() -> Result<Self> {
        Self::builtin_in(Precision::F32)
    }

    /// [`Vit::builtin`] in `precision`, as [`Vit::load_in`].
    pub fn builtin_in(precision: Precision) -> Result<Self> {
        let store = TensorStore::embedded(builtin::DISPLAY_NAME, builtin::SAFETENSORS)?;
        Self::from_store(store, ModelFiles::embedded(builtin::DISPLAY_NAME), precision, None)
    }

    fn from_store(
        store: TensorStore,
        files: ModelFiles,
        precision: Precision,
        cache: Option<&PanelCache>,
    ) -> Result<Self> {
        let precision = if fused::is_available(precision) { precision } else { Precision::F32 };
        // A config.json beside the weights, else one carried in the file's metadata.
        let hf = match (&files.config, store.metadata(CONFIG_METADATA_KEY)) {
            (Some(config_path), _) => HfConfig::read(config_path)?,
            (None, Some(text)) => HfConfig::parse(text, store.path())?,
            (None, None) => HfConfig::default(),
        };
        let layout = store.layout();
        let config = VitConfig::infer(&store, &layout, &hf, files.config.as_deref())?;
        let key = cache.and_then(|cache| cache.key(&files.weights, precision));
        let laid_out = cache.zip(key.as_deref()).and_then(|(cache, key)| cache.read(key, precision));
        let weights_from_cache = laid_out.is_some();
        let weights = Weights {
            store: &store,
            layout: &layout,
            config: &config,
            precision,
            laid_out: laid_out.into_iter().flatten().collect(),
            packed: Mutex::default(),
            read: Mutex::default(),
        };
        let layers = Layers::new(&weights, precision)?;
        let packed = weights.packed.into_inner().unwrap_or_else(|e| e.into_inner());
        let weights_from_cache = weights_from_cache && packed.is_empty();
        if let (Some(cache), Some(key), false) = (cache, &key, weights_from_cache) {
            // A cache that cannot be written only costs the next run time.
            let mut all: Vec<(String, PackedWeight)> = weights.laid_out.into_iter().chain(packed).collect();
            all.sort_by(|a, b| a.0.cmp(&b.0));
            let _ = cache.write(key, &all);
        }
        let read = weights.read.into_inner().unwrap_or_else(|e| e.into_inner());
        // What the encoder did not read, loaded as it is, checked as the
        // encoder's tensors are, for whoever reads it (a head trained with
        // the encoder); tensors of integers (buffers) are no weights.
        let extras = store
            .names()
            .filter(|name| !read.contains(*name) && store.holds_floats(name))
            .map(|name| Ok((name.to_string(), store.tensor(name, &store.shape(name).unwrap_or_default())?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        Ok(Self {
            fingerprint: fingerprint(&layers.cls_token, &layers.patch_embed.projection.bias)?,
            num_parameters: store.names().filter_map(|n| store.shape(n)).map(|s| s.iter().product::<usize>()).sum(),
            default_short_side: metadata_value(&store, SHORT_SIDE_METADATA_KEY, "a size", |&n: &usize| n > 0)?,
            metadata: store.all_metadata().clone(),
            layers,
            config,
            files,
            extras,
            precision,
            weights_from_cache,
        })
    }
}

/// FNV-1a over the class token's and the patch projection's bias's f32
/// values, little-endian.
fn fingerprint(cls_token: &Tensor, patch_bias: &[f32]) -> Result<String> {
    let cls_token = cls_token.flatten_all()?.to_vec1::<f32>()?;
    let hash = fnv1a_64(cls_token.iter().chain(patch_bias).flat_map(|v| v.to_le_bytes()));
    Ok(format!("{hash:016x}"))
}
