//! `segattn attn-map`: where the class token looks.

use std::str::FromStr;
use std::time::Instant;

use anyhow::{Result, bail};
use candle_core::Device;
use clap::Args;
use image::{DynamicImage, RgbImage};
use serde_json::json;

use super::jobs::Job;
use super::{BatchArgs, ModelArgs, batch, jobs};
use crate::attention::{self, PatchMap};
use crate::image_io;
use crate::model::{Capture, Vit};
use crate::preprocess;
use crate::render::{self, Colormap};

/// Which heads to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadChoice {
    Index(usize),
    Mean,
    /// One labelled tile per head, then the mean.
    All,
}

impl FromStr for HeadChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mean" => Ok(HeadChoice::Mean),
            "all" => Ok(HeadChoice::All),
            n => {
                n.parse().map(HeadChoice::Index).map_err(|_| format!("expected a head number, mean or all, got {n:?}"))
            }
        }
    }
}

#[derive(Debug, Args)]
pub struct AttnMapArgs {
    #[command(flatten)]
    batch: BatchArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// Layer whose attention to show; negative counts from the end.
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    layer: i64,
    /// A head number (from 0), mean, or all (a grid of every head plus the mean).
    #[arg(long, default_value = "mean")]
    head: HeadChoice,
    /// Attention rollout through all layers instead of one layer's attention.
    #[arg(long, conflicts_with_all = ["layer", "head"])]
    rollout: bool,
    /// viridis, inferno, jet or gray.
    #[arg(long, default_value = "inferno")]
    colormap: String,
    /// Opacity of the heat map over the photo.
    #[arg(long, default_value_t = 0.6)]
    alpha: f32,
    /// The heat map alone, without the photo.
    #[arg(long)]
    raw: bool,
}

pub fn run(args: AttnMapArgs) -> Result<u8> {
    let colormap: Colormap = args.colormap.parse()?;
    if !(0.0..=1.0).contains(&args.alpha) {
        bail!("--alpha must be between 0 and 1, got {}", args.alpha);
    }
    let (jobs, rejected) = jobs::plan(&args.batch, &[])?;
    let model = args.model.load()?;
    let layer = model.resolve_layer(args.layer)?;
    if let HeadChoice::Index(h) = args.head
        && h >= model.config().num_heads
    {
        bail!(
            "--head {h} out of range: the model has {} heads (0..{})",
            model.config().num_heads,
            model.config().num_heads - 1
        );
    }
    batch::run(jobs, rejected, args.batch.jobs, args.batch.json, |job| map_one(&model, &args, layer, colormap, job))
}

/// The maps to draw, each with its tile label.
fn attention_maps(
    model: &Vit,
    args: &AttnMapArgs,
    layer: usize,
    photo: &DynamicImage,
) -> Result<Vec<(String, PatchMap)>> {
    let pixels = preprocess::model_input(photo, args.model.short_side(model), model.config().patch_size, &Device::Cpu)?;
    let capture = if args.rollout {
        Capture { head_mean_attention_layers: (0..model.config().num_layers).collect(), ..Capture::default() }
    } else {
        Capture { cls_attention_layers: vec![layer], ..Capture::default() }
    };
    let out = model.forward(&pixels, &capture)?;
    if args.rollout {
        return Ok(vec![("rollout".into(), attention::rollout(&out, model.config().num_layers)?)]);
    }
    let heads = attention::cls_attention(&out, layer)?;
    Ok(match args.head {
        HeadChoice::Index(h) => vec![(format!("h{h}"), heads[h].clone())],
        HeadChoice::Mean => vec![("mean".into(), attention::mean_map(&heads)?)],
        HeadChoice::All => {
            let mean = attention::mean_map(&heads)?;
            let mut maps: Vec<(String, PatchMap)> =
                heads.into_iter().enumerate().map(|(h, m)| (format!("h{h}"), m)).collect();
            maps.push(("mean".into(), mean));
            maps
        }
    })
}

fn map_one(model: &Vit, args: &AttnMapArgs, layer: usize, colormap: Colormap, job: &Job) -> Result<serde_json::Value> {
    let start = Instant::now();
    let photo = image_io::read_image(&job.source, args.batch.max_pixels)?;
    let (width, height) = (photo.width(), photo.height());
    // The photo under the heat map; --raw draws the map alone.
    let rgb = (!args.raw).then(|| preprocess::to_rgb(&photo));
    let maps = attention_maps(model, args, layer, &photo)?;
    let labelled = maps.len() > 1;
    let tiles: Vec<RgbImage> = maps
        .iter()
        .map(|(name, map)| {
            let pixels = map.min_max_normalized().upsample(width, height);
            let mut tile = render::heatmap(&pixels, colormap, rgb.as_ref(), args.alpha);
            if labelled {
                render::label(&mut tile, name);
            }
            tile
        })
        .collect();
    let picture = if labelled { render::tile_grid(&tiles) } else { tiles.into_iter().next().expect("one map") };
    image_io::write_png(&DynamicImage::ImageRgb8(picture), &job.out)?;
    Ok(json!({
        "input": job.source.display_name(),
        "outputs": { "attention": job.out.display_name() },
        "width": width,
        "height": height,
        "layer": if args.rollout { serde_json::Value::Null } else { json!(layer) },
        "head": match (args.rollout, args.head) {
            (true, _) => "rollout".to_string(),
            (false, HeadChoice::Index(h)) => h.to_string(),
            (false, HeadChoice::Mean) => "mean".to_string(),
            (false, HeadChoice::All) => "all".to_string(),
        },
        "ms": start.elapsed().as_secs_f64() * 1000.0,
    }))
}
