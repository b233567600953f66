//! The Idefics3 / SmolVLM image processor and prompt expansion, step for step as
//! `transformers`' `SmolVLMImageProcessor` and `SmolVLMProcessor` do it:
//!
//! 1. resize so the longest edge is `size.longest_edge` (short edge rounded up to even),
//! 2. with splitting: resize both sides up to multiples of the tile (`max_image_size`), cut
//!    into `rows x cols` tiles, append the whole image squeezed to one tile; without:
//!    squeeze to one tile,
//! 3. rescale (`u8 * rescale_factor` in f64, stored as f32) and normalize (in f32),
//! 4. stack as `pixel_values [1, frames, 3, H, W]` with `pixel_attention_mask [1, frames, H, W]`.
//!
//! Every resize works on 8-bit pixels with Pillow's arithmetic ([`resample`]), as
//! `transformers` resizes through Pillow.

use tract_onnx::prelude::*;

use crate::error::{Error, Result};
use crate::hf::ImageProcessorConfig;
use crate::preprocess::RgbImage;
use crate::resample;

/// Wraps each image (tile) in the prompt.
pub const FAKE_TOKEN_AROUND_IMAGE: &str = "<fake_token_around_image>";
/// The placeholder replaced by image features; the chat template writes one per image.
pub const IMAGE_TOKEN: &str = "<image>";
/// Marks the whole-image tile.
pub const GLOBAL_IMAGE_TOKEN: &str = "<global-img>";

/// One image turned into encoder input.
#[derive(Debug, Clone)]
pub struct ProcessedImage {
    /// `[1, frames, 3, height, width]`, f32.
    pub pixel_values: Tensor,
    /// `[1, frames, height, width]`, bool: true where a pixel is image, false where padding.
    pub pixel_attention_mask: Tensor,
    /// Tile rows (0 when the image was not split).
    pub rows: usize,
    /// Tile columns (0 when the image was not split).
    pub cols: usize,
}

impl ProcessedImage {
    /// Number of frames: tiles plus the global image.
    pub fn frames(&self) -> usize {
        self.pixel_values.shape()[1]
    }
}

/// Turns RGB images into `pixel_values` for a SmolVLM vision encoder.
pub struct ImageProcessor {
    config: ImageProcessorConfig,
}

impl std::fmt::Debug for ImageProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageProcessor")
            .field("config", &self.config)
            .finish()
    }
}

/// `int(x)` of Python for the positive values here.
fn trunc(x: f64) -> u32 {
    x as u32
}

/// Output size of the first resize: the longest edge becomes `max_len`, the other keeps the
/// aspect ratio, rounded up to even; then both are kept below `upper`.
pub fn longest_edge_size(height: u32, width: u32, max_len: u32, upper: u32) -> (u32, u32) {
    let aspect = width as f64 / height as f64;
    let (mut h, mut w) = if width >= height {
        let mut h = trunc(max_len as f64 / aspect);
        if !h.is_multiple_of(2) {
            h += 1;
        }
        (h, max_len)
    } else {
        let mut w = trunc(max_len as f64 * aspect);
        if !w.is_multiple_of(2) {
            w += 1;
        }
        (max_len, w)
    };
    h = h.max(1);
    w = w.max(1);
    let aspect = w as f64 / h as f64;
    if w >= h && w > upper {
        w = upper;
        h = trunc(w as f64 / aspect);
    } else if h > w && h > upper {
        h = upper;
        w = trunc(h as f64 * aspect);
    }
    (h.max(1), w.max(1))
}

/// Size of the resize before splitting: each side up to a multiple of `tile`.
pub fn tile_multiple_size(height: u32, width: u32, tile: u32) -> (u32, u32) {
    let aspect = width as f64 / height as f64;
    let up = |n: u32| n.div_ceil(tile) * tile;
    if width >= height {
        let w = up(width);
        let h = up(trunc(w as f64 / aspect));
        (h, w)
    } else {
        let h = up(height);
        let w = up(trunc(h as f64 * aspect));
        (h, w)
    }
}

/// The text one image expands to in the prompt: per tile `<fake_token_around_image>
/// <row_r_col_c>` and `seq_len` image tokens, a newline after each row, then the global image;
/// for an unsplit image only the global part.
pub fn image_prompt(rows: usize, cols: usize, seq_len: usize) -> String {
    let tokens = IMAGE_TOKEN.repeat(seq_len);
    let global =
        format!("{FAKE_TOKEN_AROUND_IMAGE}{GLOBAL_IMAGE_TOKEN}{tokens}{FAKE_TOKEN_AROUND_IMAGE}");
    if rows == 0 && cols == 0 {
        return global;
    }
    let mut s = String::new();
    for r in 1..=rows {
        for c in 1..=cols {
            s.push_str(FAKE_TOKEN_AROUND_IMAGE);
            s.push_str(&format!("<row_{r}_col_{c}>"));
            s.push_str(&tokens);
        }
        s.push('\n');
    }
    s.push('\n');
    s.push_str(&global);
    s
}

impl ImageProcessor {
    /// A processor for `config`.
    pub fn new(config: ImageProcessorConfig) -> ImageProcessor {
        ImageProcessor { config }
    }

    /// The configuration.
    pub fn config(&self) -> &ImageProcessorConfig {
        &self.config
    }

    /// The configuration, to change.
    pub fn config_mut(&mut self) -> &mut ImageProcessorConfig {
        &mut self.config
    }

    fn resize(&mut self, img: &RgbImage, height: u32, width: u32) -> Result<RgbImage> {
        Ok(resample::resize(img, width, height, self.config.filter))
    }

    /// The frames of one image (tiles in row order, then the global image) and the tile grid.
    pub fn frames(&mut self, img: &RgbImage) -> Result<(Vec<RgbImage>, usize, usize)> {
        let c = self.config.clone();
        let mut img = if c.do_resize {
            let (h, w) = longest_edge_size(img.height, img.width, c.longest_edge, c.max_side);
            self.resize(img, h, w)?
        } else {
            img.clone()
        };
        if !c.do_image_splitting {
            return Ok((vec![self.resize(&img, c.tile, c.tile)?], 0, 0));
        }
        let (h, w) = tile_multiple_size(img.height, img.width, c.tile);
        img = self.resize(&img, h, w)?;
        if img.height <= c.tile && img.width <= c.tile {
            return Ok((vec![img], 0, 0));
        }
        let rows = img.height.div_ceil(c.tile);
        let cols = img.width.div_ceil(c.tile);
        let (th, tw) = (img.height.div_ceil(rows), img.width.div_ceil(cols));
        let mut frames = Vec::with_capacity((rows * cols + 1) as usize);
        for r in 0..rows {
            for col in 0..cols {
                let (x0, y0) = (col * tw, r * th);
                let (x1, y1) = ((x0 + tw).min(img.width), (y0 + th).min(img.height));
                let mut data = Vec::with_capacity(((x1 - x0) * (y1 - y0) * 3) as usize);
                for y in y0..y1 {
                    let at = ((y * img.width + x0) * 3) as usize;
                    data.extend_from_slice(&img.data[at..at + ((x1 - x0) * 3) as usize]);
                }
                frames.push(RgbImage {
                    width: x1 - x0,
                    height: y1 - y0,
                    data,
                });
            }
        }
        frames.push(self.resize(&img, c.tile, c.tile)?);
        Ok((frames, rows as usize, cols as usize))
    }

    /// Processes one image into encoder inputs.
    pub fn process(&mut self, img: &RgbImage) -> Result<ProcessedImage> {
        let (frames, rows, cols) = self.frames(img)?;
        let c = &self.config;
        let height = frames.iter().map(|f| f.height).max().unwrap_or(0) as usize;
        let width = frames.iter().map(|f| f.width).max().unwrap_or(0) as usize;
        let n = frames.len();
        let plane = height * width;
        let mut values = vec![0f32; n * 3 * plane];
        let mut mask = vec![false; n * plane];
        for (i, frame) in frames.iter().enumerate() {
            let fw = frame.width as usize;
            for (p, px) in frame.data.chunks_exact(3).enumerate() {
                let (y, x) = (p / fw, p % fw);
                mask[i * plane + y * width + x] = true;
                for ch in 0..3 {
                    let mut v = if c.do_rescale {
                        (px[ch] as f64 * c.rescale_factor) as f32
                    } else {
                        px[ch] as f32
                    };
                    if c.do_normalize {
                        v = (v - c.mean[ch]) / c.std[ch];
                    }
                    values[(i * 3 + ch) * plane + y * width + x] = v;
                }
            }
        }
        let fail = |e: TractError| Error::Inference(e.into());
        Ok(ProcessedImage {
            pixel_values: Tensor::from_shape(&[1, n, 3, height, width], &values).map_err(fail)?,
            pixel_attention_mask: Tensor::from_shape(&[1, n, height, width], &mask)
                .map_err(fail)?,
            rows,
            cols,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_reference_rounding() {
        // Landscape: width to the edge, height truncated then rounded up to even.
        assert_eq!(longest_edge_size(30, 50, 96, 4096), (58, 96));
        // Portrait.
        assert_eq!(longest_edge_size(70, 20, 96, 4096), (96, 28));
        // Upscaling is part of it, and the upper bound scales down again.
        assert_eq!(longest_edge_size(5, 7, 96, 4096), (68, 96));
        assert_eq!(longest_edge_size(100, 200, 2048, 1820), (910, 1820));
        assert_eq!(tile_multiple_size(58, 96, 32), (64, 96));
        assert_eq!(tile_multiple_size(96, 28, 32), (96, 32));
    }

    #[test]
    fn prompt_expansion_matches_the_processor_layout() {
        assert_eq!(
            image_prompt(0, 0, 2),
            "<fake_token_around_image><global-img><image><image><fake_token_around_image>"
        );
        let s = image_prompt(1, 2, 1);
        assert_eq!(
            s,
            "<fake_token_around_image><row_1_col_1><image><fake_token_around_image><row_1_col_2><image>\n\
             \n<fake_token_around_image><global-img><image><fake_token_around_image>"
        );
    }
}
