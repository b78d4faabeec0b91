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
