//! Reading photos safely and writing PNGs atomically.

use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{DynamicImage, ImageDecoder, ImageReader, Limits};

/// Default decoding budget: 100 megapixels.
pub const DEFAULT_MAX_PIXELS: u64 = 100_000_000;

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

    pub fn read_bytes(&self) -> Result<Vec<u8>> {
        match self {
            Source::File(path) => std::fs::read(path).context("cannot read file"),
            Source::Stdin => {
                let mut bytes = Vec::new();
                std::io::stdin().lock().read_to_end(&mut bytes).context("cannot read standard input")?;
                Ok(bytes)
            }
        }
    }
}

/// Decodes `bytes` as an upright image (EXIF orientation applied). The size
/// is checked against `max_pixels` from the header, before any pixel buffer
/// is allocated.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage> {
    if bytes.is_empty() {
        bail!("empty file");
    }
    let reader = || ImageReader::new(Cursor::new(bytes)).with_guessed_format();
    let probe = reader().context("cannot read image")?;
    if probe.format().is_none() {
        bail!("not a supported image (jpeg, png, webp, bmp, tiff, gif)");
    }
    let (width, height) = probe.into_dimensions().context("cannot decode image")?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        bail!("image is {width}x{height} ({pixels} pixels), over the limit of {max_pixels} (see --max-pixels)");
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
    let orientation = decoder.orientation().context("cannot read EXIF orientation")?;
    let mut image = DynamicImage::from_decoder(decoder).context("cannot decode image")?;
    image.apply_orientation(orientation);
    Ok(image)
}

/// Reads and decodes one input.
pub fn read_image(source: &Source, max_pixels: u64) -> Result<DynamicImage> {
    decode(&source.read_bytes()?, max_pixels)
}

/// PNG bytes of `image`, with the fast compression level: outputs are masks
/// and previews, and encoding time matters more than a few kilobytes.
pub fn encode_png(image: &DynamicImage) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let encoder = PngEncoder::new_with_quality(&mut bytes, CompressionType::Fast, FilterType::Adaptive);
    image.write_with_encoder(encoder).context("cannot encode PNG")?;
    Ok(bytes)
}

/// Where an output goes: a file, or standard output for `-`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    File(PathBuf),
    Stdout,
}

impl Sink {
    pub fn from_arg(arg: &Path) -> Self {
        if arg == Path::new("-") { Sink::Stdout } else { Sink::File(arg.to_path_buf()) }
    }

    pub fn display_name(&self) -> String {
        match self {
            Sink::File(path) => path.display().to_string(),
            Sink::Stdout => "<stdout>".to_string(),
        }
    }
}

/// Writes `image` as PNG. A file is written to a temporary name in the same
/// directory and renamed into place, so a reader never sees half a PNG, even
/// when the process is killed mid-write.
pub fn write_png(image: &DynamicImage, sink: &Sink) -> Result<()> {
    let bytes = encode_png(image)?;
    match sink {
        Sink::Stdout => {
            let mut out = std::io::stdout().lock();
            out.write_all(&bytes).and_then(|()| out.flush()).context("cannot write to standard output")
        }
        Sink::File(path) => write_atomic(path, &bytes),
    }
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut temp = tempfile::Builder::new()
        .prefix(".segattn-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("{}: cannot create a file in {}", path.display(), dir.display()))?;
    temp.write_all(bytes).with_context(|| format!("{}: cannot write", path.display()))?;
    // Temporary files are created private; an output is an ordinary file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = temp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644));
    }
    temp.persist(path).map_err(|e| e.error).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}
