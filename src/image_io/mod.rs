//! Reading photos safely (`mod.rs`) and encoding PNGs that say who wrote
//! them (`png`).

mod png;

pub use png::{encode_png, is_segattn_output};

use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use image::{DynamicImage, GrayImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};
use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

/// Default decoding budget: 100 megapixels.
pub const DEFAULT_MAX_PIXELS: u64 = 100_000_000;

/// The faults of a photo that a caller may answer in its own way (the
/// command line names the flag that changes the rule; the server picks a
/// status). Every other fault is an error of its own words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// None of the formats read here.
    UnknownFormat,
    /// Over the pixel limit, as the header says: nothing was decoded.
    TooManyPixels { width: u32, height: u32, limit: u64 },
    /// A JPEG whose data ends early or does not parse, decoded strictly.
    DamagedJpeg(String),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::UnknownFormat => f.write_str("not a supported image (jpeg, png, webp, bmp, tiff, gif)"),
            DecodeError::TooManyPixels { width, height, limit } => {
                let pixels = u64::from(*width) * u64::from(*height);
                write!(f, "image is {width}x{height} ({pixels} pixels), over the limit of {limit}")
            }
            DecodeError::DamagedJpeg(why) => write!(f, "damaged JPEG ({why})"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    File(PathBuf),
    Stdin,
}

impl Source {
    pub fn from_arg(arg: &Path) -> Self {
        if arg == Path::new("-") { Source::Stdin } else { Source::File(arg.to_path_buf()) }
    }

    /// The name used in messages and for output file names.
    pub fn display_name(&self) -> String {
        match self {
            Source::File(path) => path.display().to_string(),
            Source::Stdin => "<stdin>".to_string(),
        }
    }

    /// The whole file or stream, if it is at most `limit` bytes: a device
    /// that never ends (`/dev/zero`) or a file far larger than any photo is
    /// an error, not all of memory.
    pub fn read_bytes(&self, limit: u64) -> Result<Vec<u8>> {
        let too_large = || anyhow::anyhow!("over {limit} bytes, more than any photo within the pixel limit takes");
        let mut bytes = Vec::new();
        match self {
            Source::File(path) => {
                let file = std::fs::File::open(path).context("cannot read file")?;
                if file.metadata().is_ok_and(|m| m.is_file() && m.len() > limit) {
                    return Err(too_large());
                }
                file.take(limit + 1).read_to_end(&mut bytes).context("cannot read file")?;
            }
            Source::Stdin => {
                std::io::stdin()
                    .lock()
                    .take(limit + 1)
                    .read_to_end(&mut bytes)
                    .context("cannot read standard input")?;
            }
        }
        if bytes.len() as u64 > limit {
            return Err(too_large());
        }
        Ok(bytes)
    }
}

/// How photos are decoded: the size budget, and whether damage is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoding {
    /// Images with more pixels are refused, from their header.
    pub max_pixels: u64,
    /// Decode damaged JPEGs as far as they go (grey below the damage, as
    /// browsers show them) instead of refusing them.
    pub lenient: bool,
}

impl Decoding {
    pub fn strict(max_pixels: u64) -> Self {
        Decoding { max_pixels, lenient: false }
    }

    /// The most bytes a photo within `max_pixels` is read as: 8 bytes a
    /// pixel (16-bit RGBA, uncompressed) and room for metadata.
    pub fn max_bytes(&self) -> u64 {
        self.max_pixels.saturating_mul(8).saturating_add(64 << 20)
    }
}

impl Default for Decoding {
    fn default() -> Self {
        Decoding::strict(DEFAULT_MAX_PIXELS)
    }
}

/// Decodes `bytes` as an upright image (EXIF orientation applied). The size
/// is checked against `max_pixels` from the header, before any pixel buffer
/// is allocated. A truncated or corrupt JPEG is an error unless `lenient`:
/// the image crate's decoder fills what it cannot read with grey, which
/// would become a confident mask of nothing.
pub fn decode(bytes: &[u8], decoding: Decoding) -> Result<DynamicImage> {
    if bytes.is_empty() {
        bail!("empty file");
    }
    let reader = || ImageReader::new(Cursor::new(bytes)).with_guessed_format();
    let probe = reader().context("cannot read image")?;
    let Some(format) = probe.format() else {
        return Err(DecodeError::UnknownFormat.into());
    };
    let (width, height) = probe.into_dimensions().context("cannot decode image")?;
    let pixels = u64::from(width) * u64::from(height);
    let max_pixels = decoding.max_pixels;
    if pixels > max_pixels {
        return Err(DecodeError::TooManyPixels { width, height, limit: max_pixels }.into());
    }
    if pixels == 0 {
        bail!("image has no pixels ({width}x{height})");
    }
    let mut reader = reader()?;
    let mut limits = Limits::default();
    // Room for the largest decoded buffer: 4 channels of 32-bit floats.
    limits.max_alloc = Some(pixels.saturating_mul(16).max(1 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().context("cannot decode image")?;
    // An allocation that fails aborts the process, and the whole batch with
    // it: try the decoded image's size, and a copy of it, first, so memory
    // that is not there (a ulimit, a small machine) is this photo's error.
    let needed = decoder.total_bytes().saturating_mul(2);
    if usize::try_from(needed).map_or(true, |n| Vec::<u8>::new().try_reserve_exact(n).is_err()) {
        bail!("image is {width}x{height}: the {needed} bytes of memory to decode it cannot be had");
    }
    let orientation = decoder.orientation().context("cannot read EXIF orientation")?;
    let mut image = if format == ImageFormat::Jpeg && !decoding.lenient {
        decode_jpeg_strictly(bytes)?
    } else {
        DynamicImage::from_decoder(decoder).context("cannot decode image")?
    };
    image.apply_orientation(orientation);
    Ok(image)
}

/// A JPEG decoded by the same decoder the image crate uses, in its strict
/// mode: data that ends early or does not parse is an error.
fn decode_jpeg_strictly(bytes: &[u8]) -> Result<DynamicImage> {
    let damaged = |err: zune_jpeg::errors::DecodeErrors| anyhow::Error::new(DecodeError::DamagedJpeg(err.to_string()));
    let options = DecoderOptions::default().set_strict_mode(true).set_max_width(usize::MAX).set_max_height(usize::MAX);
    let mut decoder = JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    decoder.decode_headers().map_err(damaged)?;
    let gray = decoder.input_colorspace() == Some(ColorSpace::Luma);
    let out = if gray { ColorSpace::Luma } else { ColorSpace::RGB };
    decoder.set_options(options.jpeg_set_out_colorspace(out));
    let pixels = decoder.decode().map_err(damaged)?;
    let (width, height) = decoder.dimensions().context("JPEG without dimensions")?;
    let (width, height) = (width as u32, height as u32);
    let image = if gray {
        GrayImage::from_raw(width, height, pixels).map(DynamicImage::ImageLuma8)
    } else {
        RgbImage::from_raw(width, height, pixels).map(DynamicImage::ImageRgb8)
    };
    image.context("JPEG decoder returned the wrong number of pixels")
}

/// Reads and decodes one input.
pub fn read_image(source: &Source, decoding: Decoding) -> Result<DynamicImage> {
    decode(&source.read_bytes(decoding.max_bytes())?, decoding)
}
