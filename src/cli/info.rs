//! `segattn info`: what the checkpoint is.

use anyhow::Result;
use clap::Args;
use serde_json::json;

use super::{EXIT_OK, ModelArgs};

#[derive(Debug, Args)]
pub struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: InfoArgs) -> Result<u8> {
    let model = args.model.load()?;
    let c = model.config();
    let files = model.files();
    let (linear_kernel, attention_kernel) = model.kernel_names();
    let info = json!({
        "weights": files.weights.display().to_string(),
        "config_json": files.config.as_ref().map(|p| p.display().to_string()),
        "parameters": model.num_parameters(),
        "patch_size": c.patch_size,
        "hidden_size": c.hidden_size,
        "layers": c.num_layers,
        "heads": c.num_heads,
        "mlp_hidden_size": c.mlp_hidden_size,
        "registers": c.num_registers,
        "layer_scale": c.layer_scale,
        "layer_norm_eps": c.layer_norm_eps,
        "activation": format!("{:?}", c.activation),
        "train_resolution": c.train_resolution(),
        "position_interpolation": format!("{:?}", c.pos_interpolation),
        "trained_head": crate::head::LinearHead::bundled(&model)?.map(|head| {
            format!("linear, {0}x{0} cells per patch", head.cells_per_side())
        }),
        "trained_decoder": crate::head::has_bundled_decoder(&model).then_some("skips from the stem, logits at 1/4 of the input"),
        "input_short_side": crate::preprocess::input_size(1, 1, args.model.short_side(&model), c.patch_size).0,
        "ncut_tau": crate::head::NormalizedCut::for_model(&model)?.tau,
        "linear_kernel": linear_kernel,
        "attention_kernel": attention_kernel,
        "weights_from_cache": model.weights_from_cache(),
    });
    if args.json {
        outln!("{info}")?;
    } else {
        for (key, value) in info.as_object().expect("built as an object") {
            outln!("{key:<24}{}", value.to_string().trim_matches('"'))?;
        }
    }
    Ok(EXIT_OK)
}
