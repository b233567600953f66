//! 8-bit matrix products with a constant weight (ONNX `MatMulInteger`, as dynamic-int8 exports
//! use it after every `DynamicQuantizeLinear`) on AVX-512 VNNI, the weight packed once at
//! load.
//!
//! tract 0.23.9 runs these products on its `avx512vnni_mmm_i32_8x8` kernel: an 8x8 tile of
//! 32-bit sums uses half of each 16-lane register, it packs the activation again on every
//! call, and lowering every product costs its optimizer time at load (see
//! `docs/tract-slow-paths.md`, section 8). [`VnniMatMul`] computes the same integers with a
//! tile of 8 rows by 32 columns (16 `vpdpbusd` per 4-element step of the contraction) reading
//! the activation in place, and takes the product out of tract's optimizer altogether.
//!
//! The arithmetic: `vpdpbusd` multiplies unsigned by signed bytes. With the activation
//! `A = A' - a_shift` (`A'` unsigned: `a_shift` is 128 for an `i8` activation, else 0) and the
//! weight `B = B' + b_shift` (`B'` signed: `b_shift` is 128 for a `u8` weight, else 0),
//! `sum_k (A - za)(B - zb) = sum_k (A' - alpha)(B' - beta)` with `alpha = za + a_shift` and
//! `beta = zb - b_shift`, which is
//! `sum A'B' - beta * rowsum(A') - alpha * colsum(B') + K * alpha * beta`. All of it is exact
//! in wrapping 32-bit integers whenever the result fits in an `i32`, as ONNX requires.
//!
//! Without VNNI, the same op and packed weight run on an AVX2 tile ([`Int8Kernel::Avx2`]):
//! tract's AVX2 kernel for these products (`avx2_mmm_i32_8x8`) widens every byte to a 32-bit
//! lane and multiplies lane by lane, about 100 times slower than ONNX Runtime on this
//! project's probe int8 decoder. The AVX2 tile widens the packed bytes to 16 bits and sums
//! pairs with `vpmaddwd` into 32 bits: exact (no saturation, unlike `vpmaddubsw` on unsigned
//! times signed bytes), and the same `sum A'B'`, so everything around the kernel is shared.

// Elsewhere than x86_64 the kernels are compiled out and the ops never created (the
// rewrite checks the CPU first), which leaves their plumbing unused there.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::Slice;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::nn::DataFormat;

/// Output columns of one kernel tile: two 16-lane registers of `i32`.
const NR: usize = 32;
/// Rows of one kernel tile.
const MR: usize = 8;
/// Packed weight bytes a row block walks before the next one starts: the panels stay in L2
/// while every row block of the activation passes over them.
const PANEL_GROUP_BYTES: usize = 256 << 10;

/// Does this CPU have AVX-512 F, BW and VNNI (edgevlm's VNNI int8 kernel, and the gate of its
/// other AVX-512 kernels)?
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The kernels [`VnniMatMul`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Kernel {
    /// AMX (Intel Sapphire Rapids and later) with AVX-512 VNNI: `tdpbusd` on 16-row tiles,
    /// 32 rows by 32 columns at a time; a product's last rows, fewer than 16 (a decode step's
    /// one row), on the VNNI tile.
    Amx,
    /// AVX-512 VNNI: `vpdpbusd`, 8 rows by 32 columns.
    Vnni,
    /// AVX2: 16-bit `vpmaddwd`, 2 rows by 2 x 16 columns.
    Avx2,
}

impl Int8Kernel {
    /// Can this CPU run it?
    pub fn runs_here(self) -> bool {
        match self {
            Int8Kernel::Amx => amx::ready(),
            Int8Kernel::Vnni => available(),
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::Avx2 => is_x86_feature_detected!("avx2"),
            #[cfg(not(target_arch = "x86_64"))]
            Int8Kernel::Avx2 => false,
        }
    }
}

/// The fastest int8 kernel this CPU runs, if any (none off x86_64).
pub fn int8_kernel() -> Option<Int8Kernel> {
    [Int8Kernel::Amx, Int8Kernel::Vnni, Int8Kernel::Avx2]
        .into_iter()
        .find(|k| k.runs_here())
}

/// Where [`PackedWeight::matmul`] writes: the `i32` sums, or the sums as f32 times a scale
/// (one value, or one per column): ONNX's `Cast` to float and `Mul` by the product of the
/// quantization scales, fused.
pub enum Output<'a> {
    /// `m x n` sums.
    Sums(&'a mut [i32]),
    /// `m x n` scaled values, and the scale (length 1 or `n`).
    Scaled(&'a mut [f32], &'a [f32]),
}

/// A `[k, n]` 8-bit weight packed for the kernel: panels of 32 columns, each a run of
/// `k4 = ceil(k / 4)` steps of `NR x 4` signed bytes (column-major within a step, the 4
/// contraction elements of one column adjacent), zero past `k` and `n`, and zero steps up to
/// a whole AMX tile (`steps`, a multiple of 16: one tile row per step, 64 bytes of `k`).
#[derive(Debug)]
pub struct PackedWeight {
    k: usize,
    n: usize,
    k4: usize,
    /// Steps per panel: `k4` rounded up to whole AMX tiles.
    steps: usize,
    panels: Vec<i8>,
    /// `sum_k B'[k, j]` per column, zero past `n` (padded to whole panels).
    colsum: Vec<i32>,
    /// `zb[j] - b_shift` per column, zero past `n`.
    beta: Vec<i32>,
}

impl PackedWeight {
    /// Packs a `[k, n]` weight (`k_major`) or `[n, k]` one from its bytes in memory order:
    /// `i8` values if `signed`, else `u8` ones (moved to the kernel's signed byte by
    /// subtracting 128); `zero(j)` is column `j`'s zero point.
    pub fn pack(
        k: usize,
        n: usize,
        signed: bool,
        k_major: bool,
        w: &[u8],
        zero: impl Fn(usize) -> i32,
    ) -> PackedWeight {
        assert_eq!(
            w.len(),
            k * n,
            "PackedWeight::pack: {} bytes for {k} x {n}",
            w.len()
        );
        let b_shift = if signed { 0 } else { 128 };
        // `v ^ 0x80` is `v - 128` for a `u8` read as `i8`.
        let flip = if signed { 0u8 } else { 0x80 };
        let flip4 = u32::from_le_bytes([flip; 4]);
        let k4 = k.div_ceil(4);
        let steps = k4.next_multiple_of(amx::STEPS);
        let panels_n = n.div_ceil(NR);
        let mut panels = vec![0u8; panels_n * steps * NR * 4];
        let mut colsum = vec![0i32; panels_n * NR];
        // Panel by panel, each written in order: 4 contraction values of column 0, then of
        // column 1, ... (a scatter over all panels at once missed the cache on every byte).
        // A large weight is split into runs of panels packed side by side, one per core:
        // packing is most of a cold start's optimize stage (page faults included).
        let panel_bytes = steps * NR * 4;
        // An empty weight (`k` or `n` zero) has no panels, so no runs.
        let per_part = crate::par::units_per_run(panels_n, panels.len());
        let runs = panels
            .chunks_mut((per_part * panel_bytes).max(1))
            .zip(colsum.chunks_mut(per_part * NR))
            .enumerate()
            .collect();
        #[cfg(target_arch = "x86_64")]
        let avx2 = is_x86_feature_detected!("avx2");
        crate::par::each(runs, |(run, (panels, colsum))| {
            for (p, (panel, sums)) in panels
                .chunks_exact_mut(panel_bytes)
                .zip(colsum.chunks_exact_mut(NR))
                .enumerate()
            {
                let p = run * per_part + p;
                let (j0, cols) = (p * NR, NR.min(n - p * NR));
                // Whole steps of a whole panel of a `[k, n]` weight: 32 x 4 bytes transposed in
                // registers (the byte loop below moved ~1 byte/ns, most of a cached int8
                // decoder's load).
                #[allow(unused_mut)]
                let mut done = 0;
                #[cfg(target_arch = "x86_64")]
                if avx2 && k_major && cols == NR && k >= 4 {
                    done = k / 4;
                    // SAFETY: AVX2 was detected; rows `0..4 * done` of columns `j0..j0 + 32`
                    // are inside `w` (`j0 + 32 <= n`, `4 * done <= k`), and `panel` holds
                    // `k4 >= done` steps of 128 bytes.
                    unsafe { interleave_rows(&w[j0..], n, done, flip, panel, sums) };
                }
                for (i4, quad) in panel
                    .chunks_exact_mut(NR * 4)
                    .enumerate()
                    .take(k4)
                    .skip(done)
                {
                    let rows = 4.min(k - i4 * 4);
                    if k_major && rows == 4 && cols == NR {
                        // Whole step: interleave four source rows, a 32-bit word per column.
                        let r: [&[u8]; 4] =
                            std::array::from_fn(|ii| &w[(i4 * 4 + ii) * n + j0..][..NR]);
                        for (jj, dst) in quad.chunks_exact_mut(4).enumerate() {
                            let v = u32::from_le_bytes([r[0][jj], r[1][jj], r[2][jj], r[3][jj]]);
                            dst.copy_from_slice(&(v ^ flip4).to_le_bytes());
                        }
                    } else if k_major {
                        for ii in 0..rows {
                            let row = &w[(i4 * 4 + ii) * n + j0..][..cols];
                            for (jj, &b) in row.iter().enumerate() {
                                quad[jj * 4 + ii] = b ^ flip;
                            }
                        }
                    } else {
                        // Column `j` is `w[j * k..][..k]`: a 4-byte run per column and step.
                        for (jj, dst) in quad.chunks_exact_mut(4).take(cols).enumerate() {
                            let run = &w[(j0 + jj) * k + i4 * 4..][..rows];
                            if let Ok(word) = <[u8; 4]>::try_from(run) {
                                dst.copy_from_slice(
                                    &(u32::from_le_bytes(word) ^ flip4).to_le_bytes(),
                                );
                            } else {
                                for (d, &b) in dst.iter_mut().zip(run) {
                                    *d = b ^ flip;
                                }
                            }
                        }
                    }
                    // Column sums of the signed bytes (the padding is zero).
                    let q: &[u8; NR * 4] = (&*quad).try_into().expect("whole step");
                    for (jj, sum) in sums.iter_mut().enumerate() {
                        *sum += (q[jj * 4] as i8 as i32)
                            + (q[jj * 4 + 1] as i8 as i32)
                            + (q[jj * 4 + 2] as i8 as i32)
                            + (q[jj * 4 + 3] as i8 as i32);
                    }
                }
            }
        });
        // The kernel reads signed bytes.
        let panels = panels.into_iter().map(|b| b as i8).collect();
        let mut beta = vec![0i32; panels_n * NR];
        for (j, b) in beta.iter_mut().take(n).enumerate() {
            *b = zero(j) - b_shift;
        }
        PackedWeight {
            k,
            n,
            k4,
            steps,
            panels,
            colsum,
            beta,
        }
    }

    /// Contraction size.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Output columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// `c[r, j] = sum_i (a[r, i] - a_shift - za)(B[i, j] - zb[j])` for the `m` rows of `a`
    /// (unsigned bytes, row `r` at `r * lda`, `lda` a multiple of 4 and at least `k`, bytes
    /// from `k` to the next multiple of 4 zero), `alpha = za + a_shift`; `c` is `m x n`
    /// row-major; on `kernel`, which panics unless it [runs here](Int8Kernel::runs_here)
    /// (checked by the caller once, at load).
    pub fn matmul(
        &self,
        kernel: Int8Kernel,
        a: &[u8],
        lda: usize,
        m: usize,
        alpha: i32,
        out: Output<'_>,
    ) {
        assert!(kernel.runs_here(), "{kernel:?} int8 kernel on this CPU");
        assert!(
            m == 0
                || (lda.is_multiple_of(4)
                    && lda >= 4 * self.k4
                    && a.len() >= (m - 1) * lda + 4 * self.k4),
            "VnniMatMul: activation rows do not match k = {}",
            self.k
        );
        let panels_n = self.n.div_ceil(NR);
        // Per-column output scales, padded to whole panels.
        let (c, scales) = match out {
            Output::Sums(c) => {
                assert!(c.len() >= m * self.n);
                (c.as_mut_ptr() as usize, None)
            }
            Output::Scaled(c, scale) => {
                assert!(c.len() >= m * self.n && (scale.len() == 1 || scale.len() == self.n));
                let mut padded = vec![0f32; panels_n * NR];
                for (j, s) in padded.iter_mut().take(self.n).enumerate() {
                    *s = scale[if scale.len() == 1 { 0 } else { j }];
                }
                (c.as_mut_ptr() as usize, Some(padded))
            }
        };
        let rowsum: Vec<i32> = (0..m)
            .map(|r| a[r * lda..r * lda + self.k].iter().map(|&x| x as i32).sum())
            .collect();
        let k = self.k as i32;
        let corr: Vec<i32> = self
            .colsum
            .iter()
            .zip(&self.beta)
            .map(|(&cs, &b)| {
                k.wrapping_mul(alpha)
                    .wrapping_mul(b)
                    .wrapping_sub(alpha.wrapping_mul(cs))
            })
            .collect();
        let job = Job {
            kernel,
            w: self,
            a: a.as_ptr() as usize,
            lda,
            rowsum: &rowsum,
            corr: &corr,
            scales: scales.as_deref(),
            c,
        };
        let threads = crate::team::threads_for(m * self.k * self.n, self.k * self.n);
        // Columns, so each thread streams only its share of the weight (rows would have
        // every thread read all of it), unless there are too few panels.
        let by_rows = threads > 1 && panels_n < 2 * threads && m >= MR * 2 * threads;
        let units = if by_rows { m.div_ceil(MR) } else { panels_n };
        crate::team::for_each_run(units, threads, |run| {
            if by_rows {
                job.run(run.start * MR..(run.end * MR).min(m), 0..panels_n)
            } else {
                job.run(0..m, run)
            }
        });
    }
}

/// `steps` whole steps of one panel of a `[k, n]` weight whose column `j0` starts `w`:
/// rows `4 s .. 4 s + 4` of the panel's 32 columns become step `s` of `panel` (32 words, one
/// per column, row `4 s` in the low byte), each byte XOR `flip`; each word's signed byte sum
/// is added to its column's `sums` entry.
///
/// # Safety
/// The CPU has AVX2; `w` holds `(4 steps - 1) n + 32` bytes, `panel` `128 steps`, `sums` 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn interleave_rows(
    w: &[u8],
    n: usize,
    steps: usize,
    flip: u8,
    panel: &mut [u8],
    sums: &mut [i32],
) {
    use std::arch::x86_64::*;
    assert!(
        steps == 0
            || (w.len() >= (4 * steps - 1) * n + NR && panel.len() >= steps * NR * 4)
                && sums.len() >= NR
    );
    let flip = _mm256_set1_epi8(flip as i8);
    let (ones8, ones16) = (_mm256_set1_epi8(1), _mm256_set1_epi16(1));
    let mut acc = [_mm256_setzero_si256(); 4];
    for s in 0..steps {
        let row = |ii: usize| _mm256_loadu_si256(w.as_ptr().add((4 * s + ii) * n).cast());
        let (a, b, c, d) = (row(0), row(1), row(2), row(3));
        // Per 128-bit lane: bytes of rows 0/1 and 2/3 paired, then the pairs paired: words of
        // columns 0-3 | 16-19, 4-7 | 20-23, 8-11 | 24-27, 12-15 | 28-31.
        let (ab_lo, ab_hi) = (_mm256_unpacklo_epi8(a, b), _mm256_unpackhi_epi8(a, b));
        let (cd_lo, cd_hi) = (_mm256_unpacklo_epi8(c, d), _mm256_unpackhi_epi8(c, d));
        let q0 = _mm256_unpacklo_epi16(ab_lo, cd_lo);
        let q1 = _mm256_unpackhi_epi16(ab_lo, cd_lo);
        let q2 = _mm256_unpacklo_epi16(ab_hi, cd_hi);
        let q3 = _mm256_unpackhi_epi16(ab_hi, cd_hi);
        let words = [
            _mm256_permute2x128_si256::<0x20>(q0, q1),
            _mm256_permute2x128_si256::<0x20>(q2, q3),
            _mm256_permute2x128_si256::<0x31>(q0, q1),
            _mm256_permute2x128_si256::<0x31>(q2, q3),
        ];
        for (x, v) in words.into_iter().enumerate() {
            let v = _mm256_xor_si256(v, flip);
            _mm256_storeu_si256(panel.as_mut_ptr().add(s * NR * 4 + x * 32).cast(), v);
            let sum4 = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v), ones16);
            acc[x] = _mm256_add_epi32(acc[x], sum4);
        }
    }
    for (x, acc) in acc.into_iter().enumerate() {
        let mut lanes = [0i32; 8];
        _mm256_storeu_si256(lanes.as_mut_ptr().cast(), acc);
        for (sum, lane) in sums[x * 8..x * 8 + 8].iter_mut().zip(lanes) {
            *sum += lane;
        }
    }
}

/// One product's operands, shared by the threads that compute disjoint blocks of `c`
/// (pointers as integers so the job crosses threads).
struct Job<'a> {
    kernel: Int8Kernel,
    w: &'a PackedWeight,
    a: usize,
    lda: usize,
    rowsum: &'a [i32],
    corr: &'a [i32],
    scales: Option<&'a [f32]>,
    c: usize,
}

impl Job<'_> {
    /// Computes `c[rows, panels]`.
    fn run(&self, rows: std::ops::Range<usize>, panels: std::ops::Range<usize>) {
        if self.kernel == Int8Kernel::Amx {
            // Whole 32-row blocks, and a last one of 16 rows or more, on AMX tiles (zero
            // rows pad the last); fewer than 16 rows left on the VNNI tile.
            let tail = rows.len() % amx::ROWS;
            let split = rows.end - if tail >= amx::TILE_ROWS { 0 } else { tail };
            self.run_amx(rows.start..split, panels.clone());
            self.run_tiles(Int8Kernel::Vnni, split..rows.end, panels);
        } else {
            self.run_tiles(self.kernel, rows, panels);
        }
    }

    /// Computes `c[rows, panels]` on AMX in blocks of [`amx::ROWS`] rows: panel groups
    /// outermost, then row blocks, then panels.
    fn run_amx(&self, rows: std::ops::Range<usize>, panels: std::ops::Range<usize>) {
        #[cfg(target_arch = "x86_64")]
        {
            if rows.is_empty() || panels.is_empty() {
                return;
            }
            let w = self.w;
            let panel_bytes = w.steps * NR * 4;
            let group = (PANEL_GROUP_BYTES / panel_bytes.max(1)).max(1);
            // A block's rows with their contraction zero-padded to whole tiles, for blocks
            // that cannot be read in place.
            let row_bytes = w.steps * 4;
            // Allocated on first use: most blocks are read in place.
            let mut block = vec![];
            let mut sums = [0i32; amx::ROWS * NR];
            // SAFETY: `Job`s with the AMX kernel come from `matmul`, which checked that it
            // runs here (tile data permitted for the process).
            unsafe { amx::configure() };
            let mut g0 = panels.start;
            while g0 < panels.end {
                let g1 = (g0 + group).min(panels.end);
                let mut r0 = rows.start;
                while r0 < rows.end {
                    let rb = amx::ROWS.min(rows.end - r0);
                    // SAFETY: `matmul` checked that `a` holds `4 k4` bytes of each of its
                    // `m` rows at `lda`.
                    let first = unsafe { (self.a as *const u8).add(r0 * self.lda) };
                    let (a, lda) = if rb == amx::ROWS && row_bytes == 4 * w.k4 {
                        (first, self.lda)
                    } else {
                        block.clear();
                        block.resize(amx::ROWS * row_bytes, 0);
                        for r in 0..rb {
                            // SAFETY: as above, row `r0 + r < m`.
                            let row = unsafe {
                                std::slice::from_raw_parts(first.add(r * self.lda), 4 * w.k4)
                            };
                            block[r * row_bytes..][..4 * w.k4].copy_from_slice(row);
                        }
                        (block.as_ptr(), row_bytes)
                    };
                    for p in g0..g1 {
                        // SAFETY: the tiles read 32 rows of `steps * 4` bytes at `lda` from
                        // `a` (whole rows in place, or `block`) and `steps` steps of panel
                        // `p`; the epilogue writes rows `r0..r0 + rb` and the panel's columns
                        // of `c`, inside it as in `run_tiles`.
                        unsafe {
                            amx::block(
                                a,
                                lda,
                                w.panels.as_ptr().add(p * panel_bytes),
                                w.steps / amx::STEPS,
                                sums.as_mut_ptr(),
                            );
                            amx::epilogue(&sums, rb, &self.tile(r0, p));
                        }
                    }
                    r0 += rb;
                }
                g0 = g1;
            }
            // SAFETY: as for `configure`.
            unsafe { amx::release() };
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (rows, panels);
            unreachable!("VnniMatMul is only built on x86_64");
        }
    }

    /// The tile of rows from `r0` and panel `p`.
    ///
    /// # Safety
    /// Row `r0` and panel `p` are inside the product.
    unsafe fn tile(&self, r0: usize, p: usize) -> Tile {
        let w = self.w;
        // SAFETY: the caller's bounds; the padded vectors hold whole panels.
        unsafe {
            Tile {
                a: (self.a as *const u8).add(r0 * self.lda),
                lda: self.lda,
                b: w.panels.as_ptr().add(p * w.steps * NR * 4),
                k4: w.k4,
                rowsum: self.rowsum.as_ptr().add(r0),
                corr: self.corr.as_ptr().add(p * NR),
                beta: w.beta.as_ptr().add(p * NR),
                c: (self.c as *mut i32).add(r0 * w.n + p * NR),
                scale: match self.scales {
                    Some(s) => s.as_ptr().add(p * NR),
                    None => std::ptr::null(),
                },
                ldc: w.n,
                cols: NR.min(w.n - p * NR),
            }
        }
    }

    /// Computes `c[rows, panels]` on `kernel`'s register tiles: panel groups outermost, then
    /// row tiles, then panels.
    fn run_tiles(
        &self,
        kernel: Int8Kernel,
        rows: std::ops::Range<usize>,
        panels: std::ops::Range<usize>,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            let w = self.w;
            let panel_bytes = w.steps * NR * 4;
            let group = (PANEL_GROUP_BYTES / panel_bytes.max(1)).max(1);
            let mut g0 = panels.start;
            while g0 < panels.end {
                let g1 = (g0 + group).min(panels.end);
                let mut r0 = rows.start;
                while r0 < rows.end {
                    let mr = MR.min(rows.end - r0);
                    for p in g0..g1 {
                        // SAFETY: `matmul` checked the CPU and the sizes of `a` and `c`; row
                        // `r0 + mr - 1` and the panel's columns are inside them, and the
                        // padded vectors hold whole panels.
                        unsafe {
                            let t = self.tile(r0, p);
                            match (kernel, mr) {
                                (Int8Kernel::Vnni, 8) => tile::<8>(&t),
                                (Int8Kernel::Vnni, 7) => tile::<7>(&t),
                                (Int8Kernel::Vnni, 6) => tile::<6>(&t),
                                (Int8Kernel::Vnni, 5) => tile::<5>(&t),
                                (Int8Kernel::Vnni, 4) => tile::<4>(&t),
                                (Int8Kernel::Vnni, 3) => tile::<3>(&t),
                                (Int8Kernel::Vnni, 2) => tile::<2>(&t),
                                (Int8Kernel::Vnni | Int8Kernel::Amx, _) => tile::<1>(&t),
                                (Int8Kernel::Avx2, _) => {
                                    // Row pairs: the AVX2 tile's accumulators fill the
                                    // 16 registers at two rows.
                                    for r in (0..mr).step_by(2) {
                                        let t = Tile {
                                            a: t.a.add(r * t.lda),
                                            rowsum: t.rowsum.add(r),
                                            c: t.c.add(r * t.ldc),
                                            ..t
                                        };
                                        if mr - r >= 2 {
                                            tile_avx2::<2>(&t)
                                        } else {
                                            tile_avx2::<1>(&t)
                                        }
                                    }
                                }
                            }
                        }
                    }
                    r0 += mr;
                }
                g0 = g1;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (kernel, rows, panels);
            unreachable!("VnniMatMul is only built on x86_64");
        }
    }
}

/// One kernel call: `MR` rows of the activation against one weight panel.
#[derive(Clone, Copy)]
struct Tile {
    a: *const u8,
    lda: usize,
    b: *const i8,
    k4: usize,
    rowsum: *const i32,
    corr: *const i32,
    beta: *const i32,
    /// `i32` sums, or (when `scale` is not null) f32 values of the same size.
    c: *mut i32,
    /// 32 per-column factors: store `sum as f32 * scale` as f32 (null: the `i32` sums).
    scale: *const f32,
    ldc: usize,
    cols: usize,
}

/// `R` rows by one panel of 32 columns: `sum A'B'` with `vpdpbusd`, then the zero-point terms,
/// stored under a mask for the columns that exist.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile<const R: usize>(t: &Tile) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_si512(); 2]; R];
    for i in 0..t.k4 {
        let (b0, b1) = unsafe {
            let b = t.b.add(i * NR * 4);
            (
                _mm512_loadu_si512(b as *const _),
                _mm512_loadu_si512(b.add(64) as *const _),
            )
        };
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = unsafe { (t.a.add(r * t.lda + 4 * i) as *const i32).read_unaligned() };
            let x = _mm512_set1_epi32(x);
            acc[0] = _mm512_dpbusd_epi32(acc[0], x, b0);
            acc[1] = _mm512_dpbusd_epi32(acc[1], x, b1);
        }
    }
    let mask = |cols: usize| -> __mmask16 {
        if cols >= 16 {
            0xffff
        } else {
            ((1u32 << cols) - 1) as __mmask16
        }
    };
    let (m0, m1) = (mask(t.cols), mask(t.cols.saturating_sub(16)));
    unsafe {
        let corr = [
            _mm512_loadu_si512(t.corr as *const _),
            _mm512_loadu_si512(t.corr.add(16) as *const _),
        ];
        let beta = [
            _mm512_loadu_si512(t.beta as *const _),
            _mm512_loadu_si512(t.beta.add(16) as *const _),
        ];
        for (r, acc) in acc.iter().enumerate() {
            let rs = _mm512_set1_epi32(*t.rowsum.add(r));
            let out = t.c.add(r * t.ldc);
            for h in 0..2 {
                let v = _mm512_add_epi32(
                    acc[h],
                    _mm512_sub_epi32(corr[h], _mm512_mullo_epi32(beta[h], rs)),
                );
                let m = if h == 0 { m0 } else { m1 };
                if m == 0 {
                    continue;
                }
                if t.scale.is_null() {
                    _mm512_mask_storeu_epi32(out.add(16 * h), m, v);
                } else {
                    // The same two roundings as ONNX's Cast to float, then Mul.
                    let f =
                        _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_loadu_ps(t.scale.add(16 * h)));
                    _mm512_mask_storeu_ps(out.add(16 * h) as *mut f32, m, f);
                }
            }
        }
    }
}

/// `R` rows (1 or 2) by one panel of 32 columns on AVX2, as [`tile`] computes them: the
/// panel's 4-byte column groups sign-extended to 16 bits, the activation's 4 bytes
/// zero-extended, `vpmaddwd` summing pairs into 32 bits (exact: no saturation, unlike
/// `vpmaddubsw`), in two halves of 16 columns so the accumulators stay in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tile_avx2<const R: usize>(t: &Tile) {
    use std::arch::x86_64::*;
    for half in 0..2 {
        let c0 = 16 * half;
        if c0 >= t.cols {
            break;
        }
        // Row r, columns c0 + 4q .. c0 + 4q + 4: two partial sums per column.
        let mut acc = [[_mm256_setzero_si256(); 4]; R];
        for i in 0..t.k4 {
            // SAFETY (whole loop): the caller's bounds: R rows of k4 steps of the activation,
            // k4 steps of 128 bytes of the panel.
            let b = unsafe { t.b.add(i * NR * 4 + c0 * 4) };
            let xs: [__m256i; R] = std::array::from_fn(|r| {
                let x = unsafe { (t.a.add(r * t.lda + 4 * i) as *const i32).read_unaligned() };
                _mm256_cvtepu8_epi16(_mm_set1_epi32(x))
            });
            for q in 0..4 {
                let w = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(b.add(16 * q).cast()) });
                for (acc, x) in acc.iter_mut().zip(&xs) {
                    acc[q] = _mm256_add_epi32(acc[q], _mm256_madd_epi16(w, *x));
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            // Pairs summed: columns 0-1, 4-5 | 2-3, 6-7 (per 128-bit lane), then in order.
            let sums = [
                _mm256_permute4x64_epi64::<0xD8>(_mm256_hadd_epi32(acc[0], acc[1])),
                _mm256_permute4x64_epi64::<0xD8>(_mm256_hadd_epi32(acc[2], acc[3])),
            ];
            // SAFETY: the caller's bounds for row r of c and the panel's 32 padded entries of
            // corr, beta and scale; only columns below `cols` are written.
            unsafe {
                let rs = _mm256_set1_epi32(*t.rowsum.add(r));
                let out = t.c.add(r * t.ldc);
                for (e, s) in sums.into_iter().enumerate() {
                    let j = c0 + 8 * e;
                    if j >= t.cols {
                        break;
                    }
                    let corr = _mm256_loadu_si256(t.corr.add(j).cast());
                    let beta = _mm256_loadu_si256(t.beta.add(j).cast());
                    let v =
                        _mm256_add_epi32(s, _mm256_sub_epi32(corr, _mm256_mullo_epi32(beta, rs)));
                    let live = (t.cols - j).min(8);
                    let mut lanes = [0u32; 8];
                    if t.scale.is_null() {
                        _mm256_storeu_si256(lanes.as_mut_ptr().cast(), v);
                    } else {
                        // The same two roundings as ONNX's Cast to float, then Mul.
                        let f =
                            _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_loadu_ps(t.scale.add(j)));
                        _mm256_storeu_ps(lanes.as_mut_ptr().cast(), f);
                    }
                    std::ptr::copy_nonoverlapping(lanes.as_ptr(), out.add(j).cast::<u32>(), live);
                }
            }
        }
    }
}

/// The AMX kernel: Intel's tile registers, eight of 16 rows by 64 bytes, and `tdpbusd`,
/// which multiplies a tile of unsigned bytes by one of signed bytes in VNNI layout (a row of
/// 16 columns times 4 contraction bytes: one step of a panel's half) into a tile of 16 x 16
/// `i32` sums. The instructions are written in inline assembly (Rust has no stable AMX
/// intrinsics); Linux hands out the tile registers' state only to a process that asks
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), which [`ready`] does once.
mod amx {
    /// Steps of 4 contraction bytes per tile row: one tile holds 64 bytes of `k`.
    pub(super) const STEPS: usize = 16;
    /// Rows of one tile.
    pub(super) const TILE_ROWS: usize = 16;
    /// Rows of one block: two tiles of the activation against a panel's two halves.
    pub(super) const ROWS: usize = 2 * TILE_ROWS;

    /// Does this CPU have AMX tiles and int8 products, AVX-512 VNNI for the rows AMX leaves,
    /// and has Linux given this process the tile state? Asked once.
    pub(super) fn ready() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            *READY.get_or_init(|| {
                // CPUID leaf 7: EDX bit 24 AMX-TILE, bit 25 AMX-INT8.
                #[allow(unused_unsafe)]
                // SAFETY: leaf 7 exists on every CPU with AVX-512 (checked first).
                let edx = super::available()
                    .then(|| unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.edx);
                const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
                const XFEATURE_XTILEDATA: libc::c_long = 18;
                edx.is_some_and(|edx| edx & (3 << 24) == 3 << 24)
                    // SAFETY: a request for a permission; it changes nothing else.
                    && unsafe {
                        libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
                    } == 0
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// Tile configuration (palette 1): tiles 0-7 of 16 rows by 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    /// Configures this thread's tiles for [`block`].
    ///
    /// # Safety
    /// [`ready`] returned true.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn configure() {
        let mut config = Config([0; 64]);
        config.0[0] = 1;
        for t in 0..8 {
            config.0[16 + 2 * t] = 64;
            config.0[48 + t] = TILE_ROWS as u8;
        }
        // SAFETY: a valid palette-1 configuration, read from memory only.
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly))
        };
    }

    /// Returns this thread's tiles to their initial state.
    ///
    /// # Safety
    /// [`ready`] returned true.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn release() {
        // SAFETY: touches the tile state only.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }

    /// `sums` (32 x 32 `i32`, row-major) = rows `0..32` of `a` (`lda` apart, `64 chunks`
    /// bytes each) times one panel `b` (`16 chunks` steps of 128 bytes): tiles 0 and 1 hold
    /// the activation's two 16-row halves, 2 and 3 the panel's two 16-column halves, 4-7 the
    /// four quarters of the sums.
    ///
    /// # Safety
    /// The tiles are [configured](configure); `a`, `b` and `sums` hold what is read and
    /// written.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn block(
        a: *const u8,
        lda: usize,
        b: *const i8,
        chunks: usize,
        sums: *mut i32,
    ) {
        use std::arch::asm;
        let step = super::NR * 4;
        // SAFETY (whole function): the caller's bounds; only tile registers and the
        // operands' memory are touched.
        unsafe {
            asm!(
                "tilezero tmm4",
                "tilezero tmm5",
                "tilezero tmm6",
                "tilezero tmm7",
                options(nostack, nomem)
            );
            for i in 0..chunks {
                let a0 = a.add(64 * i);
                let b0 = b.add(i * STEPS * step);
                asm!(
                    "tileloadd tmm0, [{a0} + {lda} * 1]",
                    "tileloadd tmm1, [{a1} + {lda} * 1]",
                    "tileloadd tmm2, [{b0} + {step} * 1]",
                    "tileloadd tmm3, [{b1} + {step} * 1]",
                    "tdpbusd tmm4, tmm0, tmm2",
                    "tdpbusd tmm5, tmm0, tmm3",
                    "tdpbusd tmm6, tmm1, tmm2",
                    "tdpbusd tmm7, tmm1, tmm3",
                    a0 = in(reg) a0,
                    a1 = in(reg) a0.add(TILE_ROWS * lda),
                    b0 = in(reg) b0,
                    b1 = in(reg) b0.add(64),
                    lda = in(reg) lda,
                    step = in(reg) step,
                    options(nostack, readonly)
                );
            }
            let row = super::NR * 4;
            asm!(
                "tilestored [{c0} + {row} * 1], tmm4",
                "tilestored [{c1} + {row} * 1], tmm5",
                "tilestored [{c2} + {row} * 1], tmm6",
                "tilestored [{c3} + {row} * 1], tmm7",
                c0 = in(reg) sums,
                c1 = in(reg) sums.add(TILE_ROWS),
                c2 = in(reg) sums.add(TILE_ROWS * super::NR),
                c3 = in(reg) sums.add(TILE_ROWS * super::NR + TILE_ROWS),
                row = in(reg) row,
                options(nostack)
            );
        }
    }

    /// The first `rows` rows of a [`block`]'s sums through the VNNI tile's epilogue: the
    /// zero-point terms, the scale, a masked store of the panel's `cols` columns.
    ///
    /// # Safety
    /// AVX-512 F; `t` as for the VNNI tile, for `rows` rows.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn epilogue(sums: &[i32; ROWS * super::NR], rows: usize, t: &super::Tile) {
        use std::arch::x86_64::*;
        let m0 = if t.cols >= 16 {
            0xFFFF
        } else {
            (1u16 << t.cols) - 1
        };
        let m1 = if t.cols <= 16 {
            0
        } else {
            ((1u32 << (t.cols - 16)) - 1) as u16
        };
        // SAFETY (whole function): the caller's bounds for rows `0..rows` of `c` and the
        // panel's 32 padded entries of corr, beta and scale.
        unsafe {
            let corr = [0, 1].map(|h| _mm512_loadu_si512(t.corr.add(16 * h).cast()));
            let beta = [0, 1].map(|h| _mm512_loadu_si512(t.beta.add(16 * h).cast()));
            let scale =
                (!t.scale.is_null()).then(|| [0, 1].map(|h| _mm512_loadu_ps(t.scale.add(16 * h))));
            for r in 0..rows {
                let rs = _mm512_set1_epi32(*t.rowsum.add(r));
                let out = t.c.add(r * t.ldc);
                for (h, m) in [m0, m1].into_iter().enumerate() {
                    if m == 0 {
                        continue;
                    }
                    let acc = _mm512_loadu_si512(sums.as_ptr().add(r * super::NR + 16 * h).cast());
                    let v = _mm512_add_epi32(
                        acc,
                        _mm512_sub_epi32(corr[h], _mm512_mullo_epi32(beta[h], rs)),
                    );
                    match scale {
                        None => _mm512_mask_storeu_epi32(out.add(16 * h), m, v),
                        // The same two roundings as ONNX's Cast to float, then Mul.
                        Some(s) => _mm512_mask_storeu_ps(
                            out.add(16 * h) as *mut f32,
                            m,
                            _mm512_mul_ps(_mm512_cvtepi32_ps(v), s[h]),
                        ),
                    }
                }
            }
        }
    }
}

/// `(min, max)` of `xs` and 0 (the range ONNX `DynamicQuantizeLinear` quantizes), 16 lanes at
/// a time; `None` without AVX-512.
pub fn range_with_zero(xs: &[f32]) -> Option<(f32, f32)> {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has AVX-512 F (checked above).
        return Some(unsafe { range_avx512(xs) });
    }
    let _ = xs;
    None
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn range_avx512(xs: &[f32]) -> (f32, f32) {
    use std::arch::x86_64::*;
    let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let chunks = xs.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        // SAFETY: `c` holds 16 floats.
        let v = unsafe { _mm512_loadu_ps(c.as_ptr()) };
        lo = _mm512_min_ps(lo, v);
        hi = _mm512_max_ps(hi, v);
    }
    let (mut lo, mut hi) = (_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi));
    for &x in tail {
        lo = if x < lo { x } else { lo };
        hi = if x > hi { x } else { hi };
    }
    (lo, hi)
}

/// `ys[i] = saturate(round_half_even(xs[i] / scale) + zero)` (ONNX `DynamicQuantizeLinear`'s
/// rounding, exact: the same IEEE division), 16 lanes at a time; `false` (nothing written)
/// without AVX-512.
pub fn quantize_u8(xs: &[f32], scale: f32, zero: u8, ys: &mut [u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has AVX-512 F (checked above).
        unsafe { quantize_avx512(xs, scale, zero, ys) };
        return true;
    }
    let _ = (xs, scale, zero, ys);
    false
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_avx512(xs: &[f32], scale: f32, zero: u8, ys: &mut [u8]) {
    use std::arch::x86_64::*;
    assert_eq!(xs.len(), ys.len());
    let (s, z) = (_mm512_set1_ps(scale), _mm512_set1_epi32(zero as i32));
    let (lo, hi) = (_mm512_setzero_si512(), _mm512_set1_epi32(255));
    let n = xs.len() / 16 * 16;
    for i in (0..n).step_by(16) {
        // SAFETY: i + 16 <= len of both slices.
        unsafe {
            let q = _mm512_div_ps(_mm512_loadu_ps(xs.as_ptr().add(i)), s);
            // In the default rounding mode (nearest, ties to even), as the scalar code.
            let q = _mm512_add_epi32(_mm512_cvtps_epi32(q), z);
            let q = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi);
            _mm_storeu_si128(
                ys.as_mut_ptr().add(i) as *mut __m128i,
                _mm512_cvtepi32_epi8(q),
            );
        }
    }
    for (y, &x) in ys[n..].iter_mut().zip(&xs[n..]) {
        *y = ((x / scale).round_ties_even() as i32 + zero as i32).clamp(0, 255) as u8;
    }
}

/// An ONNX `MatMulInteger` with a constant `[k, n]` weight on the VNNI kernel: inputs are the
/// activation (`u8` or `i8`, contraction on its last axis) and its zero point; the output is
/// the `i32` product with the activation's outer axes and `n` last. `scaled`: a third input
/// (f32, one value or one per column) multiplies the product, output as f32 (the `Cast` and
/// `Mul` that follow a `MatMulInteger` in a dynamic-int8 export, fused). The kernel is the
/// CPU's best ([`int8_kernel`]), chosen at load.
#[derive(Clone)]
pub struct VnniMatMul {
    weight: Arc<PackedWeight>,
    act_signed: bool,
    scaled: bool,
    kernel: Int8Kernel,
}

impl std::fmt::Debug for VnniMatMul {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VnniMatMul(k={}, n={})", self.weight.k, self.weight.n)
    }
}

impl PartialEq for VnniMatMul {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weight, &other.weight)
            && self.act_signed == other.act_signed
            && self.scaled == other.scaled
            && self.kernel == other.kernel
    }
}

impl Eq for VnniMatMul {}

impl Op for VnniMatMul {
    fn name(&self) -> StaticName {
        match self.kernel {
            Int8Kernel::Amx => "EdgevlmAmxInt8MatMul".into(),
            Int8Kernel::Vnni => "EdgevlmVnniMatMul".into(),
            Int8Kernel::Avx2 => "EdgevlmAvx2Int8MatMul".into(),
        }
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "k={}, n={}, {} activation{}",
            self.weight.k,
            self.weight.n,
            if self.act_signed { "i8" } else { "u8" },
            if self.scaled {
                ", scaled f32 output"
            } else {
                ""
            }
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for VnniMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (k, n) = (self.weight.k, self.weight.n);
        let act = &inputs[0];
        let za = inputs[1].cast_to_scalar::<i32>()?;
        let shape = act.shape();
        ensure!(
            shape.last() == Some(&k),
            "VnniMatMul: activation {shape:?} does not end with k = {k}"
        );
        let m = act.len() / k.max(1);
        let mut out_shape: TVec<usize> = shape[..shape.len() - 1].into();
        out_shape.push(n);
        let a_shift = if self.act_signed { 128 } else { 0 };
        let plain = act.try_as_plain_ram()?;
        // A row stride in whole 4-byte steps, zeros past k, signed bytes made unsigned.
        let lda = k.next_multiple_of(4);
        let padded;
        let (a, lda) = if self.act_signed {
            let s = plain.as_slice::<i8>()?;
            padded = padded_rows(s, k, lda, |x| (x as u8) ^ 0x80);
            (&padded[..], lda)
        } else if k % 4 != 0 {
            padded = padded_rows(plain.as_slice::<u8>()?, k, lda, |x| x);
            (&padded[..], lda)
        } else {
            (plain.as_slice::<u8>()?, k)
        };
        let alpha = za + a_shift;
        let out = if self.scaled {
            let scale = inputs[2].cast_to::<f32>()?;
            let scale = scale.try_as_plain_ram()?;
            let scale = scale.as_slice::<f32>()?;
            ensure!(
                scale.len() == 1 || scale.len() == n,
                "VnniMatMul: {} scales for {n} columns",
                scale.len()
            );
            let mut out = Tensor::zero::<f32>(&out_shape)?;
            {
                let mut out_plain = out.try_as_plain_ram_mut()?;
                let c = out_plain.as_slice_mut::<f32>()?;
                self.weight
                    .matmul(self.kernel, a, lda, m, alpha, Output::Scaled(c, scale));
            }
            out
        } else {
            let mut out = Tensor::zero::<i32>(&out_shape)?;
            {
                let mut out_plain = out.try_as_plain_ram_mut()?;
                let c = out_plain.as_slice_mut::<i32>()?;
                self.weight
                    .matmul(self.kernel, a, lda, m, alpha, Output::Sums(c));
            }
            out
        };
        Ok(tvec!(out.into_tvalue()))
    }
}

/// The rows of `k` values in `src` as bytes `f(x)`, each row padded with zeros to `lda`.
fn padded_rows<T: Copy>(src: &[T], k: usize, lda: usize, f: impl Fn(T) -> u8) -> Vec<u8> {
    let rows = src.len() / k.max(1);
    let mut buf = vec![0u8; rows * lda];
    for (row, x) in buf.chunks_exact_mut(lda).zip(src.chunks_exact(k.max(1))) {
        row.iter_mut().zip(x).for_each(|(d, &x)| *d = f(x));
    }
    buf
}

impl TypedOp for VnniMatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let act = &inputs[0].shape;
        let mut shape: TVec<TDim> = act.iter().take(act.rank() - 1).cloned().collect();
        shape.push(self.weight.n.to_dim());
        Ok(tvec!(if self.scaled {
            f32::fact(shape)
        } else {
            i32::fact(shape)
        }))
    }

    as_op!();
}

/// How an einsum's axes map onto the kernel's `[rows, k] x [k, n]`: the contracted axes (in
/// the weight's order, leading or trailing in the weight), the weight's column axis, the
/// activation's outer axes in its order and the output's in output order (a permutation of
/// them, `n` last), and the activation's axes as the einsum has them. Where the contracted
/// axes are not the activation's last ones in that order, [`replace_product`] moves them
/// there.
#[derive(Debug, PartialEq)]
pub(crate) struct ProductLayout {
    pub(crate) contracted: String,
    pub(crate) n: char,
    pub(crate) k_major: bool,
    pub(crate) outer: String,
    pub(crate) output_outer: String,
    pub(crate) activation: String,
}

impl ProductLayout {
    /// The moves that turn the activation's axes into `outer` then `contracted`, in order.
    fn activation_moves(&self) -> Vec<AxisOp> {
        let to = format!("{}{}", self.outer, self.contracted);
        let moves = moves(&self.activation, &to);
        moves.into_iter().map(|(a, b)| AxisOp::Move(a, b)).collect()
    }
}

/// The axis moves (from, to), in turn, that take axes labelled `from` into the order `to`
/// (the same letters): as few as there can be, each a copy of the tensor. The longest run
/// of axes already in `to`'s relative order stays; every other axis moves once, next to
/// the axis before it in `to` (`[b, c, h, w] -> [b, h, w, c]` is one move, not two).
fn moves(from: &str, to: &str) -> Vec<(usize, usize)> {
    let target: Vec<char> = to.chars().collect();
    let mut order: Vec<char> = from.chars().collect();
    let ranks: Vec<usize> = order
        .iter()
        .map(|c| target.iter().position(|t| t == c).unwrap())
        .collect();
    // The longest increasing run of ranks (the first, on a tie), by predecessor links.
    let n = ranks.len();
    let (mut len, mut prev) = (vec![1usize; n], vec![None; n]);
    for i in 0..n {
        for j in 0..i {
            if ranks[j] < ranks[i] && len[j] + 1 > len[i] {
                (len[i], prev[i]) = (len[j] + 1, Some(j));
            }
        }
    }
    let mut placed = vec![false; target.len()];
    let mut kept = (0..n).rev().max_by_key(|&i| len[i]);
    while let Some(i) = kept {
        placed[ranks[i]] = true;
        kept = prev[i];
    }
    let mut moves = vec![];
    for (r, &c) in target.iter().enumerate() {
        if placed[r] {
            continue;
        }
        let from = order.iter().position(|&x| x == c).unwrap();
        order.remove(from);
        let at = (0..r).rev().find(|&q| placed[q]).map_or(0, |q| {
            order.iter().position(|&x| x == target[q]).unwrap() + 1
        });
        order.insert(at, c);
        if from != at {
            moves.push((from, at));
        }
        placed[r] = true;
    }
    debug_assert_eq!(order, target);
    moves
}

pub(crate) fn product_layout(a: &str, b: &str, outputs: &[String]) -> Option<ProductLayout> {
    let [out] = outputs else { return None };
    // A letter twice in one operand is a diagonal, not a product.
    let repeats = |s: &str| {
        s.chars()
            .enumerate()
            .any(|(i, c)| s.chars().take(i).any(|d| d == c))
    };
    if repeats(a) || repeats(b) || repeats(out) {
        return None;
    }
    let contracted: String = b
        .chars()
        .filter(|c| a.contains(*c) && !out.contains(*c))
        .collect();
    let rest: Vec<char> = b.chars().filter(|c| !contracted.contains(*c)).collect();
    let (&[n], false) = (&rest[..], contracted.is_empty()) else {
        return None;
    };
    if a.contains(n) {
        return None;
    }
    let k_major = *b == format!("{contracted}{n}");
    if !k_major && *b != format!("{n}{contracted}") {
        return None;
    }
    let outer: String = a.chars().filter(|c| !contracted.contains(*c)).collect();
    let output_outer = out.strip_suffix(n)?;
    let mut sorted = (
        outer.chars().collect::<Vec<_>>(),
        output_outer.chars().collect::<Vec<_>>(),
    );
    sorted.0.sort_unstable();
    sorted.1.sort_unstable();
    (sorted.0 == sorted.1).then(|| ProductLayout {
        contracted,
        n,
        k_major,
        outer,
        output_outer: output_outer.to_string(),
        activation: a.to_string(),
    })
}

/// A `VnniMatMul` for `node` if it is an ONNX `MatMulInteger` as tract loads it (see
/// [`crate::patches::is_matmul_integer`]) with a constant weight, a scalar activation zero
/// point, a constant per-tensor or per-column weight zero point, zero bias and unit scales,
/// and axes the kernel can take (see [`ProductLayout`]), with that layout.
fn vnni_product(
    model: &TypedModel,
    node: &TypedNode,
    kernel: Int8Kernel,
) -> TractResult<Option<(VnniMatMul, ProductLayout)>> {
    if !crate::patches::is_matmul_integer(model, node)? {
        return Ok(None);
    }
    let op = node.op_as::<EinSum>().unwrap();
    let facts = model.node_input_facts(node.id)?;
    let (act, weight, a0, b0) = (facts[0], facts[1], facts[3], facts[5]);
    let byte = |dt: DatumType| [u8::datum_type(), i8::datum_type()].contains(&dt);
    let (Some(w), Some(zb)) = (&weight.konst, &b0.konst) else {
        return Ok(None);
    };
    if !byte(act.datum_type)
        || !byte(weight.datum_type)
        || a0.shape.volume() != 1.to_dim()
        || node.outputs[0].fact.datum_type != i32::datum_type()
    {
        return Ok(None);
    }
    let (inputs, outputs) = op.axes.to_strs();
    let (a, b) = (&inputs[0], &inputs[1]);
    let Some(layout) = product_layout(a, b, &outputs) else {
        return Ok(None);
    };
    // Contracted axes out of place are moved in front of the kernel (`replace_product`): a
    // static QDQ decoder's `o_proj` has the heads' transpose folded in once its attention
    // is grouped (`crate::quant::quantize_before_repeats`), its 8-bit activation
    // `[batch, groups, per_group, rows, width]` contracted over all but the rows.
    if inputs[2..]
        .iter()
        .any(|s| s.chars().any(|c| layout.contracted.contains(c)))
    {
        return Ok(None);
    }
    let dim = |c: char| w.shape()[b.chars().position(|x| x == c).unwrap()];
    let k: usize = layout.contracted.chars().map(dim).product();
    let n = dim(layout.n);
    let k_axis = if layout.k_major { 0 } else { 1 };
    if zb.len() != 1 && zb.len() != n {
        return Ok(None);
    }
    let zb = zb.cast_to::<i32>()?;
    let zb = zb.try_as_plain_ram()?;
    let zbs = zb.as_slice::<i32>()?;
    let zero = |j: usize| zbs[if zbs.len() == 1 { 0 } else { j }];
    let plain = w.try_as_plain_ram()?;
    let packed = if weight.datum_type == i8::datum_type() {
        let ws = plain.as_slice::<i8>()?;
        // SAFETY: `i8` and `u8` have the same size and alignment, and every bit pattern is
        // valid for both.
        let bytes = unsafe { std::slice::from_raw_parts(ws.as_ptr() as *const u8, ws.len()) };
        PackedWeight::pack(k, n, true, k_axis == 0, bytes, zero)
    } else {
        let ws = plain.as_slice::<u8>()?;
        PackedWeight::pack(k, n, false, k_axis == 0, ws, zero)
    };
    Ok(Some((
        VnniMatMul {
            weight: Arc::new(packed),
            act_signed: act.datum_type == i8::datum_type(),
            scaled: false,
            kernel,
        },
        layout,
    )))
}

/// Replaces the product `id` (an einsum with `layout`) by `op` on `inputs` (the activation
/// first): several contracted axes are merged into one by a reshape in front, and the outer
/// axes moved into the einsum's output order behind (`n` stays last).
pub(crate) fn replace_product(
    model: &mut TypedModel,
    id: usize,
    layout: &ProductLayout,
    inputs: &[OutletId],
    op: impl TypedOp,
) -> TractResult<()> {
    let node = model.node(id);
    let mut patch = TypedModelPatch::new(format!("edgevlm product {}", node.name));
    let mut taps = patch.taps(model, inputs)?;
    let gather = layout.activation_moves();
    if !gather.is_empty() {
        // The barrier keeps tract's declutter from folding the moves back into the
        // activation's producer (an attention's value product, which would then no longer
        // be fused).
        let name = format!("{}.edgevlm_fold_barrier_0", node.name);
        taps[0] = patch.wire_node(name, crate::patches::FoldBarrier, &[taps[0]])?[0];
        for (i, op) in gather.into_iter().enumerate() {
            let name = format!("{}.gather_k_{i}", node.name);
            taps[0] = patch.wire_node(name, op, &[taps[0]])?[0];
        }
    }
    let at = layout.outer.len();
    if layout.contracted.len() > 1 {
        let dims: TVec<TDim> = patch.outlet_fact(taps[0])?.shape[at..].into();
        let k = dims.iter().product::<TDim>();
        let name = format!("{}.merge_k", node.name);
        taps[0] = patch.wire_node(name, AxisOp::Reshape(at, dims, tvec![k]), &[taps[0]])?[0];
    }
    let mut wire = patch.wire_node(&node.name, op, &taps)?[0];
    for (from, to) in moves(&layout.outer, &layout.output_outer) {
        let name = format!("{}.move_{from}_{to}", node.name);
        wire = patch.wire_node(name, AxisOp::Move(from, to), &[wire])?[0];
    }
    patch.shunt_outside(model, id.into(), wire)?;
    patch.apply(model)
}

/// Replaces every ONNX `MatMulInteger` with a constant weight (see [`VnniMatMul`]) by
/// edgevlm's int8 kernel, when this CPU has one (VNNI, else AVX2). Run after tract's last
/// declutter and before its optimizer, which then has these products out of its way. Returns
/// the kernel and how many were replaced.
pub fn vnni_int8_products(model: &mut TypedModel) -> TractResult<(Option<Int8Kernel>, usize)> {
    let Some(kernel) = int8_kernel() else {
        return Ok((None, 0));
    };
    let mut targets = vec![];
    for node in model.nodes() {
        if let Some(found) = vnni_product(model, node, kernel)? {
            targets.push((node.id, found));
        }
    }
    for (id, (op, layout)) in targets.iter() {
        let node = model.node(*id);
        let inputs = [node.inputs[0], node.inputs[3]];
        replace_product(model, *id, layout, &inputs, op.clone())?;
    }
    Ok((Some(kernel), targets.len()))
}

/// Where this CPU has an int8 kernel ([`int8_kernel`]), rewrites every 8-bit convolution
/// that is a ViT's patch embedding (ONNX `ConvInteger` as
/// tract loads it: i32 sums, no groups, stride equal to the kernel, no padding or dilation,
/// a constant OIHW kernel, an NCHW input of known height and width) into the `MatMulInteger`
/// it is: the input cut into `kh x kw` patches, each patch a row of `c * kh * kw` bytes,
/// times the kernel as a `[o, c * kh * kw]` weight. [`vnni_int8_products`] then runs it on
/// edgevlm's int8 kernel. tract 0.23.9 lowers the convolution to an `Im2col` and its own
/// int8 kernel: 1227 of the 2485 ms of the probe uint8 vision encoder on an AVX2 CPU. Rows
/// and columns past the last whole patch are dropped, as the convolution drops them. Same
/// integers. Returns how many were rewritten.
pub fn patch_convs_as_products(model: &mut TypedModel) -> TractResult<usize> {
    if int8_kernel().is_none() {
        return Ok(0);
    }
    let mut targets = vec![];
    for node in model.nodes() {
        if let Some(found) = patch_conv(model, node)? {
            targets.push((node.id, found));
        }
    }
    for (id, (hp, wp)) in &targets {
        let node = model.node(*id);
        let conv = node.op_as::<Conv>().unwrap();
        let (kh, kw) = (
            conv.pool_spec.kernel_shape[0],
            conv.pool_spec.kernel_shape[1],
        );
        let o = conv.output_channels();
        let facts: Vec<TypedFact> = model.node_input_facts(*id)?.into_iter().cloned().collect();
        let node_name = node.name.clone();
        let mut patch = TypedModelPatch::new(format!("edgevlm patch conv {node_name}"));
        let mut taps = patch.taps(model, &node.inputs)?;
        let name = |what: &str| format!("{node_name}.{what}");
        // [n, c, h, w] -> [n, c, hp * kh, wp * kw] -> [n, c, hp, kh, wp, kw]
        // -> [n, hp, wp, c, kh, kw]: one patch per row, in the kernel's (c, kh, kw) order.
        let mut x = taps[0];
        for (axis, keep) in [(2, hp * kh), (3, wp * kw)] {
            let dim = facts[0].shape[axis].to_usize()?;
            if dim != keep {
                x = patch.wire_node(
                    name(&format!("crop{axis}")),
                    Slice::new(axis, 0, keep),
                    &[x],
                )?[0];
            }
        }
        for (axis, p, k) in [(2, *hp, kh), (4, *wp, kw)] {
            let split =
                AxisOp::Reshape(axis, tvec![(p * k).to_dim()], tvec![p.to_dim(), k.to_dim()]);
            x = patch.wire_node(name(&format!("split{axis}")), split, &[x])?[0];
        }
        x = patch.wire_node(name("rows_h"), AxisOp::Move(2, 1), &[x])?[0];
        x = patch.wire_node(name("rows_w"), AxisOp::Move(4, 2), &[x])?[0];
        taps[0] = x;
        // The zero points and (unit) scales: scalars, or one value per output channel.
        let mut strs = vec!["nhwcyx".to_string(), "ocyx".to_string()];
        for (slot, fact) in facts.iter().enumerate().skip(2) {
            strs.push(match (fact.rank(), fact.shape.volume().to_usize()?) {
                (0, _) => String::new(),
                (1, v) if v == o && o > 1 => "o".to_string(),
                (_, 1) => {
                    let mut t = taps[slot];
                    for _ in 0..fact.rank() {
                        t = patch.wire_node(name(&format!("scalar{slot}")), AxisOp::Rm(0), &[t])?
                            [0];
                    }
                    taps[slot] = t;
                    String::new()
                }
                _ => bail!("unexpected quantization input {fact:?}"),
            });
        }
        let op = EinSum {
            axes: AxesMapping::from_strs(&strs, &["nhwo"])?,
            operating_dt: i32::datum_type(),
            q_params: Some(i32::datum_type()),
        };
        let sums = patch.wire_node(name("product"), op, &taps)?[0];
        let out = patch.wire_node(&node_name, AxisOp::Move(3, 1), &[sums])?[0];
        patch.shunt_outside(model, (*id).into(), out)?;
        patch.apply(model)?;
    }
    Ok(targets.len())
}

/// The whole patches along height and width if `node` is a convolution
/// [`patch_convs_as_products`] rewrites.
fn patch_conv(model: &TypedModel, node: &TypedNode) -> TractResult<Option<(usize, usize)>> {
    let Some(conv) = node.op_as::<Conv>() else {
        return Ok(None);
    };
    let spec = &conv.pool_spec;
    let facts = model.node_input_facts(node.id)?;
    let (input, kernel) = (facts[0], facts[1]);
    let shape = &input.shape;
    if shape.rank() != 4 {
        return Ok(None);
    }
    let (Ok(h), Ok(w)) = (shape[2].to_usize(), shape[3].to_usize()) else {
        return Ok(None);
    };
    let ks = &spec.kernel_shape[..];
    let plain = conv.q_params == Some(i32::datum_type())
        && conv.group == 1
        && conv.kernel_fmt == KernelFormat::OIHW
        && spec.data_format == DataFormat::NCHW
        && ks.len() == 2
        && *spec.strides() == *ks
        && spec.dilations().iter().all(|d| *d == 1)
        && h >= ks[0]
        && w >= ks[1]
        && spec
            .computed_padding(&[h, w])
            .iter()
            .all(|p| p.pad_before == 0 && p.pad_after == 0)
        && kernel.konst.is_some()
        && kernel.shape.as_concrete()
            == Some(&[conv.output_channels(), conv.input_channels(), ks[0], ks[1]][..])
        && [u8::datum_type(), i8::datum_type()].contains(&input.datum_type)
        && [u8::datum_type(), i8::datum_type()].contains(&kernel.datum_type)
        && facts[3].shape.volume().is_one()
        && facts[5].konst.is_some()
        && crate::patches::has_integer_q_inputs(model, node)?;
    Ok(plain.then_some((h / ks[0], w / ks[1])))
}

/// Folds `Cast(to f32) -> Mul(scale)` after each [`VnniMatMul`] into the op (`scaled`), where
/// the scale is one f32 value or one per output column (on the last axis) and neither result
/// has another consumer: the same two roundings, in the kernel's epilogue instead of two
/// passes over the output. Run after [`vnni_int8_products`]. Returns how many were folded.
pub fn fuse_int8_scales(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::binary::TypedBinOp;
    use tract_onnx::tract_core::ops::cast::Cast;
    use tract_onnx::tract_core::ops::math::Mul;
    let only = |outlet: OutletId| {
        let succ = model.outlet_successors(outlet);
        (succ.len() == 1).then(|| succ[0].node)
    };
    let mut targets = vec![];
    for node in model.nodes() {
        let Some(op) = node.op_as::<VnniMatMul>() else {
            continue;
        };
        if op.scaled {
            continue;
        }
        let Some(cast) = only(OutletId::new(node.id, 0)).map(|c| model.node(c)) else {
            continue;
        };
        if cast
            .op_as::<Cast>()
            .is_none_or(|c| c.to != f32::datum_type())
        {
            continue;
        }
        let Some(mul) = only(OutletId::new(cast.id, 0)).map(|c| model.node(c)) else {
            continue;
        };
        let is_mul = mul
            .op_as::<TypedBinOp>()
            .is_some_and(|b| b.0.is::<Mul>() && mul.inputs.len() == 2);
        if !is_mul {
            continue;
        }
        let scale = mul.inputs[(mul.inputs[0].node == cast.id) as usize];
        let fact = model.outlet_fact(scale)?;
        let n = op.weight.n;
        let out_rank = mul.outputs[0].fact.rank();
        let per_column = fact.rank() <= out_rank
            && fact.shape.iter().rev().skip(1).all(|d| d.is_one())
            && fact.shape.last().is_some_and(|d| *d == n.to_dim());
        let scalar = fact.shape.volume().is_one() && fact.rank() <= out_rank;
        if fact.datum_type == f32::datum_type()
            && (scalar || per_column)
            && mul.outputs[0].fact.shape == cast.outputs[0].fact.shape
        {
            targets.push((node.id, mul.id, scale));
        }
    }
    for (id, mul, scale) in &targets {
        let node = model.node(*id);
        let op = VnniMatMul {
            scaled: true,
            ..node.op_as::<VnniMatMul>().unwrap().clone()
        };
        let mut patch = TypedModelPatch::new(format!("edgevlm int8 scale {}", node.name));
        let taps = patch.taps(model, &[node.inputs[0], node.inputs[1], *scale])?;
        let out = patch.wire_node(format!("{}.scaled", node.name), op, &taps)?[0];
        patch.shunt_outside(model, OutletId::new(*mul, 0), out)?;
        patch.apply(model)?;
    }
    Ok(targets.len())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// tract's executor for `threads` (single-threaded for 1), for the kernels' thread splits.
    pub(crate) fn executor(threads: usize) -> tract_linalg::multithread::Executor {
        if threads > 1 {
            tract_linalg::multithread::Executor::multithread(threads)
        } else {
            tract_linalg::multithread::Executor::SingleThread
        }
    }

    /// A small deterministic generator (tests need no extra crate).
    pub(crate) fn lcg(seed: &mut u64) -> u32 {
        *seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (*seed >> 33) as u32
    }

    /// Which einsum axis layouts the kernel takes, and how their axes map onto it.
    #[test]
    fn empty_weights_pack_to_nothing() {
        for (k, n) in [(8, 0), (0, 5), (0, 0)] {
            let packed = PackedWeight::pack(k, n, true, true, &[], |_| 0);
            assert_eq!((packed.k(), packed.n()), (k, n));
            assert!(packed.panels.is_empty());
        }
    }

    #[test]
    fn product_layouts() {
        let layout = |a: &str, b: &str, out: &str| product_layout(a, b, &[out.to_string()]);
        let plain = layout("amk", "kn", "amn").unwrap();
        assert_eq!(
            (plain.contracted.as_str(), plain.n, plain.k_major),
            ("k", 'n', true)
        );
        assert!(!layout("amk", "nk", "amn").unwrap().k_major);
        // Heads x head_dim contracted at once (an out projection after tract's reshape fold).
        let merged = layout("ambk", "bkn", "amn").unwrap();
        assert_eq!(
            (merged.contracted.as_str(), merged.outer.as_str()),
            ("bk", "am")
        );
        // Outer axes permuted in the output (a transpose folded into the product).
        assert_eq!(layout("ambk", "kn", "abmn").unwrap().output_outer, "abm");
        // Contracted axes not trailing, or in another order than the weight's: moved, in
        // the weight's order (an out projection with the heads' transpose folded in).
        let gathered = layout("acbmk", "cbkn", "amn").unwrap();
        assert_eq!(
            (gathered.contracted.as_str(), gathered.outer.as_str()),
            ("cbk", "am")
        );
        assert_eq!(
            gathered.activation_moves(),
            vec![AxisOp::Move(3, 1)],
            "acbmk -> amcbk"
        );
        assert_eq!(
            layout("ambk", "kbn", "amn").unwrap().activation_moves(),
            vec![AxisOp::Move(3, 2)]
        );
        assert!(merged.activation_moves().is_empty());
        // A feature map's channels contracted: one move, not one per axis it passes.
        assert_eq!(
            layout("achw", "cn", "ahwn").unwrap().activation_moves(),
            vec![AxisOp::Move(1, 3)]
        );
        // Every order of four axes reached, in as few moves as there can be (four axes
        // minus the longest run already in order).
        let letters = ['a', 'b', 'c', 'd'];
        for p in 0..24usize {
            let mut rest = letters.to_vec();
            let mut to = String::new();
            let mut q = p;
            for radix in (1..=4).rev() {
                to.push(rest.remove(q % radix));
                q /= radix;
            }
            let mut order: Vec<char> = letters.to_vec();
            let ms = moves("abcd", &to);
            for &(from, at) in &ms {
                let c = order.remove(from);
                order.insert(at, c);
            }
            assert_eq!(order.iter().collect::<String>(), to);
            let ranks: Vec<usize> = letters.iter().map(|c| to.find(*c).unwrap()).collect();
            let longest = (1..=4)
                .rev()
                .find(|&k| {
                    (0..1usize << 4).any(|set| {
                        set.count_ones() as usize == k && {
                            let picked: Vec<usize> = (0..4)
                                .filter(|i| set >> i & 1 == 1)
                                .map(|i| ranks[i])
                                .collect();
                            picked.windows(2).all(|w| w[0] < w[1])
                        }
                    })
                })
                .unwrap();
            assert_eq!(ms.len(), 4 - longest, "abcd -> {to}: {ms:?}");
        }
        // Not the kernel's shape: n not last, a batch axis on the weight, a diagonal.
        assert_eq!(layout("amk", "kn", "anm"), None);
        assert_eq!(layout("abmk", "bkn", "abmn"), None);
        assert_eq!(layout("ak", "kkn", "an"), None);
        assert_eq!(layout("akk", "kn", "an"), None);
    }

    /// Every shape class (row tails 1-7, partial panels, k not a multiple of 4), every
    /// signedness and both zero-point kinds, against the definition in i64, on every kernel
    /// this CPU runs; the two largest products also split over two threads (by columns, and
    /// by rows when panels are few).
    #[test]
    fn int8_products_equal_the_definition() {
        let kernels: Vec<Int8Kernel> = [Int8Kernel::Amx, Int8Kernel::Vnni, Int8Kernel::Avx2]
            .into_iter()
            .filter(|k| k.runs_here())
            .collect();
        if kernels.is_empty() {
            eprintln!("skipped: this CPU has neither AVX-512 VNNI nor AVX2");
            return;
        }
        let mut seed = 7;
        for (kernel, (m, k, n)) in kernels.iter().flat_map(|&kernel| {
            [
                (1, 4, 1),
                (3, 7, 17),
                (8, 64, 32),
                (13, 100, 45),
                (40, 768, 100),
                (17, 3, 70),
                (64, 512, 200),
                (300, 2048, 32),
                // AMX: one block of exactly 16 rows, a block of 32 and one of 16 (k padded
                // to whole tiles, so copied), 32-row blocks read in place and a VNNI tail.
                (16, 130, 33),
                (48, 256, 64),
                (75, 128, 40),
                // A contraction tail after whole steps: [k, n] (register transpose, then
                // bytes) and [n, k] (words, then bytes).
                (3, 37, 64),
                (4, 37, 40),
                // Over 1 MiB packed: packed in runs of panels, one per core.
                (2, 1024, 1100),
                (3, 1024, 1100),
            ]
            .map(move |shape| (kernel, shape))
        }) {
            for act_signed in [false, true] {
                for w_signed in [false, true] {
                    for per_col in [false, true] {
                        let range = |s: &mut u64, signed: bool| {
                            let v = (lcg(s) % 256) as i32;
                            if signed {
                                v - 128
                            } else {
                                v
                            }
                        };
                        let a: Vec<i32> =
                            (0..m * k).map(|_| range(&mut seed, act_signed)).collect();
                        let w: Vec<i32> = (0..k * n).map(|_| range(&mut seed, w_signed)).collect();
                        let zbs: Vec<i32> = (0..if per_col { n } else { 1 })
                            .map(|_| range(&mut seed, w_signed))
                            .collect();
                        let za = range(&mut seed, act_signed);
                        // Both memory layouts: [k, n] as is, [n, k] transposed.
                        let k_major = (m + k) % 2 == 0;
                        let bytes: Vec<u8> = (0..k * n)
                            .map(|x| {
                                let (i, j) = if k_major {
                                    (x / n, x % n)
                                } else {
                                    (x % k, x / k)
                                };
                                // The stored byte: two's complement for i8, as is for u8.
                                w[i * n + j] as u8
                            })
                            .collect();
                        let packed = PackedWeight::pack(k, n, w_signed, k_major, &bytes, |j| {
                            zbs[if per_col { j } else { 0 }]
                        });
                        let a_tensor = if act_signed {
                            let v: Vec<i8> = a.iter().map(|&x| x as i8).collect();
                            tract_ndarray::ArrayD::from_shape_vec(vec![1, m, k], v)
                                .unwrap()
                                .into_tensor()
                        } else {
                            let v: Vec<u8> = a.iter().map(|&x| x as u8).collect();
                            tract_ndarray::ArrayD::from_shape_vec(vec![1, m, k], v)
                                .unwrap()
                                .into_tensor()
                        };
                        let za_tensor = if act_signed {
                            tensor0(za as i8)
                        } else {
                            tensor0(za as u8)
                        };
                        let op = VnniMatMul {
                            weight: Arc::new(packed),
                            act_signed,
                            scaled: false,
                            kernel,
                        };
                        let inputs = tvec!(a_tensor.into_tvalue(), za_tensor.into_tvalue());
                        let threads = if crate::team::worth_splitting(m * k * n, k * n) {
                            2
                        } else {
                            1
                        };
                        let executor = crate::int8mm::tests::executor(threads);
                        let eval = |op: &VnniMatMul, inputs: TVec<TValue>| {
                            tract_linalg::multithread::multithread_tract_scope(
                                executor.clone(),
                                || op.eval(&EvalContext::out_of_plan(), inputs).unwrap(),
                            )
                        };
                        let out = eval(&op, inputs.clone());
                        assert_eq!(out[0].shape(), &[1, m, n]);
                        let got = out[0].try_as_plain_ram().unwrap();
                        let got = got.as_slice::<i32>().unwrap();
                        // The fused Cast + Mul: one scale, or one per column.
                        let scales: Vec<f32> = (0..if per_col { n } else { 1 })
                            .map(|j| 0.001 + j as f32 * 1e-4)
                            .collect();
                        let mut scaled_inputs = inputs;
                        scaled_inputs.push(tensor1(&scales).into_tvalue());
                        let scaled = eval(&VnniMatMul { scaled: true, ..op }, scaled_inputs);
                        assert_eq!(scaled[0].datum_type(), f32::datum_type());
                        let scaled = scaled[0].try_as_plain_ram().unwrap();
                        let scaled = scaled.as_slice::<f32>().unwrap();
                        for r in 0..m {
                            for j in 0..n {
                                let zb = zbs[if per_col { j } else { 0 }] as i64;
                                let want: i64 = (0..k)
                                    .map(|i| {
                                        (a[r * k + i] as i64 - za as i64)
                                            * (w[i * n + j] as i64 - zb)
                                    })
                                    .sum();
                                let at = format!(
                                    "{kernel:?} m={m} k={k} n={n} act_signed={act_signed} w_signed={w_signed} per_col={per_col} at ({r}, {j})"
                                );
                                assert_eq!(got[r * n + j] as i64, want, "{at}");
                                let s = scales[if per_col { j } else { 0 }];
                                assert_eq!(
                                    scaled[r * n + j].to_bits(),
                                    (want as i32 as f32 * s).to_bits(),
                                    "{at} scaled"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// An integer product whose contracted axes are not the activation's last ones (tract's
    /// form of an `o_proj` with the attention heads' transpose and merge folded in:
    /// `acbmk,cbkn->amn`) runs on edgevlm's int8 kernel with the axes moved in front of it,
    /// and gives tract's integers.
    #[test]
    fn int8_products_with_moved_axes_equal_tract() {
        let Some(_) = int8_kernel() else {
            eprintln!("skipped: this CPU has neither AVX-512 VNNI nor AVX2");
            return;
        };
        let (c, b, m, k, n) = (2, 3, 5, 8, 33);
        let mut seed = 11;
        let mut bytes = |len: usize| -> Vec<i8> {
            (0..len)
                .map(|_| (lcg(&mut seed) % 256) as u8 as i8)
                .collect()
        };
        let a = tract_ndarray::ArrayD::from_shape_vec(vec![1, c, b, m, k], bytes(c * b * m * k))
            .unwrap()
            .into_tensor();
        let w = tract_ndarray::ArrayD::from_shape_vec(vec![c, b, k, n], bytes(c * b * k * n))
            .unwrap()
            .into_tensor();
        let build = || -> TractResult<TypedModel> {
            let mut model = TypedModel::default();
            let act = model.add_source("a", i8::fact([1, c, b, m, k]))?;
            let mut inputs = tvec![act, model.add_const("w", w.clone())?];
            for (name, value) in [
                ("bias", tensor0(0i32)),
                ("a0", tensor0(-3i8)),
                ("a_scale", tensor0(1f32)),
                ("b0", tensor0(5i8)),
                ("b_scale", tensor0(1f32)),
                ("c0", tensor0(0i32)),
                ("c_scale", tensor0(1f32)),
            ] {
                inputs.push(model.add_const(name, value)?);
            }
            let axes = "acbmk,cbkn,,,,,,,->amn".parse()?;
            let op = EinSum::newq(axes, i32::datum_type(), i32::datum_type());
            let out = model.wire_node("product", op, &inputs)?[0];
            model.select_output_outlets(&[out])?;
            Ok(model)
        };
        let want = build().unwrap().into_runnable().unwrap();
        let want = want.run(tvec![a.clone().into_tvalue()]).unwrap();
        let mut model = build().unwrap();
        assert_eq!(vnni_int8_products(&mut model).unwrap().1, 1);
        assert!(model.nodes().iter().any(|n| n.op_is::<VnniMatMul>()));
        let got = model.into_runnable().unwrap();
        let got = got.run(tvec![a.into_tvalue()]).unwrap();
        assert_eq!(got[0].shape(), &[1, m, n]);
        assert_eq!(got[0], want[0]);
    }

    /// The AVX-512 range and quantization give the scalar results bit for bit, ties included,
    /// over lengths with and without a tail.
    #[test]
    fn simd_dynamic_quantize_equals_the_scalar_code() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let mut seed = 3;
        for len in [16, 100, 1027] {
            let mut xs: Vec<f32> = (0..len)
                .map(|_| (lcg(&mut seed) as f32 / (1u64 << 31) as f32 - 0.6) * 7.3)
                .collect();
            // Exact halves of the unit scale below.
            xs.extend((0..40).map(|i| i as f32 * 0.5 - 10.0));
            let (lo, hi) = range_with_zero(&xs).unwrap();
            let want_lo = xs.iter().fold(0f32, |a, &x| if x < a { x } else { a });
            let want_hi = xs.iter().fold(0f32, |a, &x| if x > a { x } else { a });
            assert_eq!((lo, hi), (want_lo, want_hi), "len {len}");
            for (scale, zero) in [((hi - lo) / 255.0, 77u8), (1.0, 20), (0.5, 0)] {
                let mut ys = vec![0u8; xs.len()];
                assert!(quantize_u8(&xs, scale, zero, &mut ys));
                for (i, (&x, &y)) in xs.iter().zip(&ys).enumerate() {
                    let want = ((x / scale).round_ties_even() as i32 + zero as i32).clamp(0, 255);
                    assert_eq!(y as i32, want, "len {len} scale {scale} at {i}: {x}");
                }
            }
        }
    }
}
