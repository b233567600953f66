//! Camera images to input tensors: decoding (JPEG, PNG, raw YUYV / NV12 / MJPEG frames),
//! resizing with `fast_image_resize` (SIMD) and normalization into the model's layout.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use tract_onnx::prelude::*;

use crate::error::{Error, Result};
use crate::manifest::{Channels, Filter, InputDtype, InputSpec, Layout, ResizeMode};

/// Largest accepted image side; bigger inputs are refused before allocating.
pub const MAX_SIDE: u32 = 16384;
/// Largest accepted decoded image size in bytes.
const MAX_ALLOC: u64 = 512 * 1024 * 1024;

/// A decoded 8-bit RGB image, rows packed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height * 3` bytes, R G B.
    pub data: Vec<u8>,
}

/// Pixel format of a raw camera frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameFormat {
    /// Packed R G B.
    Rgb8,
    /// One luma byte per pixel.
    Gray8,
    /// Packed 4:2:2 Y U Y V (V4L2 `YUYV`), BT.601 limited range.
    Yuyv,
    /// Y plane then interleaved U V plane at half resolution (V4L2 `NV12`), BT.601 limited range.
    Nv12,
    /// A JPEG per frame (V4L2 `MJPG`); PNG data is accepted too (image-folder cameras).
    Mjpeg,
}

/// A raw frame as a camera delivers it.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// Pixel format.
    pub format: FrameFormat,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Frame bytes.
    pub data: &'a [u8],
}

fn image_err(name: &str, message: impl Into<String>) -> Error {
    Error::Image {
        source_name: name.to_string(),
        message: message.into(),
    }
}

/// Decodes a JPEG or PNG file's bytes; `name` is used in errors.
pub fn decode_image(bytes: &[u8], name: &str) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(image_err(name, "empty file"));
    }
    let format = image::guess_format(bytes)
        .map_err(|_| image_err(name, "not an image: expected JPEG or PNG data"))?;
    if !matches!(format, image::ImageFormat::Jpeg | image::ImageFormat::Png) {
        return Err(image_err(
            name,
            format!("unsupported image format {format:?}: expected JPEG or PNG"),
        ));
    }
    if format == image::ImageFormat::Jpeg {
        // Decoders fill a cut-off JPEG with grey and report success; a part judged on half a
        // picture is worse than an error. Cameras may pad MJPEG buffers with zeros after EOI.
        let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        if !bytes[..end].ends_with(&[0xFF, 0xD9]) {
            return Err(image_err(
                name,
                "cannot decode Jpeg: truncated (no end-of-image marker)",
            ));
        }
    }
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_ALLOC);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| image_err(name, format!("cannot decode {format:?}: {e}")))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(image_err(name, "image has zero width or height"));
    }
    let rgb = img.into_rgb8();
    Ok(RgbImage {
        width: rgb.width(),
        height: rgb.height(),
        data: rgb.into_raw(),
    })
}

/// Converts a raw camera frame to RGB; `name` is used in errors.
pub fn frame_to_rgb(frame: &Frame, name: &str) -> Result<RgbImage> {
    if frame.format == FrameFormat::Mjpeg {
        // Encoded frames carry their own size; the header fields may be 0.
        return decode_image(frame.data, name);
    }
    let (w, h) = (frame.width as usize, frame.height as usize);
    if w == 0 || h == 0 || frame.width > MAX_SIDE || frame.height > MAX_SIDE {
        return Err(image_err(
            name,
            format!("frame size {w}x{h} out of range 1..={MAX_SIDE}"),
        ));
    }
    let need = |n: usize| {
        if frame.data.len() < n {
            Err(image_err(
                name,
                format!(
                    "{:?} {w}x{h} frame needs {n} bytes, got {}",
                    frame.format,
                    frame.data.len()
                ),
            ))
        } else {
            Ok(())
        }
    };
    let data = match frame.format {
        FrameFormat::Mjpeg => unreachable!("handled above"),
        FrameFormat::Rgb8 => {
            need(w * h * 3)?;
            frame.data[..w * h * 3].to_vec()
        }
        FrameFormat::Gray8 => {
            need(w * h)?;
            frame.data[..w * h]
                .iter()
                .flat_map(|&y| [y, y, y])
                .collect()
        }
        FrameFormat::Yuyv => {
            if w % 2 != 0 {
                return Err(image_err(name, format!("YUYV width {w} must be even")));
            }
            need(w * h * 2)?;
            let mut out = Vec::with_capacity(w * h * 3);
            for px in frame.data[..w * h * 2].chunks_exact(4) {
                let (y0, u, y1, v) = (px[0], px[1], px[2], px[3]);
                out.extend_from_slice(&yuv_to_rgb(y0, u, v));
                out.extend_from_slice(&yuv_to_rgb(y1, u, v));
            }
            out
        }
        FrameFormat::Nv12 => {
            if w % 2 != 0 || h % 2 != 0 {
                return Err(image_err(name, format!("NV12 size {w}x{h} must be even")));
            }
            need(w * h * 3 / 2)?;
            let (luma, chroma) = frame.data.split_at(w * h);
            let mut out = Vec::with_capacity(w * h * 3);
            for y in 0..h {
                for x in 0..w {
                    let c = (y / 2) * w + (x / 2) * 2;
                    out.extend_from_slice(&yuv_to_rgb(luma[y * w + x], chroma[c], chroma[c + 1]));
                }
            }
            out
        }
    };
    Ok(RgbImage {
        width: frame.width,
        height: frame.height,
        data,
    })
}

/// Encodes an image as PNG (NG images saved from raw camera frames).
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_raw(img.width, img.height, img.data.clone())
        .ok_or_else(|| image_err("png", "buffer smaller than width x height x 3"))?
        .write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| image_err("png", e.to_string()))?;
    Ok(out.into_inner())
}

/// BT.601 limited-range YCbCr to RGB, the V4L2 default for YUYV / NV12 webcams.
fn yuv_to_rgb(y: u8, u: u8, v: u8) -> [u8; 3] {
    let c = (y as i32 - 16).max(0) * 298;
    let d = u as i32 - 128;
    let e = v as i32 - 128;
    let clamp = |x: i32| ((x + 128) >> 8).clamp(0, 255) as u8;
    [
        clamp(c + 409 * e),
        clamp(c - 100 * d - 208 * e),
        clamp(c + 516 * d),
    ]
}

/// Turns RGB images into input tensors as an `[input]` spec says. Keeps its resizer's buffers
/// between calls, so use one per camera stream.
pub struct Preprocessor {
    spec: InputSpec,
    resizer: Resizer,
}

impl std::fmt::Debug for Preprocessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preprocessor")
            .field("spec", &self.spec)
            .finish()
    }
}

impl Preprocessor {
    /// A preprocessor for `spec` (already validated by the manifest).
    pub fn new(spec: InputSpec) -> Preprocessor {
        Preprocessor {
            spec,
            resizer: Resizer::new(),
        }
    }

    /// The spec.
    pub fn spec(&self) -> &InputSpec {
        &self.spec
    }

    /// The tensor shape this preprocessor produces (batch 1).
    pub fn shape(&self) -> [usize; 4] {
        let (w, h, c) = (
            self.spec.width as usize,
            self.spec.height as usize,
            self.spec.channels.count(),
        );
        match self.spec.layout {
            Layout::NCHW => [1, c, h, w],
            Layout::NHWC => [1, h, w, c],
        }
    }

    /// Resizes and normalizes `img` into a `[1, C, H, W]` or `[1, H, W, C]` tensor.
    pub fn tensor(&mut self, img: &RgbImage) -> Result<Tensor> {
        let channels = self.spec.channels.count();
        // Grey models see luma computed before resampling, as PIL's convert("L") + resize does.
        let (src, pixel_type) = if self.spec.channels == Channels::GRAY {
            let luma: Vec<u8> = img
                .data
                .chunks_exact(3)
                .map(|p| {
                    ((p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114 + 500) / 1000) as u8
                })
                .collect();
            (luma, PixelType::U8)
        } else {
            (img.data.clone(), PixelType::U8x3)
        };
        let resized = self.resize(&src, img.width, img.height, pixel_type)?;
        let spec = &self.spec;
        let (w, h) = (spec.width as usize, spec.height as usize);
        let order: [usize; 3] = match spec.channels {
            Channels::BGR => [2, 1, 0],
            _ => [0, 1, 2],
        };
        let shape = self.shape();
        if spec.dtype == InputDtype::U8 {
            let mut out = vec![0u8; w * h * channels];
            for (i, px) in resized.chunks_exact(channels).enumerate() {
                for (c, &src_c) in order[..channels].iter().enumerate() {
                    out[index(spec.layout, channels, w * h, i, c)] = px[src_c];
                }
            }
            return Tensor::from_shape(&shape, &out).map_err(|e| Error::Inference(e.into()));
        }
        let mean = spec.mean.clone().unwrap_or_else(|| vec![0.0; channels]);
        let inv_std: Vec<f32> = spec
            .std
            .clone()
            .unwrap_or_else(|| vec![1.0; channels])
            .iter()
            .map(|s| 1.0 / s)
            .collect();
        let mut out = vec![0f32; w * h * channels];
        for (i, px) in resized.chunks_exact(channels).enumerate() {
            for (c, &src_c) in order[..channels].iter().enumerate() {
                out[index(spec.layout, channels, w * h, i, c)] =
                    (px[src_c] as f32 * spec.scale - mean[c]) * inv_std[c];
            }
        }
        Tensor::from_shape(&shape, &out).map_err(|e| Error::Inference(e.into()))
    }

    fn resize(&mut self, src: &[u8], sw: u32, sh: u32, pixel_type: PixelType) -> Result<Vec<u8>> {
        let spec = &self.spec;
        let (dw, dh) = (spec.width, spec.height);
        let alg = match spec.filter {
            Filter::Nearest => ResizeAlg::Nearest,
            Filter::Bilinear => ResizeAlg::Convolution(FilterType::Bilinear),
            Filter::Bicubic => ResizeAlg::Convolution(FilterType::CatmullRom),
            Filter::Lanczos3 => ResizeAlg::Convolution(FilterType::Lanczos3),
        };
        let fail = |e: &dyn std::fmt::Display| image_err("resize", e.to_string());
        let src_ref = ImageRef::new(sw, sh, src, pixel_type).map_err(|e| fail(&e))?;
        let options = ResizeOptions::new().resize_alg(alg);
        match spec.resize {
            ResizeMode::Stretch | ResizeMode::CenterCrop => {
                if (sw, sh) == (dw, dh) {
                    return Ok(src.to_vec());
                }
                let options = if spec.resize == ResizeMode::CenterCrop {
                    options.fit_into_destination(Some((0.5, 0.5)))
                } else {
                    options
                };
                let mut dst = Image::new(dw, dh, pixel_type);
                self.resizer
                    .resize(&src_ref, &mut dst, &options)
                    .map_err(|e| fail(&e))?;
                Ok(dst.into_vec())
            }
            ResizeMode::Letterbox => {
                let scale = (dw as f64 / sw as f64).min(dh as f64 / sh as f64);
                let (iw, ih) = (
                    ((sw as f64 * scale).round() as u32).clamp(1, dw),
                    ((sh as f64 * scale).round() as u32).clamp(1, dh),
                );
                let mut inner = Image::new(iw, ih, pixel_type);
                self.resizer
                    .resize(&src_ref, &mut inner, &options)
                    .map_err(|e| fail(&e))?;
                let bpp = pixel_type.size();
                let mut canvas = vec![spec.pad; (dw * dh) as usize * bpp];
                let (ox, oy) = (((dw - iw) / 2) as usize, ((dh - ih) / 2) as usize);
                let row = iw as usize * bpp;
                for (y, src_row) in inner.buffer().chunks_exact(row).enumerate() {
                    let at = ((oy + y) * dw as usize + ox) * bpp;
                    canvas[at..at + row].copy_from_slice(src_row);
                }
                Ok(canvas)
            }
        }
    }
}

/// Flat index of pixel `i`, channel `c` in the output tensor.
fn index(layout: Layout, channels: usize, plane: usize, i: usize, c: usize) -> usize {
    match layout {
        Layout::NCHW => c * plane + i,
        Layout::NHWC => i * channels + c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(layout: Layout, channels: Channels, resize: ResizeMode, w: u32, h: u32) -> InputSpec {
        InputSpec {
            tensor: "x".into(),
            width: w,
            height: h,
            layout,
            channels,
            resize,
            filter: Filter::Bilinear,
            dtype: InputDtype::F32,
            scale: 1.0,
            mean: None,
            std: None,
            pad: 0,
        }
    }

    fn solid(w: u32, h: u32, rgb: [u8; 3]) -> RgbImage {
        RgbImage {
            width: w,
            height: h,
            data: (0..w * h).flat_map(|_| rgb).collect(),
        }
    }

    #[test]
    fn layouts_and_channel_orders() {
        let img = solid(4, 2, [10, 20, 30]);
        let t = Preprocessor::new(spec(Layout::NCHW, Channels::RGB, ResizeMode::Stretch, 4, 2))
            .tensor(&img)
            .unwrap();
        assert_eq!(t.shape(), &[1, 3, 2, 4]);
        let v = crate::values::<f32>(&t).unwrap();
        assert_eq!((v[0], v[8], v[16]), (10.0, 20.0, 30.0));
        let t = Preprocessor::new(spec(Layout::NHWC, Channels::BGR, ResizeMode::Stretch, 4, 2))
            .tensor(&img)
            .unwrap();
        assert_eq!(t.shape(), &[1, 2, 4, 3]);
        assert_eq!(&crate::values::<f32>(&t).unwrap()[..3], &[30.0, 20.0, 10.0]);
        let t = Preprocessor::new(spec(
            Layout::NCHW,
            Channels::GRAY,
            ResizeMode::Stretch,
            2,
            2,
        ))
        .tensor(&img)
        .unwrap();
        assert_eq!(t.shape(), &[1, 1, 2, 2]);
        assert_eq!(crate::values::<f32>(&t).unwrap()[0], 18.0); // 0.299*10 + 0.587*20 + 0.114*30 = 18.15
    }

    #[test]
    fn normalizes_with_scale_mean_std() {
        let mut s = spec(Layout::NCHW, Channels::RGB, ResizeMode::Stretch, 1, 1);
        s.scale = 1.0 / 255.0;
        s.mean = Some(vec![0.5; 3]);
        s.std = Some(vec![0.25; 3]);
        let t = Preprocessor::new(s)
            .tensor(&solid(1, 1, [255, 0, 51]))
            .unwrap();
        let v = crate::values::<f32>(&t).unwrap();
        assert!(
            (v[0] - 2.0).abs() < 1e-6 && (v[1] + 2.0).abs() < 1e-6 && (v[2] + 1.2).abs() < 1e-5,
            "{v:?}"
        );
    }

    #[test]
    fn letterbox_pads_and_keeps_aspect() {
        let mut s = spec(Layout::NHWC, Channels::RGB, ResizeMode::Letterbox, 4, 4);
        s.pad = 7;
        let t = Preprocessor::new(s)
            .tensor(&solid(8, 4, [100, 100, 100]))
            .unwrap();
        let v = crate::values::<f32>(&t).unwrap();
        // 8x4 -> 4x2 centred vertically: rows 0 and 3 are padding.
        assert_eq!(v[0], 7.0);
        assert_eq!(v[4 * 3], 100.0);
        assert_eq!(v[3 * 4 * 3], 7.0);
    }

    #[test]
    fn yuyv_and_nv12_grey_and_colour() {
        // Mid grey: Y=126 -> (126-16)*1.164 = 128.
        let yuyv = [126u8, 128, 126, 128];
        let rgb = frame_to_rgb(
            &Frame {
                format: FrameFormat::Yuyv,
                width: 2,
                height: 1,
                data: &yuyv,
            },
            "f",
        )
        .unwrap();
        assert_eq!(rgb.data, vec![128; 6]);
        // Pure red in BT.601 limited range is Y=82 U=90 V=240.
        let nv12 = [82u8, 82, 82, 82, 90, 240];
        let rgb = frame_to_rgb(
            &Frame {
                format: FrameFormat::Nv12,
                width: 2,
                height: 2,
                data: &nv12,
            },
            "f",
        )
        .unwrap();
        assert!(
            rgb.data[0] >= 250 && rgb.data[1] <= 5 && rgb.data[2] <= 5,
            "{:?}",
            &rgb.data[..3]
        );
        let short = frame_to_rgb(
            &Frame {
                format: FrameFormat::Nv12,
                width: 2,
                height: 2,
                data: &nv12[..4],
            },
            "cam0",
        );
        assert_eq!(
            short.unwrap_err().to_string(),
            "cam0: Nv12 2x2 frame needs 6 bytes, got 4"
        );
    }

    #[test]
    fn bad_images_are_named_errors() {
        assert_eq!(
            decode_image(b"", "a.png").unwrap_err().to_string(),
            "a.png: empty file"
        );
        assert!(decode_image(b"hello", "b.png")
            .unwrap_err()
            .to_string()
            .contains("b.png: not an image"));
        let png_header = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        assert!(decode_image(png_header, "c.png")
            .unwrap_err()
            .to_string()
            .starts_with("c.png: cannot decode Png"));
    }
}
