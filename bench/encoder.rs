//! segattn's side of the encoder benchmark (driven by `bench/run`): loads a
//! checkpoint, runs the encoder forward on random pixels, prints one JSON
//! line with the load time and the median forward time.
//!
//! cargo bench --bench encoder -- WEIGHTS HEIGHT WIDTH RUNS [cls|none|all] [f32|bf16]
//!
//! WEIGHTS `segattn-s16` is the built-in model. RUNS 0 times the load alone.

use std::time::Instant;

use candle_core::{Device, Tensor};
use segattn::model::{Capture, Keep, PanelCache, Precision, Vit, builtin};

fn main() -> anyhow::Result<()> {
    // SAFETY: first statement of main; no other thread exists yet.
    unsafe { segattn::configure_runtime() };
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let [weights, height, width, runs, ..] = &args[..] else {
        anyhow::bail!("usage: encoder WEIGHTS HEIGHT WIDTH RUNS [cls|none|all] [f32|bf16]");
    };
    let (height, width, runs): (usize, usize, usize) = (height.parse()?, width.parse()?, runs.parse()?);
    let precision = match args.get(5).map(String::as_str) {
        Some("bf16") => Precision::Bf16,
        _ => Precision::F32,
    };
    let start = Instant::now();
    let model = match weights.as_str() {
        builtin::NAME => Vit::builtin_in(precision)?,
        path => Vit::load_cached(path.as_ref(), precision, PanelCache::from_env().as_ref())?,
    };
    let load_ms = start.elapsed().as_secs_f64() * 1000.0;
    let last = model.config().num_layers - 1;
    // What the attention-mass head asks for, by default.
    let capture = match args.get(4).map(String::as_str) {
        Some("none") => Capture::default(),
        Some("all") => Capture::attention(0..=last, Keep::Full),
        _ => Capture::attention([last], Keep::ClsRow),
    };
    if runs == 0 {
        let (precision, cached) = (model.precision(), model.weights_from_cache());
        println!("{{\"load_ms\": {load_ms:.2}, \"precision\": \"{precision:?}\", \"weights_from_cache\": {cached}}}");
        return Ok(());
    }
    let pixels = Tensor::randn(0f32, 1.0, (1, 3, height, width), &Device::Cpu)?;
    model.forward(&pixels, &capture)?;
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            model.forward(&pixels, &capture).map(|_| start.elapsed().as_secs_f64() * 1000.0)
        })
        .collect::<Result<_, _>>()?;
    times.sort_by(f64::total_cmp);
    println!(
        "{{\"load_ms\": {load_ms:.2}, \"median_ms\": {:.2}, \"runs\": {runs}, \"tokens\": {}, \"precision\": \"{:?}\"}}",
        times[runs / 2],
        (height / model.config().patch_size) * (width / model.config().patch_size) + model.config().num_prefix_tokens(),
        model.precision()
    );
    Ok(())
}
