//! Where an encoder layer's time goes on this CPU, stage by stage, at ViT-S
//! sizes (hidden 384, 6 heads of 64): 197 tokens (224x224 at 16-pixel
//! patches), 785 (224x224 at 8-pixel patches), 1201 (480x640) and 4801
//! (480x640 at 8-pixel patches). Each
//! product's rate is given against the CPU's peak, measured here: the clock
//! from a chain of dependent adds, the FMA rate from independent FMAs of the
//! products' instruction set.
//!
//!   cargo bench --bench stages [-- widest|avx2|portable|bf16]

#[path = "timing.rs"]
mod timing;

use segattn_kernels::{self as kernels, Limit, Norm, PackedWeight, Precision, Stage};
use timing::median_ms;

const HIDDEN: usize = 384;
const HEADS: usize = 6;

/// Layers of a ViT-S encoder, each with weights of its own.
const LAYERS: usize = 12;

struct LayerWeights {
    qkv: PackedWeight,
    proj: PackedWeight,
    fc1: PackedWeight,
    fc2: PackedWeight,
}

fn values(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i as f32) * 0.618).sin()).collect()
}

/// Median milliseconds of `runs` calls after a warm-up of 100 ms or one
/// call, whichever is longer: a core that has been idle (as the pool's
/// other threads are while the peak is measured on one) can take tens of
/// milliseconds to reach its clock, and a small stage timed before then ran
/// at 0.9 ms where it takes 0.5.
fn time(runs: usize, mut f: impl FnMut()) -> f64 {
    // The pool's other threads awake between the calls, as the encoder keeps
    // them between its layers' stages.
    let _awake = kernels::KeepAwake::start();
    let start = std::time::Instant::now();
    f();
    while start.elapsed().as_millis() < 100 {
        f();
    }
    median_ms(runs, f)
}

fn cpu_name() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let name = cpuinfo.lines().find_map(|line| line.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim()));
    name.unwrap_or("unknown CPU").to_string()
}

fn main() {
    // The allocator as segattn runs it: freed buffers kept for reuse, not
    // unmapped, so that no stage pays page faults the product does not.
    // SAFETY: first statement of main; no other thread exists yet.
    unsafe { segattn::configure_runtime() };
    let choice = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let (limit, precision) = match choice.as_deref() {
        Some("avx2") => (Limit::Avx2, Precision::F32),
        Some("portable") => (Limit::Portable, Precision::F32),
        Some("bf16") => (Limit::Widest, Precision::Bf16),
        _ => (Limit::Widest, Precision::F32),
    };
    kernels::set_limit(limit);
    let threads = rayon::current_num_threads();
    let (matmul_kernel, attention_kernel) = kernels::kernel_names(precision, HIDDEN / HEADS);
    println!("{}, {threads} threads; {limit:?}, {precision:?}", cpu_name());
    println!("linear layers on {matmul_kernel}; attention on {attention_kernel}");
    if let Some(why) = precision.unavailable_because() {
        println!("{precision:?} does not run here ({why}): the table is f32's");
    }
    let caches = kernels::caches();
    println!(
        "caches: L1d {} KiB, L2 {} KiB, L3 {} KiB, shared ({})",
        caches.l1d >> 10,
        caches.l2 >> 10,
        caches.l3 >> 10,
        caches.source
    );
    let peak = kernels::measure_peak(precision);
    // The pool's threads each on a core of their own: the peak of `threads` cores.
    let peak_gflops = peak.map(|peak| peak.flops_per_second * threads as f64 / 1e9);
    match peak {
        Some(peak) => println!(
            "peak: clock {:.2} GHz (a chain of dependent adds) x {:.2} vector FMAs a cycle (independent FMAs) x {} \
             lanes x 2 = {:.1} FLOP a cycle a core; {:.0} GFLOP/s on {threads} cores",
            peak.clock_hz / 1e9,
            peak.fmas_per_cycle(),
            peak.lanes,
            peak.flops_per_cycle(),
            peak_gflops.unwrap_or_default(),
        ),
        None => println!("peak: not measured (the gemm crate's kernels run here)"),
    }
    let weight = |outputs, inputs| PackedWeight::new(precision, &values(outputs * inputs), outputs, inputs).unwrap();
    let (qkv_weight, proj, fc1, fc2) =
        (weight(3 * HIDDEN, HIDDEN), weight(HIDDEN, HIDDEN), weight(4 * HIDDEN, HIDDEN), weight(HIDDEN, 4 * HIDDEN));
    let (norm_weight, bias, qkv_bias, fc1_bias) =
        (values(HIDDEN), values(HIDDEN), values(3 * HIDDEN), values(4 * HIDDEN));
    let norm = Norm { weight: &norm_weight, bias: &bias, eps: 1e-6 };
    let layers: Vec<LayerWeights> = (0..LAYERS)
        .map(|_| LayerWeights {
            qkv: weight(3 * HIDDEN, HIDDEN),
            proj: weight(HIDDEN, HIDDEN),
            fc1: weight(4 * HIDDEN, HIDDEN),
            fc2: weight(HIDDEN, 4 * HIDDEN),
        })
        .collect();
    println!(
        "\n{:>6}  {:<28}{:>10}{:>8}{:>10}{:>8}",
        "tokens", "stage of one layer", "ms", "share", "GFLOP/s", "% peak"
    );
    // On a thread of the pool, as the encoder runs its layers: each product
    // and pass then shares its work out from inside the pool.
    rayon::scope(|_| {
        for tokens in [197, 785, 1201, 4801] {
            let runs = match tokens {
                0..1000 => 50,
                1000..2000 => 10,
                _ => 3,
            };
            let x = values(tokens * HIDDEN);
            let mlp_hidden = values(tokens * 4 * HIDDEN);
            let qkv = kernels::matmul(&x, &qkv_weight).unwrap();
            // A multiply-add counts two operations; the passes between the
            // products are memory-bound and are given none.
            let product_flops = |outputs: usize, inputs: usize| 2.0 * (tokens * inputs * outputs) as f64;
            let attention_product_flops = product_flops(tokens, HIDDEN);
            let attention_ms =
                time(runs, || drop(kernels::attention(&qkv, (1, tokens), HEADS, 0.125, true, precision).unwrap()));
            // The stages' shares of the attention's thread time, from a run that
            // laps a stopwatch, give its wall time out to them.
            let (_, stage_times) = kernels::timed_attention(&qkv, (1, tokens), HEADS, 0.125, precision).unwrap();
            let share = |stage: Stage| stage_times.get(stage).as_secs_f64() / stage_times.total().as_secs_f64();
            let mut rows: Vec<(&str, f64, f64)> = vec![
                (
                    "qkv projection + bias",
                    product_flops(3 * HIDDEN, HIDDEN),
                    time(runs, || drop(kernels::linear(&x, &qkv_weight, &qkv_bias))),
                ),
                ("attention", 2.0 * attention_product_flops, attention_ms),
            ];
            for (stage, name, flops) in [
                (Stage::Pack, "  pack K, V", 0.0),
                (Stage::Scores, "  Q Kᵀ", attention_product_flops),
                (Stage::Softmax, "  softmax", 0.0),
                (Stage::Mix, "  P V", attention_product_flops),
            ] {
                rows.push((name, flops, attention_ms * share(stage)));
            }
            rows.extend([
                ("output projection", product_flops(HIDDEN, HIDDEN), time(runs, || drop(kernels::matmul(&x, &proj)))),
                (
                    "fc1 + bias + GELU",
                    product_flops(4 * HIDDEN, HIDDEN),
                    time(runs, || drop(kernels::linear_gelu(&x, &fc1, &fc1_bias))),
                ),
                ("fc2", product_flops(HIDDEN, 4 * HIDDEN), time(runs, || drop(kernels::matmul(&mlp_hidden, &fc2)))),
                ("residual + LayerNorm, twice", 0.0, {
                    let mut update = x.clone();
                    2.0 * time(runs, || drop(kernels::residual_layer_norm(&x, &mut update, &bias, None, norm).unwrap()))
                }),
            ]);
            let layer_ms: f64 = rows.iter().filter(|(name, ..)| !name.starts_with(' ')).map(|(_, _, ms)| ms).sum();
            for (name, flops, ms) in rows {
                let (mut rate, mut of_peak) = (String::new(), String::new());
                if flops > 0.0 {
                    let gflops = flops / ms / 1e6;
                    rate = format!("{gflops:.1}");
                    of_peak = peak_gflops.map(|peak| format!("{:.0}", 100.0 * gflops / peak)).unwrap_or_default();
                }
                println!("{tokens:>6}  {name:<28}{ms:>10.3}{:>7.1}%{rate:>10}{of_peak:>8}", 100.0 * ms / layer_ms);
            }
            println!("{tokens:>6}  {:<28}{layer_ms:>10.3}", "layer");
            // The stages above run on weights and inputs that their repeats
            // keep in cache; an encoder's layers each bring their own weights
            // (7 MB in f32), more in all than some CPUs' L3 holds, and each
            // stage reads what the one before wrote.
            let chained_ms = time(runs.div_ceil(LAYERS), || {
                // The residual stream, and its LayerNorm that the next layer reads.
                let (mut stream, mut normed) = (x.clone(), x.clone());
                for weights in &layers {
                    let qkv = kernels::linear(&normed, &weights.qkv, &qkv_bias).unwrap();
                    let mixed = kernels::attention(&qkv, (1, tokens), HEADS, 0.125, false, precision).unwrap();
                    let mut attended = kernels::matmul(&mixed.mixed, &weights.proj).unwrap();
                    let normed_mid = kernels::residual_layer_norm(&stream, &mut attended, &bias, None, norm).unwrap();
                    let hidden = kernels::linear_gelu(&normed_mid, &weights.fc1, &fc1_bias).unwrap();
                    let mut mlp_out = kernels::matmul(&hidden, &weights.fc2).unwrap();
                    normed = kernels::residual_layer_norm(&attended, &mut mlp_out, &bias, None, norm).unwrap();
                    stream = mlp_out;
                }
            }) / LAYERS as f64;
            println!(
                "{tokens:>6}  {:<28}{chained_ms:>10.3}  ({:.2}x the stages' sum)",
                "layer, in an encoder",
                chained_ms / layer_ms
            );
        }
    });
}
