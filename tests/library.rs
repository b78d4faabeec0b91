//! The README's library example, as written there.

use segattn::{head, image_io, model::Vit, render};

#[test]
fn readme_library_example_runs() -> anyhow::Result<()> {
    std::env::set_current_dir(env!("CARGO_MANIFEST_DIR"))?;
    let model = Vit::builtin()?;
    let own_head = head::own_head(&model)?.expect("segattn-s16 carries its head");
    let photo = image_io::read_image(&image_io::Source::File("samples/cat.jpg".into()), image_io::Decoding::default())?;
    let soft = head::segment(&model, own_head.as_ref(), &photo, 224)?;
    let mask = render::mask(&soft.to_pixels(photo.width(), photo.height()), 0.5, false);
    assert_eq!(mask.dimensions(), (451, 300));
    // 14 x 21 patches of 16 pixels: the decoder's logits are at 4x that.
    assert_eq!((soft.patches.grid.rows, soft.patches.grid.cols), (56, 84));
    Ok(())
}

/// A patch's attention row, recomputed from the queries and keys that
/// `serve` captures beside the class token's row, is that row of the full
/// matrix the encoder computes: with and without register tokens.
#[test]
fn a_patch_row_from_queries_and_keys_is_the_full_matrix_row() -> anyhow::Result<()> {
    use segattn::attention;
    use segattn::model::{Capture, Keep};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let photo =
        image_io::read_image(&image_io::Source::File(root.join("samples/cat.jpg")), image_io::Decoding::default())?;
    for fixture in ["dino_vit", "dinov2_reg"] {
        let model = Vit::load(&root.join("tests/fixtures").join(fixture))?;
        let pixels = segattn::preprocess::model_input(&photo, 56, model.config().patch_size)?;
        let layer = 1;
        let served = model.forward(&pixels, &Capture::attention([layer], Keep::ClsRow).and_qkv(layer))?;
        let full = model.forward(&pixels, &Capture::attention([layer], Keep::Full))?;
        let matrix = full.attention(layer).expect("captured").get(0)?;
        let keys = attention::LayerKeys::of(&served)?;
        assert!(keys.patch_attention(served.grid.len()).is_err());
        for patch in [0, served.grid.len() / 2, served.grid.len() - 1] {
            let rows = keys.patch_attention(patch)?;
            let token = full.num_prefix_tokens + patch;
            for (head, row) in rows.iter().enumerate() {
                let expected = matrix.get(head)?.get(token)?.narrow(0, full.num_prefix_tokens, full.grid.len())?;
                for (a, b) in row.values.iter().zip(expected.to_vec1::<f32>()?) {
                    assert!((a - b).abs() < 1e-5, "{fixture} patch {patch} head {head}: {a} vs {b}");
                }
            }
        }
    }
    Ok(())
}
