//! The endpoints: what each request asks for, checked as the command line
//! checks its flags, and the picture or JSON that answers it. Nothing here
//! touches the file system: a photo comes in the body, a picture goes back.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Result;
use image::DynamicImage;
use serde_json::json;

use super::http::{Request, Response, multipart_field};
use crate::attention::{self, LayerKeys};
use crate::head::{self, AttentionMass, DecoderHead, LinearHead, NormalizedCut, SegmentationHead};
use crate::image_io::{self, DecodeError, Decoding};
use crate::maps::PatchMap;
use crate::model::{Capture, Keep, Vit};
use crate::preprocess;
use crate::render::{self, Colormap};

/// A request's fault, with the status that names it.
pub struct Refused {
    pub status: u16,
    pub message: String,
}

fn refuse(status: u16, message: impl Into<String>) -> Refused {
    Refused { status, message: message.into() }
}

fn unprocessable(message: impl Into<String>) -> Refused {
    refuse(422, message)
}

/// The loaded model and its heads, shared by every request.
pub struct Service {
    pub model: Vit,
    own_head: Option<Box<dyn SegmentationHead>>,
    decoder: Option<DecoderHead>,
    linear: Option<LinearHead>,
    default_size: usize,
    max_pixels: u64,
    model_name: String,
    /// The queries and keys of layers whose patches were asked for lately,
    /// by photo, size and layer: pointing at patch after patch of one photo
    /// (the page does) costs a row each, not an encoder pass each.
    recent_keys: Mutex<VecDeque<Arc<PatchKeys>>>,
}

/// What a photo's patch rows are computed from, and what they were asked
/// for with (the photo's very bytes: a hash could be made to collide).
struct PatchKeys {
    body: Vec<u8>,
    size: usize,
    layer: usize,
    keys: LayerKeys,
    width: u32,
    height: u32,
}

/// Layers of photos kept in [`Service::recent_keys`]: a ViT-S/8 layer of a
/// 640x480 photo is some 15 MB.
const RECENT_KEYS: usize = 4;

impl Service {
    /// `model` as `model_name`, fed photos at a short side of `default_size`
    /// unless a request asks for another.
    pub fn new(model: Vit, model_name: String, default_size: usize, max_pixels: u64) -> Result<Self> {
        Ok(Self {
            own_head: head::own_head(&model)?,
            decoder: DecoderHead::bundled(&model)?,
            linear: LinearHead::bundled(&model)?,
            model,
            default_size,
            max_pixels,
            model_name,
            recent_keys: Mutex::new(VecDeque::new()),
        })
    }

    fn short_side(&self, request: &Request) -> Result<usize, Refused> {
        let size = number(request, "size", self.default_size)?;
        if !(32..=4096).contains(&size) {
            return Err(unprocessable(format!("size must be from 32 to 4096, got {size}")));
        }
        Ok(size)
    }

    /// The photo of a request: the body, or its multipart field `file`.
    fn photo(&self, request: &Request) -> Result<DynamicImage, Refused> {
        let content_type = request.header("content-type").unwrap_or_default();
        let bytes = if content_type.to_ascii_lowercase().starts_with("multipart/form-data") {
            multipart_field(&request.body, content_type, "file")
                .ok_or_else(|| refuse(400, "a multipart body without a field named file"))?
        } else {
            &request.body[..]
        };
        if bytes.is_empty() {
            return Err(refuse(400, "no photo in the request body"));
        }
        image_io::decode(bytes, Decoding::strict(self.max_pixels)).map_err(|e| {
            let status = match e.downcast_ref::<DecodeError>() {
                Some(DecodeError::UnknownFormat) => 415,
                Some(DecodeError::TooManyPixels { .. }) => 413,
                _ => 400,
            };
            refuse(status, format!("{e:#}"))
        })
    }

    fn head(&self, request: &Request) -> Result<(&'static str, Box<dyn SegmentationHead + '_>), Refused> {
        let named = request.param("head");
        let missing = |what: &str| unprocessable(format!("head {what}: this model carries none"));
        Ok(match named {
            None if self.own_head.is_some() => {
                let name = if self.decoder.is_some() { "decoder" } else { "linear" };
                (name, Box::new(Borrowed(self.own_head.as_deref().expect("checked"))))
            }
            None | Some("attn") => ("attn", Box::new(AttentionMass::default())),
            Some("ncut") => {
                ("ncut", Box::new(NormalizedCut::for_model(&self.model).map_err(|e| refuse(500, format!("{e:#}")))?))
            }
            Some("decoder") => {
                ("decoder", Box::new(Borrowed(self.decoder.as_ref().ok_or_else(|| missing("decoder"))?)))
            }
            Some("linear") => ("linear", Box::new(Borrowed(self.linear.as_ref().ok_or_else(|| missing("linear"))?))),
            Some(other) => {
                return Err(unprocessable(format!("head must be attn, ncut, decoder or linear, got {other:?}")));
            }
        })
    }

    /// `POST /v1/segment`.
    pub fn segment(&self, request: &Request) -> Result<Response, Refused> {
        let start = Instant::now();
        let output = request.param("output").unwrap_or("mask");
        if !["mask", "soft", "overlay", "cutout"].contains(&output) {
            return Err(unprocessable(format!("output must be mask, soft, overlay or cutout, got {output:?}")));
        }
        let threshold: f32 = number(request, "threshold", 0.5)?;
        if !(0.0..=1.0).contains(&threshold) {
            return Err(unprocessable(format!("threshold must be from 0 to 1, got {threshold}")));
        }
        let refine = flag(request, "refine")?;
        let size = self.short_side(request)?;
        let (head_name, head) = self.head(request)?;
        let photo = self.photo(request)?;
        let map = head::segment(&self.model, head.as_ref(), &photo, size).map_err(|e| refuse(500, format!("{e:#}")))?;
        let mut soft = map.to_pixels(photo.width(), photo.height());
        if refine {
            soft = head::refine_to_photo(&self.model, &soft, &photo, size);
        }
        let binary = render::mask(&soft, threshold, false);
        if wants_json(request) {
            let (area, bbox) = render::mask_stats(&binary);
            return Ok(Response::json(
                200,
                &json!({
                    "width": photo.width(),
                    "height": photo.height(),
                    "head": head_name,
                    "mask_area": area,
                    "bbox": bbox,
                    "ms": start.elapsed().as_secs_f64() * 1000.0,
                }),
            ));
        }
        let picture = match output {
            "soft" => DynamicImage::ImageLuma8(render::mask(&soft, threshold, true)),
            "overlay" => DynamicImage::ImageRgb8(render::overlay(&preprocess::to_rgb(&photo), &binary)),
            "cutout" => {
                let soft_mask = render::mask(&soft, threshold, true);
                DynamicImage::ImageRgba8(render::cutout(&preprocess::to_rgb(&photo), &soft_mask))
            }
            _ => DynamicImage::ImageLuma8(binary),
        };
        png(&picture)
    }

    /// `POST /v1/attention`: a heat map, or with `Accept: application/json`
    /// one layer's maps as numbers: the class token's per head, or with
    /// `patch=i` that patch's own.
    pub fn attention(&self, request: &Request) -> Result<Response, Refused> {
        let config = self.model.config();
        let layer = match request.param("layer") {
            None => config.num_layers - 1,
            Some(text) => {
                let layer: i64 = text.parse().map_err(|_| unprocessable(format!("layer {text:?} is not a number")))?;
                self.model.resolve_layer(layer).map_err(|e| unprocessable(format!("{e:#}")))?
            }
        };
        let rollout = flag(request, "rollout")?;
        let head_choice = match request.param("head") {
            None | Some("mean") => None,
            Some(text) => match text.parse::<usize>() {
                Ok(h) if h < config.num_heads => Some(h),
                _ => {
                    let last = config.num_heads - 1;
                    return Err(unprocessable(format!("head must be mean or 0 to {last}, got {text:?}")));
                }
            },
        };
        let patch = match request.param("patch") {
            None => None,
            Some(text) => {
                Some(text.parse::<usize>().map_err(|_| unprocessable(format!("patch {text:?} is not a number")))?)
            }
        };
        let colormap = match request.param("colormap").unwrap_or("inferno") {
            "inferno" => Colormap::Inferno,
            "viridis" => Colormap::Viridis,
            "jet" => Colormap::Jet,
            "gray" => Colormap::Gray,
            other => {
                return Err(unprocessable(format!("colormap must be inferno, viridis, jet or gray, got {other:?}")));
            }
        };
        let raw = flag(request, "raw")?;
        let size = self.short_side(request)?;
        // Rollout is every layer's, averaged over heads, from the class token.
        if rollout && ["layer", "head", "patch"].iter().any(|name| request.param(name).is_some()) {
            return Err(unprocessable(
                "rollout goes through every layer and head, from the class token: \
                it takes no layer, head or patch",
            ));
        }
        let failed = |e: anyhow::Error| refuse(500, format!("{e:#}"));

        let (heads, grid, (width, height), photo) = if let Some(p) = patch {
            let (keys, photo) = self.patch_keys(request, size, layer)?;
            if p >= keys.keys.grid().len() {
                return Err(unprocessable(format!(
                    "patch must be below {}, the patches of this photo",
                    keys.keys.grid().len()
                )));
            }
            let heads = keys.keys.patch_attention(p).map_err(failed)?;
            (heads, keys.keys.grid(), (keys.width, keys.height), photo)
        } else {
            let photo = self.photo(request)?;
            let pixels = preprocess::model_input(&photo, size, config.patch_size).map_err(failed)?;
            let capture = if rollout {
                Capture::attention(0..config.num_layers, Keep::HeadMean)
            } else {
                Capture::attention([layer], Keep::ClsRow)
            };
            let out = self.model.forward(&pixels, &capture).map_err(failed)?;
            let heads = if rollout {
                vec![attention::rollout(&out, config.num_layers).map_err(failed)?]
            } else {
                attention::cls_attention(&out, layer).map_err(failed)?
            };
            (heads, out.grid, (photo.width(), photo.height()), Some(photo))
        };
        let mean = attention::mean_map(&heads).map_err(failed)?;
        if wants_json(request) {
            // Each map min-max scaled to 0..255: a 4,800-patch layer of six
            // heads is some 100 KB of JSON, not megabytes.
            let bytes = |map: &PatchMap| -> Vec<u8> {
                map.min_max_normalized().values.iter().map(|v| (v * 255.0).round() as u8).collect()
            };
            return Ok(Response::json(
                200,
                &json!({
                    "width": width,
                    "height": height,
                    "grid": { "rows": grid.rows, "cols": grid.cols },
                    "layer": if rollout { serde_json::Value::Null } else { json!(layer) },
                    "patch": patch,
                    "heads": heads.iter().map(bytes).collect::<Vec<_>>(),
                    "mean": bytes(&mean),
                }),
            ));
        }
        let map = head_choice.map_or(&mean, |h| &heads[h]);
        let upsampled = map.min_max_normalized().upsample(width, height);
        // Rows from kept keys come without the photo; it is decoded only to draw on.
        let rgb = match (raw, photo) {
            (true, _) => None,
            (false, Some(photo)) => Some(preprocess::to_rgb(&photo)),
            (false, None) => Some(preprocess::to_rgb(&self.photo(request)?)),
        };
        png(&DynamicImage::ImageRgb8(render::heatmap(&upsampled, colormap, rgb.as_ref(), 0.6)))
    }

    /// `layer`'s queries and keys for the request's photo at `size`, from
    /// [`Service::recent_keys`], or from a new encoder pass with the photo it
    /// decoded.
    fn patch_keys(
        &self,
        request: &Request,
        size: usize,
        layer: usize,
    ) -> Result<(Arc<PatchKeys>, Option<DynamicImage>), Refused> {
        let asked = |k: &&Arc<PatchKeys>| k.size == size && k.layer == layer && k.body == request.body;
        if let Some(found) = self.recent_keys.lock().ok().and_then(|keys| keys.iter().find(asked).cloned()) {
            return Ok((found, None));
        }
        let failed = |e: anyhow::Error| refuse(500, format!("{e:#}"));
        let photo = self.photo(request)?;
        let pixels = preprocess::model_input(&photo, size, self.model.config().patch_size).map_err(failed)?;
        let out =
            self.model.forward(&pixels, &Capture::attention([layer], Keep::ClsRow).and_qkv(layer)).map_err(failed)?;
        let keys = LayerKeys::of(&out).map_err(failed)?;
        let (width, height) = (photo.width(), photo.height());
        let found = Arc::new(PatchKeys { body: request.body.clone(), size, layer, keys, width, height });
        if let Ok(mut keys) = self.recent_keys.lock() {
            keys.push_front(found.clone());
            keys.truncate(RECENT_KEYS);
        }
        Ok((found, Some(photo)))
    }

    /// `GET /v1/models`: the model this service runs.
    pub fn models(&self) -> Response {
        let c = self.model.config();
        let trained = [self.decoder.is_some().then_some("decoder"), self.linear.is_some().then_some("linear")];
        let heads: Vec<&str> = ["attn", "ncut"].into_iter().chain(trained.into_iter().flatten()).collect();
        Response::json(
            200,
            &json!({
                "model": self.model_name,
                "layers": c.num_layers,
                "heads": c.num_heads,
                "hidden_size": c.hidden_size,
                "patch_size": c.patch_size,
                "input_short_side": self.default_size,
                "segmentation_heads": heads,
            }),
        )
    }
}

/// A head the service owns, lent to one request.
struct Borrowed<'a, H: SegmentationHead + ?Sized>(&'a H);

impl<H: SegmentationHead + ?Sized> SegmentationHead for Borrowed<'_, H> {
    fn capture(&self, model: &Vit) -> Capture {
        self.0.capture(model)
    }

    fn predict(&self, model: &Vit, out: &crate::model::EncoderOutput) -> Result<head::HeadMap> {
        self.0.predict(model, out)
    }
}

fn png(picture: &DynamicImage) -> Result<Response, Refused> {
    let bytes = image_io::encode_png(picture).map_err(|e| refuse(500, format!("{e:#}")))?;
    Ok(Response::new(200, "image/png", bytes))
}

fn wants_json(request: &Request) -> bool {
    request.header("accept").is_some_and(|a| a.contains("application/json"))
}

fn number<T: std::str::FromStr + Copy>(request: &Request, name: &str, default: T) -> Result<T, Refused> {
    match request.param(name) {
        None => Ok(default),
        Some(text) => text.parse().map_err(|_| unprocessable(format!("{name} {text:?} is not a number"))),
    }
}

fn flag(request: &Request, name: &str) -> Result<bool, Refused> {
    match request.param(name) {
        None | Some("false" | "0") => Ok(false),
        Some("" | "true" | "1") => Ok(true),
        Some(other) => Err(unprocessable(format!("{name} must be true or false, got {other:?}"))),
    }
}
