//! `segattn attn-map`: where the class token looks.

use std::str::FromStr;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use image::{DynamicImage, RgbImage};
use serde_json::json;

use super::jobs::Job;
use super::output::Committed;
use super::{BatchArgs, ModelArgs, batch, jobs, values};
use crate::attention;
use crate::image_io;
use crate::maps::PatchMap;
use crate::model::{Capture, Keep, Vit};
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
    /// A head number (from 0), mean, or all (a grid of every head plus the
    /// mean, scaled down to fit 16 megapixels).
    #[arg(long, default_value = "mean")]
    head: HeadChoice,
    /// Attention rollout through all layers instead of one layer's attention.
    #[arg(long, conflicts_with_all = ["layer", "head"])]
    rollout: bool,
    #[arg(long, value_enum, default_value_t = Colormap::Inferno)]
    colormap: Colormap,
    /// Opacity of the heat map over the photo, 0 to 1.
    #[arg(long, default_value_t = 0.6, allow_negative_numbers = true, value_parser = values::unit_interval)]
    alpha: f32,
    /// The heat map alone, without the photo.
    #[arg(long)]
    raw: bool,
}

pub fn run(args: AttnMapArgs) -> Result<u8> {
    let plan = jobs::plan(&args.batch, &[])?;
    let model = args.model.load()?;
    let model_files = ModelArgs::files_of(&model);
    jobs::refuse_to_write_over(plan.jobs.iter().flat_map(Job::output_files), model_files.iter().copied())?;
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
    batch::run(plan, &args.batch, &model_files, |job| map_one(&model, &args, layer, job))
}

/// The maps to draw, each with its tile label.
fn attention_maps(
    model: &Vit,
    args: &AttnMapArgs,
    layer: usize,
    photo: &DynamicImage,
) -> Result<Vec<(String, PatchMap)>> {
    let pixels = preprocess::model_input(photo, args.model.short_side(model), model.config().patch_size)?;
    let capture = if args.rollout {
        Capture::attention(0..model.config().num_layers, Keep::HeadMean)
    } else {
        Capture::attention([layer], Keep::ClsRow)
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

/// The largest grid `--head all` draws, in pixels: each tile is scaled down
/// to fit. At the photo's size, a grid of 7 tiles of a 32-megapixel photo
/// would be a 288-megapixel PNG that few programs (segattn included) open.
pub const GRID_MAX_PIXELS: u64 = 16_000_000;

/// The size of each tile so that `tiles` of them, laid out by
/// [`render::tile_grid`], stay within [`GRID_MAX_PIXELS`].
fn tile_size(width: u32, height: u32, tiles: usize) -> (u32, u32) {
    let columns = (tiles as f64).sqrt().ceil() as u64;
    let rows = (tiles as u64).div_ceil(columns);
    let grid = columns * rows * u64::from(width) * u64::from(height);
    if grid <= GRID_MAX_PIXELS {
        return (width, height);
    }
    let scale = (GRID_MAX_PIXELS as f64 / grid as f64).sqrt();
    let scaled = |side: u32| ((f64::from(side) * scale).floor() as u32).max(1);
    (scaled(width), scaled(height))
}

fn map_one(model: &Vit, args: &AttnMapArgs, layer: usize, job: &Job) -> Result<serde_json::Value> {
    let start = Instant::now();
    let photo = image_io::read_image(&job.source, args.batch.decoding())?;
    let (width, height) = (photo.width(), photo.height());
    let maps = attention_maps(model, args, layer, &photo)?;
    let labelled = maps.len() > 1;
    let (tile_width, tile_height) = if labelled { tile_size(width, height, maps.len()) } else { (width, height) };
    // The photo under the heat map; --raw draws the map alone.
    let rgb = (!args.raw).then(|| {
        let rgb = preprocess::to_rgb(&photo);
        if (tile_width, tile_height) == (width, height) {
            rgb
        } else {
            image::imageops::resize(&rgb, tile_width, tile_height, image::imageops::FilterType::Triangle)
        }
    });
    let tiles: Vec<RgbImage> = maps
        .iter()
        .map(|(name, map)| {
            let pixels = map.min_max_normalized().upsample(tile_width, tile_height);
            let mut tile = render::heatmap(&pixels, args.colormap, rgb.as_ref(), args.alpha);
            if labelled {
                render::label(&mut tile, name);
            }
            tile
        })
        .collect();
    let picture = if labelled { render::tile_grid(&tiles) } else { tiles.into_iter().next().expect("one map") };
    let mut writer = job.writer();
    writer.png(&DynamicImage::ImageRgb8(picture), &job.out)?;
    if writer.commit()? == Committed::FoundWritten {
        return Ok(json!({ "input": job.source.display_name(), "skipped": "written meanwhile by another run" }));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_of_large_photos_are_scaled_to_fit() {
        assert_eq!(tile_size(640, 480, 7), (640, 480));
        let (w, h) = tile_size(8000, 4000, 7);
        assert!(9 * u64::from(w) * u64::from(h) <= GRID_MAX_PIXELS, "{w}x{h}");
        assert!(9 * u64::from(w + 1) * u64::from(h + 1) > GRID_MAX_PIXELS, "{w}x{h} could be larger");
        assert_eq!((w as f64 / h as f64 * 100.0).round(), 200.0);
    }
}
