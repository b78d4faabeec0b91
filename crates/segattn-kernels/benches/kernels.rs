//! Median times of the kernels at ViT-S sizes (hidden 384, 6 heads of 64),
//! and the rate of the products: 197 tokens (224x224 at 16-pixel patches),
//! 1201 (480x640) and 4801 (480x640 at 8-pixel patches).
//!   cargo bench -p segattn-kernels [-- widest|avx2|portable|bf16]

use std::time::Instant;

use segattn_kernels::{self as kernels, Limit, Norm, PackedWeight, Precision};

fn values(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i as f32) * 0.618).sin()).collect()
}

/// Median milliseconds of `runs` calls after one warm-up.
fn time(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}

fn main() {
    let choice = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let (limit, precision) = match choice.as_deref() {
        Some("avx2") => (Limit::Avx2, Precision::F32),
        Some("portable") => (Limit::Portable, Precision::F32),
        Some("bf16") => (Limit::Widest, Precision::Bf16),
        _ => (Limit::Widest, Precision::F32),
    };
    kernels::set_limit(limit);
    let (matmul_kernel, attention_kernel) = kernels::kernel_names(precision, 64);
    println!("{limit:?}, {precision:?}: linear layers on {matmul_kernel}; attention on {attention_kernel}");
    let hidden = 384;
    let weight = |outputs, inputs| PackedWeight::new(precision, &values(outputs * inputs), outputs, inputs).unwrap();
    let qkv_weight = weight(3 * hidden, hidden);
    let fc1 = weight(4 * hidden, hidden);
    let (weight, bias) = (values(hidden), values(hidden));
    // 224x224 at 16-pixel patches, 480x640 at 16, and 480x640 at 8.
    for tokens in [197, 1201, 4801] {
        let x = values(tokens * hidden);
        let qkv = kernels::matmul(&x, &qkv_weight).unwrap();
        let runs = match tokens {
            0..1000 => 50,
            1000..2000 => 10,
            _ => 3,
        };
        // Multiply-adds count two floating-point operations; the passes
        // between products are memory-bound and get none.
        let products = |outputs: usize| 2.0 * (tokens * hidden * outputs) as f64;
        let rows = [
            ("qkv projection", products(3 * hidden), time(runs, || drop(kernels::matmul(&x, &qkv_weight).unwrap()))),
            ("fc1", products(4 * hidden), time(runs, || drop(kernels::matmul(&x, &fc1).unwrap()))),
            (
                "attention (QK, softmax, PV)",
                2.0 * products(tokens),
                time(runs, || drop(kernels::attention(&qkv, (1, tokens), 6, 0.125, true, precision).unwrap())),
            ),
            ("residual + LayerNorm", 0.0, {
                let mut update = x.clone();
                let norm = Norm { weight: &weight, bias: &bias, eps: 1e-6 };
                time(runs, || drop(kernels::residual_layer_norm(&x, &mut update, &bias, None, norm).unwrap()))
            }),
        ];
        for (name, flops, ms) in rows {
            let rate = if flops > 0.0 { format!("{:7.1} GFLOP/s", flops / ms / 1e6) } else { String::new() };
            println!("{tokens:>5} tokens  {name:<28} {ms:9.3} ms  {rate}");
        }
    }
}
