//! The ViT encoder: patch embedding, class/register tokens, interpolated
//! position embeddings, pre-norm blocks, final LayerNorm.
//!
//! The architecture: one struct per layer, each built by `new` from the
//! checkpoint's tensors by name (`loading::Weights`, as candle's layers
//! take a `VarBuilder`) and run with `forward`. Attention probabilities and
//! q/k/v are only kept for the layers a [`Capture`] asks for.

mod loading;

use std::collections::{BTreeMap, HashMap};

use anyhow::{Result, bail};
use candle_core::Tensor;
use rayon::prelude::*;

pub use self::loading::SHORT_SIDE_METADATA_KEY;
use self::loading::Weights;
use super::config::{Activation, VitConfig};
use super::conv::ChannelsLastConv;
use super::fused::{self, Precision};
use super::interpolate::resample_grid;
use super::weights::{ModelFiles, QkvNames};
use crate::preprocess::PatchGrid;

/// `x · Wᵀ + b`, with W laid out once at load for the product's kernel
/// ([`fused::PackedWeight`]). Read as stored, (outputs, inputs), W would be
/// packed by the GEMM on every call.
struct Linear {
    weight: fused::PackedWeight,
    bias: Vec<f32>,
}

impl Linear {
    /// `{name}.weight` of `shape` (outputs first) and `{name}.bias`.
    fn new(weights: &Weights, name: &str, shape: &[usize]) -> Result<Self> {
        weights.linear(&[name.to_string()], shape)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let product = fused::linear(&x.contiguous()?, &self.weight, &self.bias)?;
        self.output(product, x)
    }

    /// `x · Wᵀ` alone, as a buffer that callers fuse the bias into in place.
    fn forward_without_bias(&self, x: &Tensor) -> Result<Vec<f32>> {
        fused::matmul(&x.contiguous()?, &self.weight)
    }

    /// GELU(`x · Wᵀ + bias`) in the erf form, as a buffer.
    fn forward_gelu(&self, x: &Tensor) -> Result<Vec<f32>> {
        fused::linear_gelu(&x.contiguous()?, &self.weight, &self.bias)
    }

    /// A product of `x` as a (B, tokens, outputs) tensor.
    fn output(&self, product: Vec<f32>, x: &Tensor) -> Result<Tensor> {
        let (batch, tokens, _) = x.dims3()?;
        Ok(Tensor::from_vec(product, (batch, tokens, self.weight.outputs()), x.device())?)
    }
}

struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl LayerNorm {
    fn new(weights: &Weights, name: &str) -> Result<Self> {
        let size = weights.config.hidden_size;
        Ok(Self {
            weight: weights.vector(&format!("{name}.weight"), size)?,
            bias: weights.vector(&format!("{name}.bias"), size)?,
            eps: weights.config.layer_norm_eps as f32,
        })
    }

    fn fused(&self) -> fused::Norm<'_> {
        fused::Norm { weight: &self.weight, bias: &self.bias, eps: self.eps }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        fused::layer_norm(&x.contiguous()?, self.fused())
    }
}

/// A 3x3 convolution with stride 2 and padding 1, then ReLU (its batch norm
/// folded in by the exporter), channels last.
struct StemConv {
    conv: ChannelsLastConv,
}

impl StemConv {
    fn new(weights: &Weights, name: &str, inputs: usize, outputs: usize) -> Result<Self> {
        let weight = weights.tensor(&format!("{name}.weight"), &[outputs, inputs, 3, 3])?;
        let bias = weights.tensor(&format!("{name}.bias"), &[outputs])?;
        Ok(Self { conv: ChannelsLastConv::new(&weight, &bias, 2)? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.conv.forward(x)?.relu()?)
    }
}

/// An optional convolutional stem, then non-overlapping patches, so the
/// stride-q projection is a reshape and one GEMM.
struct PatchEmbed {
    stem: Vec<StemConv>,
    projection: Linear,
    /// Side of the projection's patches, in the stem's output.
    projection_size: usize,
    patch_size: usize,
}

impl PatchEmbed {
    fn new(weights: &Weights) -> Result<Self> {
        let (layout, config) = (weights.layout, weights.config);
        let mut inputs = 3;
        let mut stem = Vec::with_capacity(config.stem_channels.len());
        for (i, &outputs) in config.stem_channels.iter().enumerate() {
            stem.push(StemConv::new(weights, &format!("{}.{i}", layout.stem), inputs, outputs)?);
            inputs = outputs;
        }
        let q = config.patch_size >> stem.len();
        // A convolution of stride q over q x q patches: one product whose
        // inputs are a patch's channels and pixels.
        let projection = Linear::new(weights, layout.patch_embed, &[config.hidden_size, inputs, q, q])?;
        Ok(Self { stem, projection, projection_size: q, patch_size: config.patch_size })
    }

    /// (B, 3, H, W) -> (B, rows·cols, D), and with `keep_stem` each stem
    /// layer's output. Trailing pixels that do not fill a patch are dropped,
    /// as the convolution does.
    fn forward(&self, pixels: &Tensor, keep_stem: bool) -> Result<(Tensor, PatchGrid, Vec<Tensor>)> {
        let (_, channels, height, width) = pixels.dims4()?;
        let p = self.patch_size;
        let grid = PatchGrid { rows: height / p, cols: width / p };
        if channels != 3 {
            bail!("expected 3 colour channels, got {channels}");
        }
        if grid.rows == 0 || grid.cols == 0 {
            bail!("image {width}x{height} is smaller than one {p}x{p} patch");
        }
        // Channels last from here: the stem's convolutions gather whole pixels.
        let mut x = pixels.narrow(2, 0, grid.rows * p)?.narrow(3, 0, grid.cols * p)?.permute((0, 2, 3, 1))?;
        let mut stem = Vec::new();
        for conv in &self.stem {
            x = conv.forward(&x)?;
            if keep_stem {
                stem.push(x.clone());
            }
        }
        // Each patch's values in the projection weight's order: channel, row, column.
        let patches = fused::patches(&x, self.projection_size)?;
        Ok((self.projection.forward(&patches)?, grid, stem))
    }
}

struct PositionEmbedding {
    /// (1, 1 + G·G, D), as stored: the trained grid's embeddings.
    table: Tensor,
    cls: Tensor,
    /// (D, G, G): channels first, ready for separable resampling.
    grid: Tensor,
    config: VitConfig,
}

impl PositionEmbedding {
    fn new(weights: &Weights) -> Result<Self> {
        let config = weights.config;
        let (d, g) = (config.hidden_size, config.pos_grid);
        let table = weights.tensor(weights.layout.pos_embed, &[1, 1 + g * g, d])?;
        let cls = table.narrow(1, 0, 1)?;
        let grid = table.narrow(1, 1, g * g)?.reshape((g, g, d))?.permute((2, 0, 1))?.contiguous()?;
        Ok(Self { table, cls, grid, config: config.clone() })
    }

    /// Position embeddings for the class token and a `grid` of patches: (1, 1 + rows·cols, D).
    fn forward(&self, grid: PatchGrid) -> Result<Tensor> {
        let g = self.config.pos_grid;
        // Every reference skips interpolation for the trained square grid.
        if grid.rows == g && grid.cols == g {
            return Ok(self.table.clone());
        }
        let patches = resample_grid(&self.grid, grid.rows, grid.cols, self.config.pos_interpolation)?;
        let patches = patches.permute((1, 2, 0))?.reshape((1, grid.len(), self.config.hidden_size))?;
        Ok(Tensor::cat(&[&self.cls, &patches], 1)?)
    }
}

/// Queries, keys and values of one layer, each (B, heads, tokens, head_dim).
#[derive(Debug, Clone)]
pub struct Qkv {
    pub layer: usize,
    pub queries: Tensor,
    pub keys: Tensor,
    pub values: Tensor,
}

/// How much of a layer's attention to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The class token's row, (B, heads, 1, tokens): all that attention maps
    /// and the DINO head read. Attention stays fused.
    ClsRow,
    /// The average over heads, (B, 1, tokens, tokens): what rollout reads.
    HeadMean,
    /// Every head's matrix, (B, heads, tokens, tokens).
    Full,
}

impl Keep {
    /// What serves both requests: the full matrix holds every row and mean.
    fn and(self, other: Keep) -> Keep {
        if self == other { self } else { Keep::Full }
    }
}

/// What a forward pass keeps besides the final tokens: how much of each
/// layer's attention, one layer's queries, keys and values, and the stem's
/// outputs. Nothing, by default, and then no attention matrix is ever built.
#[derive(Debug, Clone, Default)]
pub struct Capture {
    attention: BTreeMap<usize, Keep>,
    qkv_layer: Option<usize>,
    stem: bool,
}

impl Capture {
    /// `keep` of the attention of each of `layers` (0-based).
    pub fn attention(layers: impl IntoIterator<Item = usize>, keep: Keep) -> Self {
        Self::default().and_attention(layers, keep)
    }

    /// Also `keep` of `layers`; a layer asked for twice keeps what serves both.
    pub fn and_attention(mut self, layers: impl IntoIterator<Item = usize>, keep: Keep) -> Self {
        for layer in layers {
            let merged = self.attention.get(&layer).map_or(keep, |&asked| asked.and(keep));
            self.attention.insert(layer, merged);
        }
        self
    }

    /// Also `layer`'s queries, keys and values.
    pub fn and_qkv(mut self, layer: usize) -> Self {
        self.qkv_layer = Some(layer);
        self
    }

    /// Also each convolutional stem layer's output.
    pub fn and_stem(mut self) -> Self {
        self.stem = true;
        self
    }

    /// Every layer named.
    fn layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.attention.keys().copied().chain(self.qkv_layer)
    }

    fn for_layer(&self, layer: usize) -> BlockCapture {
        BlockCapture { probabilities: self.attention.get(&layer).copied(), qkv: self.qkv_layer == Some(layer) }
    }
}

/// What one block keeps besides its output tokens.
#[derive(Debug, Clone, Copy)]
struct BlockCapture {
    probabilities: Option<Keep>,
    qkv: bool,
}

/// What a block kept of its attention.
struct Kept {
    probabilities: Option<Tensor>,
    qkv: Option<(Tensor, Tensor, Tensor)>,
}

struct AttentionOutput {
    /// Before the output projection's bias, which the residual pass adds.
    tokens: Vec<f32>,
    kept: Kept,
}

struct Attention {
    qkv: Linear,
    out: Linear,
    num_heads: usize,
    scale: f64,
    precision: Precision,
}

impl Attention {
    fn new(weights: &Weights, layer: usize, precision: Precision) -> Result<Self> {
        let (layout, config) = (weights.layout, weights.config);
        let d = config.hidden_size;
        let qkv = match layout.qkv {
            QkvNames::Fused(name) => Linear::new(weights, &layout.block(layer, name), &[3 * d, d])?,
            QkvNames::Separate(names) => {
                let names: Vec<String> = names.iter().map(|name| layout.block(layer, name)).collect();
                weights.linear(&names, &[d, d])?
            }
        };
        let out = Linear::new(weights, &layout.block(layer, layout.attn_out), &[d, d])?;
        let scale = 1.0 / (config.head_dim() as f64).sqrt();
        Ok(Self { qkv, out, num_heads: config.num_heads, scale, precision })
    }

    fn forward(&self, x: &Tensor, capture: BlockCapture) -> Result<AttentionOutput> {
        let (batch, tokens, d) = x.dims3()?;
        let head_dim = d / self.num_heads;
        let qkv = self.qkv.forward(x)?;
        let split = || -> Result<(Tensor, Tensor, Tensor)> {
            let heads = qkv.reshape((batch, tokens, 3, self.num_heads, head_dim))?.permute((2, 0, 3, 1, 4))?;
            Ok((heads.get(0)?.contiguous()?, heads.get(1)?.contiguous()?, heads.get(2)?.contiguous()?))
        };
        // q/k/v are split into heads once, and only when a caller or the
        // unfused path needs them.
        let (mixed, probabilities, heads) = match capture.probabilities {
            // The common case: no matrix kept, so never build one.
            None | Some(Keep::ClsRow) => {
                let keep_cls_row = capture.probabilities == Some(Keep::ClsRow);
                let (mixed, cls) =
                    fused::attention(&qkv, self.num_heads, self.scale as f32, keep_cls_row, self.precision)?;
                (mixed, cls, if capture.qkv { Some(split()?) } else { None })
            }
            Some(keep @ (Keep::HeadMean | Keep::Full)) => {
                let (queries, keys, values) = split()?;
                let scores = (&queries * self.scale)?.matmul(&keys.t()?)?;
                let probabilities = candle_nn::ops::softmax_last_dim(&scores)?;
                let mixed = probabilities.matmul(&values)?.transpose(1, 2)?.reshape((batch, tokens, d))?;
                let kept = if keep == Keep::HeadMean { probabilities.mean_keepdim(1)? } else { probabilities };
                (mixed, Some(kept), capture.qkv.then_some((queries, keys, values)))
            }
        };
        let kept = Kept { probabilities, qkv: heads };
        Ok(AttentionOutput { tokens: self.out.forward_without_bias(&mixed)?, kept })
    }
}

struct Mlp {
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl Mlp {
    /// Without fc2's bias, which the residual pass adds.
    fn forward_without_bias(&self, x: &Tensor) -> Result<Vec<f32>> {
        let hidden = match self.activation {
            Activation::Gelu => self.fc1.forward_gelu(x)?,
            Activation::GeluTanh => {
                let mut hidden = self.fc1.forward_without_bias(x)?;
                fused::bias_gelu(&mut hidden, &self.fc1.bias, false);
                hidden
            }
        };
        self.fc2.forward_without_bias(&self.fc1.output(hidden, x)?)
    }
}

/// The residual stream between blocks: the tokens, and their LayerNorm for
/// whatever reads them next (a block's norm1 or norm2, or the final norm).
/// Every residual update is followed by such a norm, so the two are one pass.
struct Stream {
    x: Tensor,
    normed: Tensor,
}

impl Stream {
    fn new(x: Tensor, norm: &LayerNorm) -> Result<Self> {
        let normed = norm.forward(&x)?;
        Ok(Self { x, normed })
    }

    /// `x + γ·(update + bias)` (γ: the layer scale, if any), normalized by
    /// `norm` for the next reader.
    fn add(self, update: Vec<f32>, bias: &[f32], gamma: Option<&[f32]>, norm: &LayerNorm) -> Result<Self> {
        let (x, normed) = fused::residual_layer_norm(&self.x, update, bias, gamma, norm.fused())?;
        Ok(Self { x, normed })
    }
}

struct Block {
    norm1: LayerNorm,
    attention: Attention,
    layer_scale1: Option<Vec<f32>>,
    norm2: LayerNorm,
    mlp: Mlp,
    layer_scale2: Option<Vec<f32>>,
}

impl Block {
    fn new(weights: &Weights, layer: usize, precision: Precision) -> Result<Self> {
        let (layout, config) = (weights.layout, weights.config);
        let (d, hidden) = (config.hidden_size, config.mlp_hidden_size);
        let name = |role: &str| layout.block(layer, role);
        let layer_scale = |role: &str| -> Result<Option<Vec<f32>>> {
            config.layer_scale.then(|| weights.vector(&name(role), d)).transpose()
        };
        Ok(Self {
            norm1: LayerNorm::new(weights, &name(layout.norm1))?,
            attention: Attention::new(weights, layer, precision)?,
            layer_scale1: layer_scale(layout.layer_scale[0])?,
            norm2: LayerNorm::new(weights, &name(layout.norm2))?,
            mlp: Mlp {
                fc1: Linear::new(weights, &name(layout.fc1), &[hidden, d])?,
                fc2: Linear::new(weights, &name(layout.fc2), &[d, hidden])?,
                activation: config.activation,
            },
            layer_scale2: layer_scale(layout.layer_scale[1])?,
        })
    }

    /// Takes the stream normalized by this block's norm1; returns it after
    /// the block, normalized by `next_norm`.
    fn forward(&self, stream: Stream, next_norm: &LayerNorm, capture: BlockCapture) -> Result<(Stream, Kept)> {
        let attended = self.attention.forward(&stream.normed, capture)?;
        let stream =
            stream.add(attended.tokens, &self.attention.out.bias, self.layer_scale1.as_deref(), &self.norm2)?;
        let update = self.mlp.forward_without_bias(&stream.normed)?;
        let stream = stream.add(update, &self.mlp.fc2.bias, self.layer_scale2.as_deref(), next_norm)?;
        Ok((stream, attended.kept))
    }
}

pub struct EncoderOutput {
    /// (B, prefix + patches, D) after the final LayerNorm.
    pub tokens: Tensor,
    /// (layer, (B, heads, rows, tokens)) for each layer asked for, in layer
    /// order, shaped as its [`Keep`] says.
    pub attentions: Vec<(usize, Tensor)>,
    pub qkv: Option<Qkv>,
    /// Each convolutional stem layer's output, channels last: (B, H/2, W/2,
    /// channels), then (B, H/4, W/4, channels), ...; when asked for, else empty.
    pub stem: Vec<Tensor>,
    pub grid: PatchGrid,
    /// Class token plus registers: patch tokens start at this index.
    pub num_prefix_tokens: usize,
}

impl EncoderOutput {
    pub fn attention(&self, layer: usize) -> Option<&Tensor> {
        self.attentions.iter().find(|(l, _)| *l == layer).map(|(_, t)| t)
    }
}

/// The encoder's layers, in the order a forward pass runs them.
struct Layers {
    patch_embed: PatchEmbed,
    cls_token: Tensor,
    register_tokens: Option<Tensor>,
    position: PositionEmbedding,
    blocks: Vec<Block>,
    norm: LayerNorm,
}

impl Layers {
    fn new(weights: &Weights, precision: Precision) -> Result<Self> {
        let (layout, config) = (weights.layout, weights.config);
        let d = config.hidden_size;
        let register_tokens = match config.num_registers {
            0 => None,
            r => Some(weights.tensor(layout.register_tokens, &[1, r, d])?),
        };
        // Blocks read, check and lay out their weights independently: in
        // parallel, load time is what one core's share of the file takes.
        let blocks = (0..config.num_layers)
            .into_par_iter()
            .map(|layer| Block::new(weights, layer, precision))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embed: PatchEmbed::new(weights)?,
            cls_token: weights.tensor(layout.cls_token, &[1, 1, d])?,
            register_tokens,
            position: PositionEmbedding::new(weights)?,
            blocks,
            norm: LayerNorm::new(weights, layout.final_norm)?,
        })
    }
}

pub struct Vit {
    config: VitConfig,
    layers: Layers,
    files: ModelFiles,
    /// The checkpoint's tensors that are not the encoder's (a head or a
    /// decoder trained with it, say), by name.
    extras: BTreeMap<String, Tensor>,
    /// The checkpoint's safetensors metadata.
    metadata: HashMap<String, String>,
    num_parameters: usize,
    default_short_side: Option<usize>,
    fingerprint: String,
    precision: Precision,
    weights_from_cache: bool,
}

impl Vit {
    /// Whether the weight matrices came laid out from a [`super::PanelCache`].
    pub fn weights_from_cache(&self) -> bool {
        self.weights_from_cache
    }

    /// The checkpoint's tensors whose names start with `prefix` and that
    /// the encoder does not read, named without the prefix.
    pub fn extra_tensors(&self, prefix: &str) -> BTreeMap<&str, &Tensor> {
        self.extras.iter().filter_map(|(name, tensor)| Some((name.strip_prefix(prefix)?, tensor))).collect()
    }

    /// The checkpoint's metadata entry `key`, if it has one.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// The input's short side the model was trained for, when its file says.
    pub fn default_short_side(&self) -> Option<usize> {
        self.default_short_side
    }

    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    pub fn files(&self) -> &ModelFiles {
        &self.files
    }

    /// What computes the linear layers and the attention on this machine,
    /// in words.
    pub fn kernel_names(&self) -> (String, String) {
        fused::kernel_names(self.precision, self.config.head_dim())
    }

    /// What the linear layers and the attention multiply in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Parameters stored in the checkpoint (all of its tensors).
    pub fn num_parameters(&self) -> usize {
        self.num_parameters
    }

    /// A short hash of some of the weights: what a trained head records to
    /// recognize the backbone it was trained on, wherever its file lives.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// A layer index that may count from the end (-1 is the last layer).
    pub fn resolve_layer(&self, layer: i64) -> Result<usize> {
        let depth = self.config.num_layers as i64;
        let resolved = if layer < 0 { depth + layer } else { layer };
        if !(0..depth).contains(&resolved) {
            bail!("layer {layer} out of range: the model has {depth} layers (0..{} or -{depth}..-1)", depth - 1);
        }
        Ok(resolved as usize)
    }

    /// Runs the encoder on normalized pixels (B, 3, H, W), on a thread of
    /// rayon's pool: on the calling thread if it is one (a batch's worker),
    /// else on one of the global pool's.
    pub fn forward(&self, pixels: &Tensor, capture: &Capture) -> Result<EncoderOutput> {
        // From outside the pool, every product and pass between the layers
        // would be handed to the pool's threads while the caller waits, and
        // each would wake them again. From one of its threads, the thread that
        // runs the layers takes its share of each pass, and the others find
        // the next one as they finish, awake in the serial gaps between.
        rayon::scope(|_| {
            let _awake = fused::KeepAwake::start();
            self.forward_in_pool(pixels, capture)
        })
    }

    /// [`Vit::forward`]'s work, on the thread that calls it.
    fn forward_in_pool(&self, pixels: &Tensor, capture: &Capture) -> Result<EncoderOutput> {
        for layer in capture.layers() {
            self.resolve_layer(layer as i64)?;
        }
        let Layers { patch_embed, cls_token, register_tokens, position, blocks, norm } = &self.layers;
        let (patches, grid, stem) = patch_embed.forward(pixels, capture.stem)?;
        let batch = patches.dim(0)?;
        let d = self.config.hidden_size;
        let cls = cls_token.broadcast_as((batch, 1, d))?;
        let x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&position.forward(grid)?)?;
        // Registers are inserted after the position embeddings: they have none.
        let x = match register_tokens {
            Some(registers) => {
                let registers = registers.broadcast_as((batch, self.config.num_registers, d))?;
                Tensor::cat(&[&x.narrow(1, 0, 1)?, &registers, &x.narrow(1, 1, grid.len())?], 1)?
            }
            None => x,
        };
        let mut attentions = Vec::new();
        let mut qkv = None;
        let first_norm = blocks.first().map_or(norm, |first| &first.norm1);
        let mut stream = Stream::new(x.contiguous()?, first_norm)?;
        for (layer, block) in blocks.iter().enumerate() {
            let next_norm = blocks.get(layer + 1).map_or(norm, |next| &next.norm1);
            let kept;
            (stream, kept) = block.forward(stream, next_norm, capture.for_layer(layer))?;
            attentions.extend(kept.probabilities.map(|p| (layer, p)));
            if let Some((queries, keys, values)) = kept.qkv {
                qkv = Some(Qkv { layer, queries, keys, values });
            }
        }
        Ok(EncoderOutput {
            tokens: stream.normed,
            attentions,
            qkv,
            stem,
            grid,
            num_prefix_tokens: self.config.num_prefix_tokens(),
        })
    }
}

impl std::fmt::Debug for Vit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vit").field("config", &self.config).field("weights", &self.files.weights).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_asked_for_twice_keeps_what_serves_both() {
        let capture = Capture::attention([1, 2], Keep::ClsRow).and_attention([2, 3], Keep::HeadMean).and_qkv(0);
        let keep = |layer| capture.for_layer(layer).probabilities;
        assert_eq!(
            [keep(0), keep(1), keep(2), keep(3)],
            [None, Some(Keep::ClsRow), Some(Keep::Full), Some(Keep::HeadMean)]
        );
        assert!(capture.for_layer(0).qkv && !capture.for_layer(1).qkv);
        assert_eq!(capture.layers().collect::<Vec<_>>(), [1, 2, 3, 0]);
        assert_eq!(
            Capture::attention([4], Keep::Full).and_attention([4], Keep::ClsRow).for_layer(4).probabilities,
            Some(Keep::Full)
        );
    }
}
