//! The README's library example, as written there.

use segattn::{head, image_io, model::Vit, render};

#[test]
fn readme_library_example_runs() -> anyhow::Result<()> {
    std::env::set_current_dir(env!("CARGO_MANIFEST_DIR"))?;
    let model = Vit::load("tests/fixtures/dino_vit".as_ref(), &candle_core::Device::Cpu)?;
    let photo = image_io::read_image(&image_io::Source::File("samples/cat.jpg".into()), image_io::DEFAULT_MAX_PIXELS)?;
    let soft = head::segment(&model, &head::AttentionMass::default(), &photo, 480)?;
    let mask = render::mask(&soft.to_pixels(photo.width(), photo.height()), 0.5, false);
    assert_eq!(mask.dimensions(), (451, 300));
    assert_eq!((soft.patches.grid.rows, soft.patches.grid.cols), (60, 90));
    Ok(())
}
