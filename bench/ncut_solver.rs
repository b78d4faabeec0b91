//! Normalized-cut eigen-solvers side by side: Lanczos (what `--head ncut`
//! uses) against a full dense eigendecomposition, on key-like features for
//! patch grids of growing size. Run: `cargo bench --bench ncut_solver`.

#[path = "timing.rs"]
mod timing;

use segattn::head::{Affinity, fiedler_vector, fiedler_vector_dense};
use timing::median_ms;

/// Features of a blob object on a background, with deterministic noise.
fn features(side: usize) -> Vec<Vec<f32>> {
    let mut state = 0x2545_f491_u32;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state as f32 / u32::MAX as f32) - 0.5
    };
    (0..side * side)
        .map(|i| {
            let (r, c) = ((i / side) as f32 / side as f32 - 0.5, (i % side) as f32 / side as f32 - 0.4);
            let object = r * r + c * c < 0.06;
            (0..64).map(|k| if (k % 2 == 0) == object { 1.0 } else { 0.0 } + noise()).collect()
        })
        .collect()
}

fn main() {
    println!("{:>8} {:>12} {:>12} {:>8}", "patches", "lanczos ms", "dense ms", "ratio");
    for side in [20, 30, 45, 60] {
        let affinity = Affinity::from_features(&features(side), 0.2);
        let lanczos = median_ms(3, || drop(fiedler_vector(&affinity).unwrap()));
        let dense_runs = if side >= 45 { 1 } else { 3 };
        let dense = median_ms(dense_runs, || drop(fiedler_vector_dense(&affinity).unwrap()));
        println!("{:>8} {:>12.1} {:>12.1} {:>8.3}", side * side, lanczos, dense, lanczos / dense);
    }
}
