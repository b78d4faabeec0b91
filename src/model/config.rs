//! The encoder's hyper-parameters, inferred from tensor shapes and completed
//! by a Hugging Face `config.json` where one sits beside the weights.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use super::interpolate::PosInterpolation;
use super::weights::{Layout, Naming, QkvNames, TensorStore};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU (erf), the `"gelu"` of every DINO / DINOv2 checkpoint.
    Gelu,
    /// The tanh approximation (`"gelu_new"`, `"gelu_pytorch_tanh"`).
    GeluTanh,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    /// Pixels per patch side, the stem's downsampling included.
    pub patch_size: usize,
    /// Output channels of each 3x3 stride-2 convolution before the patch
    /// projection; empty for the published DINO models, which have none.
    pub stem_channels: Vec<usize>,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub mlp_hidden_size: usize,
    pub num_registers: usize,
    pub layer_scale: bool,
    pub layer_norm_eps: f64,
    pub activation: Activation,
    /// Side of the square patch grid the position embeddings were trained on.
    pub pos_grid: usize,
    pub pos_interpolation: PosInterpolation,
}

impl VitConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Tokens before the patch tokens: the class token and the registers.
    pub fn num_prefix_tokens(&self) -> usize {
        1 + self.num_registers
    }

    /// The image side the checkpoint was trained at.
    pub fn train_resolution(&self) -> usize {
        self.pos_grid * self.patch_size
    }
}

/// The fields of a Hugging Face `config.json` that shapes cannot tell.
#[derive(Debug, Default, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    pub hidden_size: Option<usize>,
    pub patch_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub layer_norm_eps: Option<f64>,
    pub hidden_act: Option<String>,
    pub use_swiglu_ffn: Option<bool>,
}

impl HfConfig {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        Self::parse(&text, path)
    }

    /// `text` is a config.json's contents, from `source`.
    pub fn parse(text: &str, source: &Path) -> Result<Self> {
        serde_json::from_str(text).with_context(|| format!("{}: not a valid config.json", source.display()))
    }

    pub fn activation(&self, path: &Path) -> Result<Activation> {
        match self.hidden_act.as_deref() {
            None | Some("gelu") => Ok(Activation::Gelu),
            Some("gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") => Ok(Activation::GeluTanh),
            Some(other) => bail!("{}: unsupported hidden_act {other:?} (expected gelu)", path.display()),
        }
    }
}

impl VitConfig {
    /// Reads the architecture off tensor names and shapes; `hf` supplies what
    /// shapes cannot (head count, LayerNorm epsilon, activation).
    pub fn infer(store: &TensorStore, layout: &Layout, hf: &HfConfig, hf_path: Option<&Path>) -> Result<Self> {
        let file = store.path().display();
        let stem_channels = stem_channels(store, layout)?;
        let in_channels = stem_channels.last().copied().unwrap_or(3);
        let patch_name = format!("{}.weight", layout.patch_embed);
        let patch_shape = store.shape(&patch_name).unwrap_or_default();
        let [hidden_size, channels, projection_size, projection_w] = patch_shape[..] else {
            bail!(
                "{file}: tensor `{patch_name}` has shape {patch_shape:?}, expected [hidden, {in_channels}, patch, patch]"
            );
        };
        if channels != in_channels {
            bail!("{file}: tensor `{patch_name}` has shape {patch_shape:?}, expected {in_channels} input channels");
        }
        if projection_size != projection_w || projection_size == 0 {
            bail!("{file}: non-square patches {patch_shape:?} are not supported");
        }
        let patch_size = projection_size << stem_channels.len();
        if hf.use_swiglu_ffn == Some(true) || store.has(&layout.block(0, "mlp.weights_in.weight")) {
            bail!("{file}: SwiGLU MLPs (DINOv2 giant) are not supported");
        }

        let pos_shape = store.shape(layout.pos_embed).unwrap_or_default();
        let pos_grid = match pos_shape[..] {
            [1, n, d] if d == hidden_size && n > 1 && is_square(n - 1) => (n - 1).isqrt(),
            _ => bail!(
                "{file}: tensor `{}` has shape {pos_shape:?}, expected [1, 1 + G*G, {hidden_size}]",
                layout.pos_embed
            ),
        };
        let num_registers = match store.shape(layout.register_tokens).as_deref() {
            None => 0,
            Some(&[1, r, d]) if d == hidden_size => r,
            Some(shape) => bail!(
                "{file}: tensor `{}` has shape {shape:?}, expected [1, registers, {hidden_size}]",
                layout.register_tokens
            ),
        };
        let num_layers = store.count_blocks(layout);
        if num_layers == 0 {
            bail!("{file}: no transformer blocks (`{}0.*`) found", layout.block_prefix);
        }
        let layer_scale = store.has(&layout.block(0, layout.layer_scale[0]));
        let mut required = required_tensors(layout, num_layers, num_registers > 0, layer_scale);
        required.extend(
            (0..stem_channels.len())
                .flat_map(|i| [format!("{}.{i}.weight", layout.stem), format!("{}.{i}.bias", layout.stem)]),
        );
        store.check_complete(&required)?;

        let mlp_name = format!("{}.weight", layout.block(0, layout.fc1));
        let mlp_hidden_size = match store.shape(&mlp_name).as_deref() {
            Some(&[m, d]) if d == hidden_size => m,
            other => bail!("{file}: tensor `{mlp_name}` has shape {other:?}, expected [mlp, {hidden_size}]"),
        };
        let num_heads = match hf.num_attention_heads {
            Some(heads) => heads,
            // Every published DINO / DINOv2 model uses 64-dimensional heads.
            None if hidden_size % 64 == 0 => hidden_size / 64,
            None => bail!(
                "{file}: cannot infer the head count for hidden size {hidden_size}; \
                 put a config.json with num_attention_heads beside the weights"
            ),
        };
        if num_heads == 0 || hidden_size % num_heads != 0 {
            bail!("{file}: hidden size {hidden_size} is not divisible by {num_heads} heads");
        }
        let vit_v1_names = layout.norm1 == "layernorm_before";
        let config_path = hf_path.unwrap_or(store.path());
        let config_file = config_path.display();
        // What config.json says and the tensors can tell must agree.
        for (field, said, found) in [
            ("hidden_size", hf.hidden_size, hidden_size),
            ("patch_size", hf.patch_size, patch_size),
            ("intermediate_size", hf.intermediate_size, mlp_hidden_size),
            ("num_hidden_layers", hf.num_hidden_layers, num_layers),
        ] {
            if let Some(said) = said.filter(|&said| said != found) {
                bail!("{config_file}: {field} is {said}, but the tensors of {file} have {found}");
            }
        }
        let layer_norm_eps = hf.layer_norm_eps.unwrap_or(if vit_v1_names { 1e-12 } else { 1e-6 });
        if !(layer_norm_eps > 0.0 && layer_norm_eps.is_finite()) {
            bail!("{config_file}: layer_norm_eps must be a positive number, got {layer_norm_eps}");
        }
        Ok(Self {
            patch_size,
            stem_channels,
            hidden_size,
            num_layers,
            num_heads,
            mlp_hidden_size,
            num_registers,
            layer_scale,
            // transformers' ViTConfig default is 1e-12; the DINOv2 family uses 1e-6.
            layer_norm_eps,
            activation: hf.activation(config_path)?,
            pos_grid,
            pos_interpolation: match (num_registers > 0, layout.naming) {
                (true, _) => PosInterpolation::SizeAntialias,
                (false, Naming::HuggingFace) => PosInterpolation::Size,
                (false, Naming::TorchHub) => PosInterpolation::ScaleOffset(0.1),
            },
        })
    }
}

/// Output channels of each stem convolution (`{stem}.0.weight`,
/// `{stem}.1.weight`, ... while present), checking that each is 3x3 and
/// takes the previous one's output.
fn stem_channels(store: &TensorStore, layout: &Layout) -> Result<Vec<usize>> {
    let mut channels = Vec::new();
    for i in (0..).take_while(|i| store.has(&format!("{}.{i}.weight", layout.stem))) {
        let name = format!("{}.{i}.weight", layout.stem);
        let inputs = channels.last().copied().unwrap_or(3);
        match store.shape(&name).as_deref() {
            Some(&[outputs, c, 3, 3]) if c == inputs => channels.push(outputs),
            shape => bail!(
                "{}: tensor `{name}` has shape {shape:?}, expected [channels, {inputs}, 3, 3]",
                store.path().display()
            ),
        }
    }
    Ok(channels)
}

fn is_square(n: usize) -> bool {
    n.isqrt() * n.isqrt() == n
}

/// Every tensor name the encoder reads for this layout and size.
fn required_tensors(layout: &Layout, num_layers: usize, registers: bool, layer_scale: bool) -> Vec<String> {
    let with_bias = |name: &str| [format!("{name}.weight"), format!("{name}.bias")];
    let mut names = vec![layout.cls_token.to_string(), layout.pos_embed.to_string()];
    if registers {
        names.push(layout.register_tokens.to_string());
    }
    names.extend(with_bias(layout.patch_embed));
    names.extend(with_bias(layout.final_norm));
    for layer in 0..num_layers {
        let mut roles = vec![layout.norm1, layout.norm2, layout.attn_out, layout.fc1, layout.fc2];
        match layout.qkv {
            QkvNames::Fused(name) => roles.push(name),
            QkvNames::Separate(qkv) => roles.extend(qkv),
        }
        for role in roles {
            names.extend(with_bias(&layout.block(layer, role)));
        }
        if layer_scale {
            names.extend(layout.layer_scale.iter().map(|role| layout.block(layer, role)));
        }
    }
    names
}
