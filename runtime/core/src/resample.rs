//! Resampling 8-bit RGB images exactly as Pillow's `Image.resize` does, bit for bit.
//!
//! Hugging Face image processors resize through Pillow, and a vision-language model sees the
//! result: a pixel one level off changes features and, with greedy decoding, can change the
//! answer. `fast_image_resize` matches Pillow for the triangle filter but not for Lanczos (its
//! fixed-point precision adapts to the kernel), so the processors use this one.
//!
//! Pillow's algorithm: separable convolution, horizontal pass first (its result stored as u8),
//! then vertical. Per output index, the filter is centred on input coordinate
//! `(i + 0.5) * scale`, widened by `scale` when downscaling, its weights normalised to sum 1
//! and turned into fixed point with 22 fractional bits; each sum starts at one half and is
//! shifted back and clamped to 0..=255.

use crate::manifest::Filter;
use crate::preprocess::RgbImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn filter_support(filter: Filter) -> f64 {
    match filter {
        Filter::Nearest => 0.0,
        Filter::Bilinear => 1.0,
        Filter::Bicubic => 2.0,
        Filter::Lanczos3 => 3.0,
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn kernel(filter: Filter, x: f64) -> f64 {
    match filter {
        Filter::Nearest => 0.0,
        Filter::Bilinear => {
            let x = x.abs();
            if x < 1.0 {
                1.0 - x
            } else {
                0.0
            }
        }
        Filter::Bicubic => {
            const A: f64 = -0.5;
            let x = x.abs();
            if x < 1.0 {
                ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
            } else if x < 2.0 {
                (((x - 5.0) * x + 8.0) * x - 4.0) * A
            } else {
                0.0
            }
        }
        Filter::Lanczos3 => {
            if (-3.0..3.0).contains(&x) {
                sinc(x) * sinc(x / 3.0)
            } else {
                0.0
            }
        }
    }
}

/// Per output index: first input index and fixed-point weights.
fn coefficients(n_in: usize, n_out: usize, filter: Filter) -> Vec<(usize, Vec<i32>)> {
    let scale = n_in as f64 / n_out as f64;
    let filterscale = scale.max(1.0);
    let support = filter_support(filter) * filterscale;
    // Pillow multiplies by the inverse; dividing could differ in the last bit.
    let ss = 1.0 / filterscale;
    (0..n_out)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            // C's (int) truncates toward zero; negative starts are clamped to 0 anyway.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(n_in as i64) as usize;
            let raw: Vec<f64> = (xmin..xmax.max(xmin))
                .map(|x| kernel(filter, (x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = raw.iter().sum();
            let fixed = raw
                .iter()
                .map(|w| {
                    let w = if total != 0.0 { w / total } else { *w };
                    let scaled = w * (1i64 << PRECISION_BITS) as f64;
                    if w < 0.0 {
                        (scaled - 0.5) as i32
                    } else {
                        (scaled + 0.5) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One pass along `axis` (0: horizontal) of an RGB image of `w` x `h`.
fn pass(src: &[u8], w: usize, h: usize, n_out: usize, horizontal: bool, filter: Filter) -> Vec<u8> {
    let n_in = if horizontal { w } else { h };
    let coeffs = coefficients(n_in, n_out, filter);
    let (ow, oh) = if horizontal { (n_out, h) } else { (w, n_out) };
    let mut out = vec![0u8; ow * oh * 3];
    let half = 1i64 << (PRECISION_BITS - 1);
    for y in 0..oh {
        for x in 0..ow {
            let (first, weights) = if horizontal { &coeffs[x] } else { &coeffs[y] };
            let mut acc = [half; 3];
            for (k, wgt) in weights.iter().enumerate() {
                let (sx, sy) = if horizontal {
                    (first + k, y)
                } else {
                    (x, first + k)
                };
                let at = (sy * w + sx) * 3;
                for c in 0..3 {
                    acc[c] += src[at + c] as i64 * *wgt as i64;
                }
            }
            let at = (y * ow + x) * 3;
            for c in 0..3 {
                out[at + c] = clip8(acc[c]);
            }
        }
    }
    out
}

/// `img` resized to `width` x `height` as Pillow's `Image.resize((width, height), filter)`.
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (w, h) = (img.width as usize, img.height as usize);
    let (ow, oh) = (width as usize, height as usize);
    if (w, h) == (ow, oh) {
        return img.clone();
    }
    if filter == Filter::Nearest {
        let mut data = Vec::with_capacity(ow * oh * 3);
        for y in 0..oh {
            let sy = (((y as f64 + 0.5) * h as f64 / oh as f64) as usize).min(h - 1);
            for x in 0..ow {
                let sx = (((x as f64 + 0.5) * w as f64 / ow as f64) as usize).min(w - 1);
                let at = (sy * w + sx) * 3;
                data.extend_from_slice(&img.data[at..at + 3]);
            }
        }
        return RgbImage {
            width,
            height,
            data,
        };
    }
    let mut data = img.data.clone();
    let mut cur_w = w;
    if ow != w {
        data = pass(&data, w, h, ow, true, filter);
        cur_w = ow;
    }
    if oh != h {
        data = pass(&data, cur_w, h, oh, false, filter);
    }
    RgbImage {
        width,
        height,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point_and_flat_images_stay_flat() {
        for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos3] {
            for (n_in, n_out) in [(7, 96), (96, 32), (50, 96), (130, 32)] {
                for (_, w) in coefficients(n_in, n_out, filter) {
                    let sum: i64 = w.iter().map(|&v| v as i64).sum();
                    assert!(
                        (sum - (1 << PRECISION_BITS)).abs() <= w.len() as i64,
                        "{filter:?}"
                    );
                }
            }
            let flat = RgbImage {
                width: 9,
                height: 5,
                data: vec![77; 9 * 5 * 3],
            };
            let out = resize(&flat, 31, 12, filter);
            assert!(out.data.iter().all(|&v| v == 77), "{filter:?}");
        }
    }
}
