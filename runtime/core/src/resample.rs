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

// Pillow accumulates in a C `int`: with 22 fractional bits, 8-bit samples and Lanczos' lobes
// (absolute weights summing to well under 2) the sums stay far inside i32, and i32 lanes let
// the row loops below vectorize. The sums wrap as C's would in the degenerate cases (a
// kernel cut to one or two samples), instead of panicking in debug builds.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass: each row of an RGB image `w` wide becomes `n_out` wide.
fn horizontal(src: &[u8], w: usize, n_out: usize, filter: Filter) -> Vec<u8> {
    let coeffs = coefficients(w, n_out, filter);
    let mut out = vec![0u8; src.len() / w * n_out];
    for (row, out_row) in src.chunks_exact(w * 3).zip(out.chunks_exact_mut(n_out * 3)) {
        for ((first, weights), px) in coeffs.iter().zip(out_row.chunks_exact_mut(3)) {
            let taps = &row[first * 3..(first + weights.len()) * 3];
            let mut acc = [HALF; 3];
            for (&wgt, s) in weights.iter().zip(taps.chunks_exact(3)) {
                acc[0] = acc[0].wrapping_add((s[0] as i32).wrapping_mul(wgt));
                acc[1] = acc[1].wrapping_add((s[1] as i32).wrapping_mul(wgt));
                acc[2] = acc[2].wrapping_add((s[2] as i32).wrapping_mul(wgt));
            }
            px[0] = clip8(acc[0]);
            px[1] = clip8(acc[1]);
            px[2] = clip8(acc[2]);
        }
    }
    out
}

/// Vertical pass: an RGB image `w` wide and `h` high becomes `n_out` high. Whole rows are
/// weighted and summed at once (contiguous, so the loops vectorize); the sums are the same.
fn vertical(src: &[u8], w: usize, h: usize, n_out: usize, filter: Filter) -> Vec<u8> {
    let coeffs = coefficients(h, n_out, filter);
    let stride = w * 3;
    let mut out = vec![0u8; stride * n_out];
    let mut acc = vec![0i32; stride];
    for ((first, weights), out_row) in coeffs.iter().zip(out.chunks_exact_mut(stride)) {
        acc.fill(HALF);
        for (k, &wgt) in weights.iter().enumerate() {
            let row = &src[(first + k) * stride..][..stride];
            for (a, &s) in acc.iter_mut().zip(row) {
                *a = a.wrapping_add((s as i32).wrapping_mul(wgt));
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
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
        data = horizontal(&data, w, ow, filter);
        cur_w = ow;
    }
    if oh != h {
        data = vertical(&data, cur_w, h, oh, filter);
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

    /// The row-wise passes give what the definition gives: each output sample on its own,
    /// a 64-bit sum over its taps, horizontal first, for up- and downscaling on odd sizes.
    #[test]
    fn passes_equal_the_per_sample_definition() {
        fn reference(img: &RgbImage, ow: usize, oh: usize, filter: Filter) -> Vec<u8> {
            let (w, h) = (img.width as usize, img.height as usize);
            let sample = |src: &[u8], stride: usize, at: usize, first: usize, wts: &[i32]| {
                let sum: i64 = wts
                    .iter()
                    .enumerate()
                    .map(|(k, &wt)| src[(first + k) * stride + at] as i64 * wt as i64)
                    .sum();
                ((sum + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS).clamp(0, 255) as u8
            };
            let hc = coefficients(w, ow, filter);
            let mut mid = vec![0u8; ow * h * 3];
            for y in 0..h {
                for (x, (first, wts)) in hc.iter().enumerate() {
                    for c in 0..3 {
                        mid[(y * ow + x) * 3 + c] =
                            sample(&img.data[y * w * 3..], 3, c, *first, wts);
                    }
                }
            }
            let vc = coefficients(h, oh, filter);
            let mut out = vec![0u8; ow * oh * 3];
            for (y, (first, wts)) in vc.iter().enumerate() {
                for i in 0..ow * 3 {
                    out[y * ow * 3 + i] = sample(&mid, ow * 3, i, *first, wts);
                }
            }
            out
        }
        let mut seed = 0x5eedu32;
        let data = (0..37 * 23 * 3)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 24) as u8
            })
            .collect();
        let img = RgbImage {
            width: 37,
            height: 23,
            data,
        };
        for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos3] {
            for (ow, oh) in [(101, 67), (9, 5), (37, 61), (64, 23)] {
                let ours = resize(&img, ow as u32, oh as u32, filter);
                assert_eq!(
                    ours.data,
                    reference(&img, ow, oh, filter),
                    "{filter:?} {ow}x{oh}"
                );
            }
        }
    }
}
