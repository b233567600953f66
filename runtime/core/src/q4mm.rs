//! 4-bit (GGML `Q4_0`, ONNX `MatMulNBits` as tract loads it) products with f32 activations and
//! many rows, on AVX-512 or AVX2 ([`F32Kernel`]): the weight is repacked once at load into
//! panels of 32 output columns whose nibbles decode straight into two 16-lane (or four
//! 8-lane) registers; a run decodes a slice of one panel into a cache-resident f32 block and
//! multiplies the row tiles of a block of the activation against it.
//!
//! tract 0.23.9 runs such products as matrix-vector products (`docs/tract-slow-paths.md`,
//! section 3); edgevlm's first fix expanded the weight to f32 chunk by chunk and ran tract's
//! f32 plan on each chunk, which packs the expanded chunk again: about as much time as the
//! products. Here the decoded panel is already in the kernel's layout.

// Elsewhere than x86_64 the kernels are compiled out and the ops never created (the
// rewrite checks the CPU first), which leaves their plumbing unused there.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;

/// Output columns per panel: two 16-lane registers.
pub(crate) const NR: usize = 32;
/// Activation rows per kernel tile on AVX-512 (32 registers: 16 accumulators).
const MR: usize = 8;
/// Activation rows per kernel tile on AVX2 (16 registers: 12 accumulators per half panel;
/// fewer would not cover the FMA units' latency).
const MR_AVX2: usize = 6;
/// Contraction values per pass of the row tiles over a panel (a 32 KiB slice of it, in L1).
const KC: usize = 256;
/// [`KC`] on AVX2.
const KC_AVX2: usize = 768;
/// Activation rows per block kept in L2 while a thread's panels pass (`MC * KC` floats).
const MC: usize = 384;

/// A `Q4_0` weight of `n` rows (output columns) by `k` (contraction), repacked: for panel `p`
/// (32 rows) and block `b` (32 contraction values), 32 f32 scales (one per column), then for
/// each of the 32 contraction values 16 bytes holding column `j`'s nibble in the low half of
/// byte `j` (`j < 16`) or the high half of byte `j - 16`.
#[derive(Debug)]
pub struct Q4Packed {
    n: usize,
    k: usize,
    scales: Vec<f32>,
    nibbles: Vec<u8>,
}

impl Q4Packed {
    /// Repacks GGML `Q4_0` bytes of an `[n, k]` weight (each row `k / 32` blocks of an f16
    /// scale and 16 bytes: value `i` in the low nibble of byte `i`, value `16 + i` in its high
    /// nibble, each minus 8). `None` unless `k` is a multiple of 32 and the sizes match.
    pub fn from_q4_0(bytes: &[u8], n: usize, k: usize) -> Option<Q4Packed> {
        if !k.is_multiple_of(32) || bytes.len() != n * k / 32 * 18 {
            return None;
        }
        let block = |j: usize, b: usize| &bytes[(j * (k / 32) + b) * 18..][..18];
        Some(Q4Packed::pack(
            n,
            k,
            |j, b| f16::from_bits(u16::from_le_bytes([block(j, b)[0], block(j, b)[1]])).to_f32(),
            |j, b, kk| {
                let byte = block(j, b)[2 + kk % 16];
                if kk < 16 {
                    byte & 0x0f
                } else {
                    byte >> 4
                }
            },
        ))
    }

    /// Repacks an ONNX `MatMulNBits` weight (`bits` 4, `block_size` 32, no zero points, so
    /// each code is minus 8): `b` is `[n, k / 32, 16]` with value `2i` of a block in the low
    /// nibble of byte `i` and `2i + 1` in its high nibble, `scales` one f32 per row and block,
    /// kept in f32 as ONNX Runtime uses them. `None` unless `k` is a multiple of 32 and the
    /// sizes match.
    pub fn from_matmul_nbits(b: &[u8], scales: &[f32], n: usize, k: usize) -> Option<Q4Packed> {
        let kb = k / 32;
        if !k.is_multiple_of(32) || b.len() != n * kb * 16 || scales.len() != n * kb {
            return None;
        }
        let panels = n.div_ceil(NR);
        let mut packed = Q4Packed {
            n,
            k,
            scales: vec![0f32; panels * kb * NR],
            nibbles: vec![0u8; panels * kb * 32 * 16],
        };
        // One panel block (32 columns x 32 values, 512 bytes) at a time, in the order the
        // kernel reads them; columns past `n` stay zero (scale 0).
        let zero = [0u8; 16];
        let panel_blocks = packed.nibbles.chunks_exact_mut(512);
        for ((blk, out), sc) in panel_blocks
            .enumerate()
            .zip(packed.scales.chunks_exact_mut(NR))
        {
            let (p, blk_k) = (blk / kb, blk % kb);
            let bytes = |j: usize| -> &[u8] {
                if j < n {
                    &b[(j * kb + blk_k) * 16..][..16]
                } else {
                    &zero
                }
            };
            for (jj, s) in sc.iter_mut().enumerate() {
                let j = p * NR + jj;
                if j < n {
                    *s = scales[j * kb + blk_k];
                }
            }
            for i in 0..16 {
                let (lo, hi) = (bytes(p * NR + i), bytes(p * NR + 16 + i));
                for t in 0..16 {
                    // Values 2t and 2t + 1 of column i (low nibbles) and of column 16 + i.
                    out[2 * t * 16 + i] = (lo[t] & 0x0f) | (hi[t] << 4);
                    out[(2 * t + 1) * 16 + i] = (lo[t] >> 4) | (hi[t] & 0xf0);
                }
            }
        }
        Some(packed)
    }

    /// The packed weight's parts: `n`, `k`, the panel scales and the nibbles, as
    /// [`Q4Packed::from_parts`] takes them back (the load cache stores them as they are).
    pub(crate) fn parts(&self) -> (usize, usize, &[f32], &[u8]) {
        (self.n, self.k, &self.scales, &self.nibbles)
    }

    /// A packed weight from the parts [`Q4Packed::parts`] gave. `None` unless `k` is a
    /// multiple of 32 and both lengths are those of an `[n, k]` weight's panels.
    pub(crate) fn from_parts(
        n: usize,
        k: usize,
        scales: Vec<f32>,
        nibbles: Vec<u8>,
    ) -> Option<Q4Packed> {
        // n and k come from a file: a damaged entry must not overflow.
        let blocks = n.div_ceil(NR).checked_mul(k / 32)?;
        (k.is_multiple_of(32)
            && n > 0
            && Some(scales.len()) == blocks.checked_mul(NR)
            && Some(nibbles.len()) == blocks.checked_mul(32 * 16))
        .then_some(Q4Packed {
            n,
            k,
            scales,
            nibbles,
        })
    }

    /// The packed layout from `scale(row, block)` and `code(row, block, index in block)`.
    fn pack(
        n: usize,
        k: usize,
        scale: impl Fn(usize, usize) -> f32,
        code: impl Fn(usize, usize, usize) -> u8,
    ) -> Q4Packed {
        let kb = k / 32;
        let panels = n.div_ceil(NR);
        let mut scales = vec![0f32; panels * kb * NR];
        let mut nibbles = vec![0u8; panels * kb * 32 * 16];
        for j in 0..n {
            let (p, jj) = (j / NR, j % NR);
            for b in 0..kb {
                let blk = p * kb + b;
                scales[blk * NR + jj] = scale(j, b);
                for kk in 0..32 {
                    let v = code(j, b, kk);
                    let at = (blk * 32 + kk) * 16 + jj % 16;
                    nibbles[at] |= if jj < 16 { v } else { v << 4 };
                }
            }
        }
        Q4Packed {
            n,
            k,
            scales,
            nibbles,
        }
    }

    /// Every row of `a` against panel `p` straight from the nibbles (a decode step), on
    /// `kernel`.
    ///
    /// # Safety
    /// `kernel` runs on this CPU; `a` holds `m` rows of `k` and `c` `m` rows of `n`
    /// (addresses).
    #[cfg(target_arch = "x86_64")]
    unsafe fn rows_from_nibbles(&self, kernel: F32Kernel, p: usize, m: usize, a: usize, c: usize) {
        let kb = self.k / 32;
        let cols = NR.min(self.n - p * NR);
        for r in 0..m {
            // SAFETY: the caller's bounds for rows r of a and c; the panel's scales and
            // nibbles exist for every block (whole panels are allocated).
            unsafe {
                let row = std::slice::from_raw_parts((a as *const f32).add(r * self.k), self.k);
                let (scales, nibbles) = (
                    &self.scales[p * kb * NR..][..kb * NR],
                    &self.nibbles[p * kb * 32 * 16..][..kb * 32 * 16],
                );
                let out = (c as *mut f32).add(r * self.n + p * NR);
                match kernel {
                    F32Kernel::Avx512 => row_against_panel(scales, nibbles, row, out, cols),
                    F32Kernel::Avx2 => row_against_panel_avx2(scales, nibbles, row, out, cols),
                }
            };
        }
    }
}

/// Rows `m0..m0 + rows` of `a` (`[m, k]` at address `a`) against contraction rows `k0..k0 +
/// kc` of panel `p` (`chunk`, `[kc, 32]`), on `kernel`'s tiles, into `c`
/// (`[m, n]` at address `c`): stored when `k0 == 0`, added to it after. The first tile
/// brings `next` (null, or the chunk read after this one) towards L2 while the others reuse
/// this one.
///
/// # Safety
/// `kernel` runs on this CPU; `a` and `c` hold the rows; `chunk` holds `kc * 32` floats.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_against_chunk(
    kernel: F32Kernel,
    (chunk, next): (*const f32, *const f32),
    p: usize,
    (m0, rows): (usize, usize),
    (k0, kc): (usize, usize),
    k: usize,
    n: usize,
    a: usize,
    c: usize,
) {
    let cols = NR.min(n - p * NR);
    let mr = kernel.tile().0;
    let mut r0 = m0;
    while r0 < m0 + rows {
        let tile = mr.min(m0 + rows - r0);
        // SAFETY: rows r0..r0 + tile of a and c exist; columns p * 32 + cols <= n; the
        // chunk holds kc rows.
        unsafe {
            let t = FmaTile {
                a: (a as *const f32).add(r0 * k + k0),
                lda: k,
                b: chunk,
                k: kc,
                scale: 1.0,
                c: (c as *mut f32).add(r0 * n + p * NR),
                ldc: n,
                cols,
                accumulate: k0 > 0,
                prefetch: if r0 == m0 { next } else { std::ptr::null() },
            };
            fma_tile_rows(kernel, tile, &t);
        }
        r0 += tile;
    }
}

/// An f32 weight of `n` output columns by `k`, in 32-column panels of `[k, 32]` (the last
/// one zero-padded): the layout the FMA tile reads, so a run multiplies in place. The
/// panels are a plain f32 tensor, which the load cache writes as it is, or, read back from
/// the cache, the same values mapped in place from its archive.
#[derive(Debug)]
pub struct F32Panels {
    n: usize,
    k: usize,
    panels: PanelData,
}

/// Where an [`F32Panels`]' values are.
#[derive(Debug)]
enum PanelData {
    /// Packed at load, or read from the cache by a reader that copies.
    Tensor(Arc<Tensor>),
    /// In the load cache's archive, mapped.
    Mapped(crate::mapped::MappedF32),
}

impl F32Panels {
    /// Packs `w`, `[k, n]` row-major when `k_major`, else `[n, k]`.
    pub fn pack(w: &[f32], k: usize, n: usize, k_major: bool) -> Option<F32Panels> {
        if w.len() != k * n || k == 0 || n == 0 {
            return None;
        }
        let panels_n = n.div_ceil(NR);
        // SAFETY: f32 has no invalid bit patterns, and every value is written below (the
        // last panel's padding included) before the tensor is read.
        let mut tensor = unsafe { Tensor::uninitialized::<f32>(&[panels_n * k * NR]) }.ok()?;
        {
            let mut view = tensor.try_as_plain_ram_mut().ok()?;
            let panels = view.as_slice_mut::<f32>().ok()?;
            // A large weight in runs of panels packed side by side, one per core (packing
            // is most of an fp32 graph's `f32 packing` load stage, page faults included).
            let per_part = crate::par::units_per_run(panels_n, panels.len() * 4);
            let runs = panels.chunks_mut(per_part * k * NR).enumerate().collect();
            crate::par::each(runs, |(run, panels): (usize, &mut [f32])| {
                for (p, panel) in panels.chunks_exact_mut(k * NR).enumerate() {
                    let p = run * per_part + p;
                    let (j0, cols) = (p * NR, NR.min(n - p * NR));
                    if cols < NR {
                        panel.fill(0.0);
                    }
                    if k_major {
                        // Each panel row is a run of the weight's row.
                        for (row, src) in panel.chunks_exact_mut(NR).zip(w.chunks_exact(n)) {
                            row[..cols].copy_from_slice(&src[j0..j0 + cols]);
                        }
                    } else {
                        for (jj, src) in w[j0 * k..(j0 + cols) * k].chunks_exact(k).enumerate() {
                            for (dst, &v) in panel[jj..].iter_mut().step_by(NR).zip(src) {
                                *dst = v;
                            }
                        }
                    }
                }
            });
        }
        Some(F32Panels {
            n,
            k,
            panels: PanelData::Tensor(tensor.into_arc_tensor()),
        })
    }

    /// The packed weight's parts: `n`, `k` and the panels as an f32 tensor, as
    /// [`F32Panels::from_parts`] takes them back (the load cache stores them as they are;
    /// mapped panels are copied, which only a cached model written again would ask for).
    pub(crate) fn parts(&self) -> (usize, usize, Arc<Tensor>) {
        let panels = match &self.panels {
            PanelData::Tensor(t) => t.clone(),
            PanelData::Mapped(_) => rctensor1(self.data()),
        };
        (self.n, self.k, panels)
    }

    /// The length of the panels of an `[n, k]` weight; `None` for an empty weight or one
    /// whose size overflows (n and k come from a file: a damaged entry must not overflow).
    fn panels_len(n: usize, k: usize) -> Option<usize> {
        let len = n.div_ceil(NR).checked_mul(k)?.checked_mul(NR)?;
        (k > 0 && n > 0).then_some(len)
    }

    /// A packed weight from the parts [`F32Panels::parts`] gave, the panels used in place.
    /// `None` unless they are a plain f32 tensor of the panels of an `[n, k]` weight.
    pub(crate) fn from_parts(n: usize, k: usize, panels: Arc<Tensor>) -> Option<F32Panels> {
        let len = Self::panels_len(n, k)?;
        let fits = panels
            .try_as_plain_ram()
            .and_then(|v| v.as_slice::<f32>())
            .is_ok_and(|s| s.len() == len);
        fits.then_some(F32Panels {
            n,
            k,
            panels: PanelData::Tensor(panels),
        })
    }

    /// A packed weight whose panels are mapped from the load cache's archive. `None` unless
    /// they are the panels of an `[n, k]` weight.
    pub(crate) fn from_mapped(
        n: usize,
        k: usize,
        panels: crate::mapped::MappedF32,
    ) -> Option<F32Panels> {
        (Some(panels.as_slice().len()) == Self::panels_len(n, k)).then_some(F32Panels {
            n,
            k,
            panels: PanelData::Mapped(panels),
        })
    }

    /// Whether the panels are read in place from a mapped file.
    #[cfg(test)]
    pub(crate) fn is_mapped(&self) -> bool {
        matches!(self.panels, PanelData::Mapped(_))
    }

    /// The panels, one after the other.
    fn data(&self) -> &[f32] {
        match &self.panels {
            // Built plain f32 by `pack` or checked so by `from_parts`.
            PanelData::Tensor(t) => t
                .try_as_plain_ram()
                .and_then(|v| v.as_slice::<f32>())
                .expect("f32 panels are a plain f32 tensor"),
            PanelData::Mapped(m) => m.as_slice(),
        }
    }
}

impl PanelProduct for F32Panels {
    const NAME: &'static str = "EdgevlmF32MatMul";
    const SCRATCH: bool = false;
    const WEIGHT_BITS: usize = 32;

    fn k(&self) -> usize {
        self.k
    }

    fn n(&self) -> usize {
        self.n
    }

    fn chunk(&self, _: F32Kernel, p: usize, k0: usize, _: usize, _: &mut [f32]) -> *const f32 {
        self.data()[(p * self.k + k0) * NR..].as_ptr()
    }

    fn prefetch(&self, p: usize, k0: usize) -> *const f32 {
        // A prefetch never faults: past the last panel this may point anywhere.
        self.data().as_ptr().wrapping_add((p * self.k + k0) * NR)
    }
}

/// A constant weight a [`PanelMatMul`] multiplies by, in panels of 32 output columns.
pub trait PanelProduct: std::fmt::Debug + Send + Sync + 'static {
    /// The op's name in tract's profiles and dumps.
    const NAME: &'static str;
    /// Contraction length.
    fn k(&self) -> usize;
    /// Output columns.
    fn n(&self) -> usize;
    /// Whether [`PanelProduct::chunk`] needs a `[KC, 32]` f32 scratch block (to decode into).
    const SCRATCH: bool;
    /// Bits per weight value (scales included, roughly), for the threading decision.
    const WEIGHT_BITS: usize;
    /// Products with fewer rows run [`PanelProduct::few_rows`] instead of f32 chunks.
    const FEW_ROWS: usize = 0;
    /// Contraction rows `k0..k0 + kc` of panel `p` as `[kc, 32]` f32: in place, or decoded
    /// into `block` on `kernel`, which runs on this CPU.
    fn chunk(
        &self,
        kernel: F32Kernel,
        p: usize,
        k0: usize,
        kc: usize,
        block: &mut [f32],
    ) -> *const f32;
    /// Null, or the address of chunk `k0` of panel `p` in memory, to prefetch before
    /// [`PanelProduct::chunk`] reads it (a weight used in place, streamed from memory).
    fn prefetch(&self, p: usize, k0: usize) -> *const f32 {
        let _ = (p, k0);
        std::ptr::null()
    }
    /// Every row of `a` (`[m, k]` at address `a`) against panel `p` without an f32 chunk,
    /// into `c` (`[m, n]` at address `c`), for fewer than [`PanelProduct::FEW_ROWS`] rows,
    /// on `kernel`; `matmul` has checked the CPU and the sizes.
    fn few_rows(&self, kernel: F32Kernel, p: usize, m: usize, a: usize, c: usize) {
        let _ = (kernel, p, m, a, c);
        unreachable!("{} has no few-rows path", Self::NAME)
    }

    /// `c = a w` for the `m` rows of `a` (`[m, k]` row-major) into `c` (`[m, n]`), split by
    /// panels over edgevlm's thread team when big enough, on [`f32_kernel`]'s tiles. Panics
    /// where there are none (the loader creates these products only where there are).
    ///
    /// A slice of `KC` contraction rows of a panel (32 KiB) stays in L1 while the 8-row tiles
    /// pass over it. An activation of at most `MC * KC` floats stays in L2 and each panel is
    /// read once, front to back. A larger one (a vision encoder's 1024 rows) is taken a
    /// contraction slice and a block of `MC` rows at a time, which stays in L2 while the
    /// thread's panels pass: panel by panel over the whole of it, it was read again from
    /// memory for every panel (a 1024 x 768 x 3072 product 58 -> 70 GMAC/s on one thread,
    /// 116 -> 145 on two).
    fn matmul(&self, a: &[f32], m: usize, c: &mut [f32]) {
        // This CPU's tile, chosen once per call.
        let Some(kernel) = f32_kernel() else {
            panic!("{} cannot run on this CPU", Self::NAME)
        };
        self.matmul_on(kernel, a, m, c)
    }

    /// [`PanelProduct::matmul`] on `kernel`, which must run on this CPU.
    fn matmul_on(&self, kernel: F32Kernel, a: &[f32], m: usize, c: &mut [f32]) {
        let (k, n) = (self.k(), self.n());
        let kc_max = kernel.tile().1;
        assert!(a.len() >= m * k && c.len() >= m * n);
        let (a, c) = (a.as_ptr() as usize, c.as_mut_ptr() as usize);
        let panels = n.div_ceil(NR);
        let run = |ps: std::ops::Range<usize>| {
            if m < Self::FEW_ROWS {
                for p in ps {
                    self.few_rows(kernel, p, m, a, c);
                }
                return;
            }
            let mut block = vec![0f32; if Self::SCRATCH { kc_max * NR } else { 0 }];
            let mut pass = |p: usize, (m0, rows), k0: usize, next: (usize, usize)| {
                let kc = kc_max.min(k - k0);
                let chunk = (
                    self.chunk(kernel, p, k0, kc, &mut block),
                    self.prefetch(next.0, next.1),
                );
                #[cfg(target_arch = "x86_64")]
                // SAFETY: checked above: the CPU, and that a and c hold m rows; the chunk
                // holds kc rows of the panel.
                unsafe {
                    rows_against_chunk(kernel, chunk, p, (m0, rows), (k0, kc), k, n, a, c)
                };
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (kernel, chunk, p, m0, rows);
            };
            if m * k <= MC * kc_max {
                // The whole activation stays in L2: each panel is read once, front to back.
                for p in ps {
                    for k0 in (0..k).step_by(kc_max) {
                        let next = if k0 + kc_max < k {
                            (p, k0 + kc_max)
                        } else {
                            (p + 1, 0)
                        };
                        pass(p, (0, m), k0, next);
                    }
                }
                return;
            }
            for k0 in (0..k).step_by(kc_max) {
                for m0 in (0..m).step_by(MC) {
                    for p in ps.clone() {
                        // After this thread's last panel comes its first again (the next
                        // block of rows, or the next slice).
                        let next = if p + 1 < ps.end { p + 1 } else { ps.start };
                        let k_next = if p + 1 < ps.end || m0 + MC < m {
                            k0
                        } else {
                            k0 + kc_max
                        };
                        pass(p, (m0, MC.min(m - m0)), k0, (next, k_next));
                    }
                }
            }
        };
        let threads = crate::team::threads_for(m * n * k, k * n * Self::WEIGHT_BITS / 8);
        crate::team::for_each_run(panels, threads, run);
    }
}

impl PanelProduct for Q4Packed {
    const NAME: &'static str = "EdgevlmQ4MatMul";
    const SCRATCH: bool = true;
    const WEIGHT_BITS: usize = 5;
    const FEW_ROWS: usize = 4;

    fn k(&self) -> usize {
        self.k
    }

    fn n(&self) -> usize {
        self.n
    }

    fn chunk(
        &self,
        kernel: F32Kernel,
        p: usize,
        k0: usize,
        kc: usize,
        block: &mut [f32],
    ) -> *const f32 {
        let (kb, b0, bs) = (self.k / 32, k0 / 32, kc / 32);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `matmul` checked the CPU; chunks start at multiples of 32 (KC and KC_AVX2
        // are, and k too), so blocks b0..b0 + bs of the panel exist, and `block` holds a
        // slice of 32 columns.
        unsafe {
            let (scales, nibbles) = (
                &self.scales[(p * kb + b0) * NR..][..bs * NR],
                &self.nibbles[(p * kb + b0) * 32 * 16..][..bs * 32 * 16],
            );
            match kernel {
                F32Kernel::Avx512 => decode_panel(scales, nibbles, block),
                F32Kernel::Avx2 => decode_panel_avx2(scales, nibbles, block),
            }
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (kernel, p, kb, b0, bs);
        block.as_ptr()
    }

    fn few_rows(&self, kernel: F32Kernel, p: usize, m: usize, a: usize, c: usize) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `matmul` checked the CPU and that a and c hold m rows.
        unsafe {
            self.rows_from_nibbles(kernel, p, m, a, c)
        };
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (kernel, p, m, a, c);
            unreachable!("Q4Packed is only built on x86_64");
        }
    }
}

/// A product with a constant weight in panels (4-bit [`Q4Packed`] or [`F32Panels`]): the
/// activation (f32, contraction on its last axis) in, the f32 product with the activation's
/// outer axes and `n` last out.
pub struct PanelMatMul<W: PanelProduct> {
    /// The packed weight.
    pub weight: Arc<W>,
}

/// A product with a constant 4-bit weight.
pub type Q4MatMul = PanelMatMul<Q4Packed>;

/// A product with a constant f32 weight.
pub type F32MatMul = PanelMatMul<F32Panels>;

impl<W: PanelProduct> Clone for PanelMatMul<W> {
    fn clone(&self) -> Self {
        PanelMatMul {
            weight: self.weight.clone(),
        }
    }
}

impl<W: PanelProduct> std::fmt::Debug for PanelMatMul<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}(k={}, n={})",
            W::NAME,
            self.weight.k(),
            self.weight.n()
        )
    }
}

impl<W: PanelProduct> PartialEq for PanelMatMul<W> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weight, &other.weight)
    }
}

impl<W: PanelProduct> Eq for PanelMatMul<W> {}

impl<W: PanelProduct> PanelMatMul<W> {
    /// The product for one activation tensor.
    pub fn run(&self, act: &Tensor) -> TractResult<Tensor> {
        let (k, n) = (self.weight.k(), self.weight.n());
        let shape = act.shape();
        ensure!(
            shape.last() == Some(&k),
            "{}: activation {shape:?} does not end with k = {k}",
            W::NAME
        );
        let act = act.cast_to::<f32>()?;
        let plain = act.try_as_plain_ram()?;
        let a = plain.as_slice::<f32>()?;
        let m = a.len() / k.max(1);
        let mut out_shape: TVec<usize> = shape[..shape.len() - 1].into();
        out_shape.push(n);
        let mut out = Tensor::zero::<f32>(&out_shape)?;
        {
            let mut out_plain = out.try_as_plain_ram_mut()?;
            self.weight.matmul(a, m, out_plain.as_slice_mut::<f32>()?);
        }
        Ok(out)
    }
}

impl Q4MatMul {
    /// A `Q4MatMul` for the product `op` whose input `slot` is the constant `Q4_0` weight
    /// `weight` (`[n, k]` or `[1, n, k]`), if its activation has the contraction last and the output is the
    /// activation's outer axes then `n`, and the CPU has AVX-512 or AVX2.
    pub fn for_product(op: &EinSum, slot: usize, weight: &Tensor) -> Option<Q4MatMul> {
        use tract_linalg::block_quant::BlockQuantStorage;
        let shape = weight.shape();
        // `[n, k]`, or `[1, n, k]` (MatMulNBits as tract-onnx loads it: a group axis of 1).
        let grouped = shape.len() == 3 && shape[0] == 1;
        if f32_kernel().is_none() || slot > 1 || !(shape.len() == 2 || grouped) {
            return None;
        }
        let (inputs, outputs) = op.axes.to_strs();
        if inputs.len() != 2 || outputs.len() != 1 {
            return None;
        }
        let (w, act) = (&inputs[slot], &inputs[1 - slot]);
        if grouped && (act.contains(&w[..1]) || outputs[0].contains(&w[..1])) {
            return None;
        }
        let w = if grouped { &w[1..] } else { &w[..] };
        let (nc, kc) = (w.chars().next()?, w.chars().nth(1)?);
        let outer = &act[..act.len().checked_sub(1)?];
        if !act.ends_with(kc) || outer.contains(nc) || outputs[0] != format!("{outer}{nc}") {
            return None;
        }
        let bqs = weight.storage_as::<BlockQuantStorage>()?;
        if !crate::patches::is_q4_0(bqs.format()) {
            return None;
        }
        let (n, k) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        Some(Q4MatMul {
            weight: Arc::new(Q4Packed::from_q4_0(bqs.value(), n, k)?),
        })
    }
}

impl<W: PanelProduct> Op for PanelMatMul<W> {
    fn name(&self) -> StaticName {
        W::NAME.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "k={}, n={}",
            self.weight.k(),
            self.weight.n()
        )])
    }

    op_as_typed_op!();
}

impl<W: PanelProduct> EvalOp for PanelMatMul<W> {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        Ok(tvec!(self.run(&inputs[0])?.into_tvalue()))
    }
}

impl<W: PanelProduct> TypedOp for PanelMatMul<W> {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let act = &inputs[0].shape;
        let mut shape: TVec<TDim> = act.iter().take(act.rank() - 1).cloned().collect();
        shape.push(self.weight.n().to_dim());
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

/// Replaces every product with a constant `Q4_0` weight that [`Q4MatMul::for_product`] takes
/// (plain `[.., k] x [n, k] -> [.., n]`, AVX-512 CPU) by a [`Q4MatMul`], whatever its row
/// count: many rows run on decoded panels, a few (a decode step) straight from the nibbles,
/// so neither tract's 4-bit plan nor the loader's expansion is needed. Run before the other
/// 4-bit passes, which then see only what is left. Returns how many were replaced.
pub fn own_q4_products(model: &mut TypedModel) -> TractResult<usize> {
    let mut targets = vec![];
    for node in model.nodes() {
        let Some((slot, _)) = crate::patches::block_quant_product(model, node)? else {
            continue;
        };
        let op = node.op_as::<EinSum>().unwrap();
        let weight = model.outlet_fact(node.inputs[slot])?.konst.clone().unwrap();
        if let Some(own) = Q4MatMul::for_product(op, slot, &weight) {
            targets.push((node.id, node.inputs[1 - slot], own));
        }
    }
    for (id, act, op) in &targets {
        let node = model.node(*id);
        let patch = TypedModelPatch::replace_single_op(model, node, &[*act], op.clone())?;
        patch.apply(model)?;
    }
    Ok(targets.len())
}

/// Replaces every f32 product with a constant weight (an einsum with the activation first,
/// no quantization parameters, axes [`crate::int8mm`]'s layout rules take) by an
/// [`F32MatMul`] on CPUs with an [`f32_kernel`] (AVX-512, or AVX2 with FMA): the weight is
/// packed into panels once at load and each run multiplies it in place with the FMA tile.
/// tract 0.23.9 picks a 64x3 kernel for a ViT's `[1024, 768] x [768, 3072]` products on this
/// project's AVX-512 machines, about half the speed ONNX Runtime reaches there; on AVX2 its
/// kernels are a little slower than edgevlm's and run a decode step's one-row products on
/// one thread only. Runs right after tract's declutter, before the load cache's write point,
/// so the cache keeps the panels. Returns how many were replaced.
pub fn own_f32_products(model: &mut TypedModel) -> TractResult<usize> {
    if f32_kernel().is_none() {
        return Ok(0);
    }
    let mut targets = vec![];
    for node in model.nodes() {
        if f32_product(model, node)?.is_some() {
            targets.push(node.name.clone());
        }
    }
    // One at a time, and a big weight's original dropped (compact) right after it is packed,
    // so the load does not hold every f32 weight twice (an lm_head alone is 113 MB at
    // SmolVLM2-256M size). compact renumbers nodes: they are found again by name.
    for name in &targets {
        let node = model.node_by_name(name)?;
        let (id, act) = (node.id, node.inputs[0]);
        let Some((layout, k, n)) = f32_product(model, node)? else {
            continue;
        };
        let packed = {
            let weight = model.outlet_fact(node.inputs[1])?.konst.clone().unwrap();
            let plain = weight.try_as_plain_ram()?;
            F32Panels::pack(plain.as_slice::<f32>()?, k, n, layout.k_major)
        };
        let Some(panels) = packed else {
            continue;
        };
        let big = panels.data().len() * 4 >= BIG_WEIGHT_BYTES;
        let op = F32MatMul {
            weight: Arc::new(panels),
        };
        crate::int8mm::replace_product(model, id, &layout, &[act], op)?;
        if big {
            model.compact()?;
        }
    }
    Ok(targets.len())
}

/// Weights from this size on are freed as soon as their packed copy is in place.
const BIG_WEIGHT_BYTES: usize = 16 << 20;

/// The layout, `k` and `n` of `node` if [`own_f32_products`] takes it.
fn f32_product(
    model: &TypedModel,
    node: &TypedNode,
) -> TractResult<Option<(crate::int8mm::ProductLayout, usize, usize)>> {
    let f32_dt = f32::datum_type();
    let Some(op) = node.op_as::<EinSum>() else {
        return Ok(None);
    };
    if node.inputs.len() != 2 || op.q_params.is_some() {
        return Ok(None);
    }
    let (act, weight) = (
        model.outlet_fact(node.inputs[0])?,
        model.outlet_fact(node.inputs[1])?,
    );
    let (None, Some(w)) = (&act.konst, &weight.konst) else {
        return Ok(None);
    };
    // A block-quantized weight is typed f32 too, but has no plain f32 values to pack.
    if w.as_plain_ram_storage().is_none() {
        return Ok(None);
    }
    if act.datum_type != f32_dt
        || w.datum_type() != f32_dt
        || node.outputs[0].fact.datum_type != f32_dt
    {
        return Ok(None);
    }
    let (inputs, outputs) = op.axes.to_strs();
    let Some(layout) = crate::int8mm::product_layout(&inputs[0], &inputs[1], &outputs) else {
        return Ok(None);
    };
    let dim = |c: char| w.shape()[inputs[1].chars().position(|x| x == c).unwrap()];
    let k: usize = layout.contracted.chars().map(dim).product();
    let n = dim(layout.n);
    Ok((k * n == w.len()).then_some((layout, k, n)))
}

/// One activation row against one panel, straight from the nibbles: per block of 32,
/// `scale * (sum code * a - 8 * sum a)`, `cols` of the 32 outputs stored at `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_against_panel(scales: &[f32], nibbles: &[u8], a: &[f32], out: *mut f32, cols: usize) {
    use std::arch::x86_64::*;
    let kb = scales.len() / NR;
    assert!(nibbles.len() >= kb * 32 * 16 && a.len() >= kb * 32);
    let low = _mm512_set1_epi32(0x0f);
    let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for b in 0..kb {
        let xs = &a[b * 32..b * 32 + 32];
        let eight_sum = _mm512_set1_ps(8.0 * xs.iter().sum::<f32>());
        let (mut t0, mut t1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        // SAFETY: the asserts above bound every access.
        unsafe {
            for (kk, &x) in xs.iter().enumerate() {
                let bytes = _mm_loadu_si128(nibbles.as_ptr().add((b * 32 + kk) * 16) as *const _);
                let q = _mm512_cvtepu8_epi32(bytes);
                let x = _mm512_set1_ps(x);
                t0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, low)), x, t0);
                t1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(q)), x, t1);
            }
            acc0 = _mm512_fmadd_ps(
                _mm512_sub_ps(t0, eight_sum),
                _mm512_loadu_ps(scales.as_ptr().add(b * NR)),
                acc0,
            );
            acc1 = _mm512_fmadd_ps(
                _mm512_sub_ps(t1, eight_sum),
                _mm512_loadu_ps(scales.as_ptr().add(b * NR + 16)),
                acc1,
            );
        }
    }
    let mask = |cols: usize| -> __mmask16 {
        if cols >= 16 {
            0xffff
        } else {
            ((1u32 << cols) - 1) as __mmask16
        }
    };
    // SAFETY: the caller's `cols` columns at `out` are writable.
    unsafe {
        _mm512_mask_storeu_ps(out, mask(cols), acc0);
        if cols > 16 {
            _mm512_mask_storeu_ps(out.add(16), mask(cols - 16), acc1);
        }
    }
}

/// The 32 columns of one panel's blocks given (`scales` and `nibbles` of `kb` blocks of
/// 32 contraction values) as f32, `[kb * 32, 32]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn decode_panel(scales: &[f32], nibbles: &[u8], block: &mut [f32]) {
    use std::arch::x86_64::*;
    let kb = scales.len() / NR;
    assert!(nibbles.len() >= kb * 32 * 16 && block.len() >= kb * 32 * NR);
    let (low, eight) = (_mm512_set1_epi32(0x0f), _mm512_set1_ps(8.0));
    for b in 0..kb {
        // SAFETY: the asserts above bound every access.
        unsafe {
            let s0 = _mm512_loadu_ps(scales.as_ptr().add(b * NR));
            let s1 = _mm512_loadu_ps(scales.as_ptr().add(b * NR + 16));
            for kk in 0..32 {
                let bytes = _mm_loadu_si128(nibbles.as_ptr().add((b * 32 + kk) * 16) as *const _);
                let x = _mm512_cvtepu8_epi32(bytes);
                let lo = _mm512_cvtepi32_ps(_mm512_and_si512(x, low));
                let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(x));
                let dst = block.as_mut_ptr().add((b * 32 + kk) * NR);
                _mm512_storeu_ps(dst, _mm512_mul_ps(_mm512_sub_ps(lo, eight), s0));
                _mm512_storeu_ps(dst.add(16), _mm512_mul_ps(_mm512_sub_ps(hi, eight), s1));
            }
        }
    }
}

/// The four 8-column groups of the 32 codes one contraction step of a panel holds in its 16
/// bytes (low nibbles columns 0-15, high nibbles 16-31), as 32-bit integers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn codes_avx2(bytes: *const u8) -> [std::arch::x86_64::__m256i; 4] {
    use std::arch::x86_64::*;
    let low = _mm_set1_epi8(0x0f);
    // SAFETY: the caller's 16 bytes.
    let bytes = unsafe { _mm_loadu_si128(bytes as *const __m128i) };
    let lo = _mm_and_si128(bytes, low);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), low);
    [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)].map(|q| _mm256_cvtepu8_epi32(q))
}

/// [`row_against_panel`] on AVX2: the same sums in the same order, 8 columns per register.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_against_panel_avx2(
    scales: &[f32],
    nibbles: &[u8],
    a: &[f32],
    out: *mut f32,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let kb = scales.len() / NR;
    assert!(nibbles.len() >= kb * 32 * 16 && a.len() >= kb * 32);
    let mut acc = [_mm256_setzero_ps(); 4];
    for b in 0..kb {
        let xs = &a[b * 32..b * 32 + 32];
        let eight_sum = _mm256_set1_ps(8.0 * xs.iter().sum::<f32>());
        let mut t = [_mm256_setzero_ps(); 4];
        // SAFETY: the asserts above bound every access.
        unsafe {
            for (kk, &x) in xs.iter().enumerate() {
                let q = codes_avx2(nibbles.as_ptr().add((b * 32 + kk) * 16));
                let x = _mm256_set1_ps(x);
                for (t, q) in t.iter_mut().zip(q) {
                    *t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), x, *t);
                }
            }
            for (g, (acc, t)) in acc.iter_mut().zip(t).enumerate() {
                let s = _mm256_loadu_ps(scales.as_ptr().add(b * NR + 8 * g));
                *acc = _mm256_fmadd_ps(_mm256_sub_ps(t, eight_sum), s, *acc);
            }
        }
    }
    for (g, acc) in acc.iter().enumerate() {
        if 8 * g >= cols {
            break;
        }
        // SAFETY: the caller's `cols` columns at `out` are writable; masked lanes are not
        // written.
        unsafe { _mm256_maskstore_ps(out.add(8 * g), lanes_below(cols - 8 * g), *acc) };
    }
}

/// [`decode_panel`] on AVX2: the same values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_panel_avx2(scales: &[f32], nibbles: &[u8], block: &mut [f32]) {
    use std::arch::x86_64::*;
    let kb = scales.len() / NR;
    assert!(nibbles.len() >= kb * 32 * 16 && block.len() >= kb * 32 * NR);
    let eight = _mm256_set1_ps(8.0);
    for b in 0..kb {
        // SAFETY: the asserts above bound every access.
        unsafe {
            let s: [__m256; 4] =
                std::array::from_fn(|g| _mm256_loadu_ps(scales.as_ptr().add(b * NR + 8 * g)));
            for kk in 0..32 {
                let q = codes_avx2(nibbles.as_ptr().add((b * 32 + kk) * 16));
                let dst = block.as_mut_ptr().add((b * 32 + kk) * NR);
                for (g, (q, s)) in q.into_iter().zip(s).enumerate() {
                    let v = _mm256_sub_ps(_mm256_cvtepi32_ps(q), eight);
                    _mm256_storeu_ps(dst.add(8 * g), _mm256_mul_ps(v, s));
                }
            }
        }
    }
}

/// A lane mask of the first `valid` (at most 8) of 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn lanes_below(valid: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(valid.min(8) as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// One call of [`fma_tile`]: rows of `a` (stride `lda`) against a `[k, 32]` panel `b`, times
/// `scale`, into `c` (stride `ldc`), `cols` of the 32 columns stored.
pub(crate) struct FmaTile {
    pub a: *const f32,
    pub lda: usize,
    pub b: *const f32,
    pub k: usize,
    pub scale: f32,
    pub c: *mut f32,
    pub ldc: usize,
    pub cols: usize,
    /// Add to `c` instead of overwriting it (`scale` applies to the new part only).
    pub accumulate: bool,
    /// Null, or `k * 32` floats to fetch into L2 meanwhile (the next slice of a weight
    /// streamed from memory); prefetches never fault, so it may point past an allocation.
    pub prefetch: *const f32,
}

/// Which FMA tile edgevlm's f32 panel products ([`F32MatMul`]) run on this CPU: AVX-512 F,
/// else AVX2 with FMA, else none (the f32 panel products are then not used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum F32Kernel {
    /// 8 rows by 32 columns in two 16-lane registers per row.
    Avx512,
    /// The panel's two 16-column halves in turn, up to 6 rows at a time (12 accumulators of
    /// the 16 registers), the AVX-512 tile's sums in its order; one or two rows (a decode
    /// step) over all 32 columns, one row's contraction in two interleaved halves.
    Avx2,
}

impl F32Kernel {
    /// Activation rows per tile and contraction values per pass of the tiles over a panel.
    /// AVX2 takes the whole contraction of a 768-deep product per pass: its tiles store and
    /// reload their outputs between slices, which cost more there than the panel rows read
    /// from L2 instead of L1 (a 1024 x 768 x 3072 product 69.8 -> 57.8 ms).
    pub(crate) fn tile(self) -> (usize, usize) {
        match self {
            F32Kernel::Avx512 => (MR, KC),
            F32Kernel::Avx2 => (MR_AVX2, KC_AVX2),
        }
    }

    /// The instruction set's name, as load notes spell it.
    pub fn name(self) -> &'static str {
        match self {
            F32Kernel::Avx512 => "AVX-512",
            F32Kernel::Avx2 => "AVX2",
        }
    }

    /// The tag in load notes and the load cache's CPU stamp.
    pub fn tag(self) -> &'static str {
        match self {
            F32Kernel::Avx512 => "avx512",
            F32Kernel::Avx2 => "avx2",
        }
    }
}

/// The FMA tile this CPU runs, if any (none off x86_64).
pub fn f32_kernel() -> Option<F32Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::int8mm::available() {
            return Some(F32Kernel::Avx512);
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Some(F32Kernel::Avx2);
        }
    }
    None
}

/// [`fma_tile`] for `rows` (1 to 8) rows, on `kernel`'s tile.
///
/// # Safety
/// `kernel` runs on this CPU; `rows` rows of `a` and `c`, `k` rows of the panel `b` must be
/// readable and the first `cols` columns of `c` writable.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn fma_tile_rows(kernel: F32Kernel, rows: usize, t: &FmaTile) {
    if kernel == F32Kernel::Avx2 {
        // SAFETY: forwarded to the caller.
        unsafe { fma_tile_rows_avx2(rows, t) };
        return;
    }
    // SAFETY: forwarded to the caller.
    unsafe {
        match rows {
            8 => fma_tile::<8>(t),
            7 => fma_tile::<7>(t),
            6 => fma_tile::<6>(t),
            5 => fma_tile::<5>(t),
            4 => fma_tile::<4>(t),
            3 => fma_tile::<3>(t),
            2 => fma_tile::<2>(t),
            _ => fma_tile::<1>(t),
        }
    }
}

/// `R` rows by 32 columns: 16 FMA per contraction step, scaled and stored under a mask.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_tile<const R: usize>(t: &FmaTile) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for kk in 0..t.k {
        // SAFETY: kk < k (the caller's bounds).
        unsafe {
            let b = t.b.add(kk * NR);
            let (b0, b1) = (_mm512_loadu_ps(b), _mm512_loadu_ps(b.add(16)));
            if !t.prefetch.is_null() {
                let pf = t.prefetch.wrapping_add(kk * NR) as *const i8;
                _mm_prefetch::<_MM_HINT_T1>(pf);
                _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(64));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*t.a.add(r * t.lda + kk));
                acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
            }
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
    let s = _mm512_set1_ps(t.scale);
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: row r < R of c, its first `cols` columns (the caller's bounds).
        unsafe {
            let out = t.c.add(r * t.ldc);
            let (mut y0, mut y1) = (_mm512_mul_ps(acc[0], s), _mm512_mul_ps(acc[1], s));
            if t.accumulate {
                y0 = _mm512_add_ps(y0, _mm512_maskz_loadu_ps(m0, out));
                y1 = _mm512_add_ps(y1, _mm512_maskz_loadu_ps(m1, out.add(16)));
            }
            _mm512_mask_storeu_ps(out, m0, y0);
            if m1 != 0 {
                _mm512_mask_storeu_ps(out.add(16), m1, y1);
            }
        }
    }
}

/// [`fma_tile_rows`] on AVX2: one or two rows (a decode step) on [`fma_rows_avx2`]; 3 to 6
/// rows, and 7 and 8 as two groups of 4 and 3 or 4, over the panel's first 16 columns, then
/// (when the panel has more) its last 16.
///
/// # Safety
/// AVX2 and FMA; as [`fma_tile_rows`].
#[cfg(target_arch = "x86_64")]
unsafe fn fma_tile_rows_avx2(rows: usize, t: &FmaTile) {
    if rows <= 2 {
        // SAFETY: forwarded to the caller.
        unsafe {
            match rows {
                2 => fma_rows_avx2::<2>(t),
                _ => fma_rows_avx2::<1>(t),
            }
        }
        return;
    }
    let groups: &[(usize, usize)] = match rows {
        8 => &[(0, 4), (4, 4)],
        7 => &[(0, 4), (4, 3)],
        r => &[(0, r)][..],
    };
    for half in 0..2 {
        if t.cols <= half * 16 {
            break;
        }
        for &(row0, rows) in groups {
            // SAFETY: forwarded to the caller; row0 + rows is within its rows.
            unsafe {
                match rows {
                    6 => fma_half_avx2::<6>(t, row0, half),
                    5 => fma_half_avx2::<5>(t, row0, half),
                    4 => fma_half_avx2::<4>(t, row0, half),
                    _ => fma_half_avx2::<3>(t, row0, half),
                }
            }
        }
    }
}

/// One or two rows of [`fma_tile`]'s product over all 32 columns at once, for a decode
/// step's products, which stream their weight from memory: eight accumulators (one row's
/// contraction in two interleaved halves, summed at the end; or two rows), enough to cover
/// the FMA latency, where a half-panel pass would have two or four. No software prefetch:
/// the hardware's kept up better (probe fp32 decode step 8.6-8.9 ms with the AVX-512 tile's
/// prefetches, 7.2-8.9 without, one thread; 4.9-5.4 and 4.4-5.0 on two).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_rows_avx2<const R: usize>(t: &FmaTile) {
    use std::arch::x86_64::*;
    // [row, or contraction parity for one row][8-column group]
    let mut acc = [[_mm256_setzero_ps(); 4]; 2];
    // One row: even contraction steps into acc[0], odd ones into acc[1]. Two rows: every
    // step into both, row by row.
    let (pairs, rows) = if R == 2 { (t.k, 2) } else { (t.k / 2, 1) };
    for i in 0..pairs {
        for (h, acc) in acc.iter_mut().enumerate() {
            let (r, kk) = if rows == 2 { (h, i) } else { (0, 2 * i + h) };
            // SAFETY: r < R rows, kk < k (the caller's bounds).
            unsafe {
                let b = t.b.add(kk * NR);
                let x = _mm256_set1_ps(*t.a.add(r * t.lda + kk));
                for (g, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(x, _mm256_loadu_ps(b.add(8 * g)), *acc);
                }
            }
        }
    }
    if R == 1 {
        if t.k % 2 == 1 {
            let kk = t.k - 1;
            // SAFETY: as above.
            unsafe {
                let b = t.b.add(kk * NR);
                let x = _mm256_set1_ps(*t.a.add(kk));
                for (g, acc) in acc[0].iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(x, _mm256_loadu_ps(b.add(8 * g)), *acc);
                }
            }
        }
        let [even, odd] = &mut acc;
        for (e, o) in even.iter_mut().zip(odd.iter()) {
            *e = _mm256_add_ps(*e, *o);
        }
    }
    for (r, acc) in acc.iter().take(R).enumerate() {
        for (g, acc) in acc.iter().enumerate() {
            let first = 8 * g;
            if first >= t.cols {
                break;
            }
            // SAFETY: row r of c, columns first.. of its first `cols` (the caller's bounds).
            unsafe { store_avx2(t, r * t.ldc + first, first, *acc) };
        }
    }
}

/// Stores `acc` (columns `first..first + 8` of one row) times the tile's scale, plus what
/// is there when the tile accumulates, at `c + at`: the lanes of the columns below `cols`,
/// the others neither read nor written.
///
/// # Safety
/// AVX2; the lanes of the columns below `cols` at `c + at` are readable and writable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn store_avx2(t: &FmaTile, at: usize, first: usize, acc: std::arch::x86_64::__m256) {
    use std::arch::x86_64::*;
    let m = lanes_below(t.cols.saturating_sub(first));
    let out = t.c.wrapping_add(at);
    let mut y = _mm256_mul_ps(acc, _mm256_set1_ps(t.scale));
    // SAFETY: the caller's bounds, masked.
    unsafe {
        if t.accumulate {
            y = _mm256_add_ps(y, _mm256_maskload_ps(out, m));
        }
        _mm256_maskstore_ps(out, m, y);
    }
}

/// Rows `row0..row0 + R` of [`fma_tile`]'s product, 16 columns from `half * 16`: two 8-lane
/// registers per row, stored under a lane mask.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_half_avx2<const R: usize>(t: &FmaTile, row0: usize, half: usize) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    // SAFETY: rows row0..row0 + R of a (the caller's bounds).
    let a = unsafe { t.a.add(row0 * t.lda) };
    let prefetch = half == 0 && row0 == 0 && !t.prefetch.is_null();
    for kk in 0..t.k {
        // SAFETY: kk < k (the caller's bounds).
        unsafe {
            let b = t.b.add(kk * NR + half * 16);
            let (b0, b1) = (_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8)));
            if prefetch {
                let pf = t.prefetch.wrapping_add(kk * NR) as *const i8;
                _mm_prefetch::<_MM_HINT_T1>(pf);
                _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(64));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_set1_ps(*a.add(r * t.lda + kk));
                acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
            }
        }
    }
    let first = half * 16;
    for (r, acc) in acc.iter().enumerate() {
        let at = (row0 + r) * t.ldc + first;
        // SAFETY: row row0 + r of c, its first `cols` columns (the caller's bounds).
        unsafe {
            store_avx2(t, at, first, acc[0]);
            store_avx2(t, at + 8, first + 8, acc[1]);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The f32 kernels this CPU runs (AVX-512 hosts run the AVX2 ones too).
    pub(crate) fn kernels_here() -> Vec<F32Kernel> {
        #[cfg(target_arch = "x86_64")]
        {
            let mut kernels = vec![];
            if crate::int8mm::available() {
                kernels.push(F32Kernel::Avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                kernels.push(F32Kernel::Avx2);
            }
            kernels
        }
        #[cfg(not(target_arch = "x86_64"))]
        vec![]
    }

    /// Random Q4_0 bytes for an `[n, k]` weight and their f32 values (the definition).
    fn q4_weight(n: usize, k: usize, seed: &mut u64) -> (Vec<u8>, Vec<f32>) {
        let mut next = || crate::int8mm::tests::lcg(seed);
        let (mut bytes, mut values) = (vec![], vec![0f32; n * k]);
        for j in 0..n {
            for b in 0..k / 32 {
                let scale = f16::from_f32((next() % 1000) as f32 / 20000.0 + 0.001);
                bytes.extend(scale.to_bits().to_le_bytes());
                let nib: Vec<u8> = (0..16).map(|_| (next() % 256) as u8).collect();
                for i in 0..16 {
                    values[j * k + b * 32 + i] = ((nib[i] & 15) as f32 - 8.0) * scale.to_f32();
                    values[j * k + b * 32 + 16 + i] = ((nib[i] >> 4) as f32 - 8.0) * scale.to_f32();
                }
                bytes.extend(nib);
            }
        }
        (bytes, values)
    }

    /// f32 panels from both weight layouts, row tails, partial panels, k not a multiple of
    /// anything, against the f64 definition, on every kernel this CPU runs.
    #[test]
    fn f32_panels_equal_the_definition() {
        let kernels = kernels_here();
        if kernels.is_empty() {
            eprintln!("skipped: this CPU has no f32 panel kernel");
            return;
        }
        let mut seed = 11u64;
        let mut next = || (crate::int8mm::tests::lcg(&mut seed) % 2001) as f32 / 1000.0 - 1.0;
        // k = 600: three contraction slices (256, 256, 88), the later two added to c.
        for (m, k, n) in [
            (1, 5, 7),
            (9, 33, 45),
            (3, 64, 32),
            (17, 40, 70),
            (10, 600, 45),
            // Over 1 MiB packed: packed in runs of panels, one per core.
            (2, 600, 450),
            // More activation than one block of rows: slice by slice, block by block, the
            // last block ending in a partial tile.
            (391, 600, 70),
        ] {
            let w: Vec<f32> = (0..k * n).map(|_| next()).collect();
            let a: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let runs = [(true, 1), (false, 1), (true, 2)];
            for (kernel, (k_major, threads)) in kernels
                .iter()
                .flat_map(|&kernel| runs.map(|run| (kernel, run)))
            {
                let packed = F32Panels::pack(&w, k, n, k_major).unwrap();
                let mut c = vec![f32::NAN; m * n];
                let executor = crate::int8mm::tests::executor(threads);
                tract_linalg::multithread::multithread_tract_scope(executor, || {
                    packed.matmul_on(kernel, &a, m, &mut c)
                });
                for r in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|kk| {
                                let wv = if k_major {
                                    w[kk * n + j]
                                } else {
                                    w[j * k + kk]
                                };
                                a[r * k + kk] as f64 * wv as f64
                            })
                            .sum();
                        let got = c[r * n + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-4,
                            "{m}x{k}x{n} {k_major} {kernel:?} {threads} [{r},{j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
        assert!(F32Panels::pack(&[1.0; 6], 2, 4, true).is_none());
    }

    /// The AVX2 tiles (also where AVX-512 would be taken) against the definition: every row
    /// count (one and two rows on the decode-step kernel, an odd contraction length for its
    /// split), full and partial panels (masked halves, a second half skipped), stored and
    /// accumulated, scaled; nothing outside the rows and columns written.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_tiles_equal_the_definition() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("skipped: this CPU has no AVX2 with FMA");
            return;
        }
        let mut seed = 5u64;
        let mut next = || (crate::int8mm::tests::lcg(&mut seed) % 2001) as f32 / 1000.0 - 1.0;
        let (k, lda, ldc) = (37, 41, 40);
        let b: Vec<f32> = (0..k * NR).map(|_| next()).collect();
        let a: Vec<f32> = (0..8 * lda).map(|_| next()).collect();
        let start: Vec<f32> = (0..8 * ldc).map(|_| next()).collect();
        for rows in 1..=8 {
            for cols in [32, 31, 17, 16, 9, 8, 1] {
                for accumulate in [false, true] {
                    let mut c = start.clone();
                    let t = FmaTile {
                        a: a.as_ptr(),
                        lda,
                        b: b.as_ptr(),
                        k,
                        scale: 0.75,
                        c: c.as_mut_ptr(),
                        ldc,
                        cols,
                        accumulate,
                        prefetch: std::ptr::null(),
                    };
                    // SAFETY: checked above: the CPU; a has 8 rows of lda >= k, b has k rows
                    // of the panel, c has 8 rows of ldc >= 32 columns.
                    unsafe { fma_tile_rows_avx2(rows, &t) };
                    for r in 0..8 {
                        for j in 0..ldc {
                            let (got, was) = (c[r * ldc + j], start[r * ldc + j]);
                            if r >= rows || j >= cols {
                                assert_eq!(got.to_bits(), was.to_bits(), "{rows} {cols} [{r},{j}]");
                                continue;
                            }
                            let sum: f64 = (0..k)
                                .map(|kk| a[r * lda + kk] as f64 * b[kk * NR + j] as f64)
                                .sum();
                            let want = sum * 0.75 + if accumulate { was as f64 } else { 0.0 };
                            let diff = (got as f64 - want).abs();
                            assert!(diff < 1e-5, "{rows} {cols} {accumulate} [{r},{j}]: {diff}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn packed_parts_from_a_damaged_cache_entry_are_refused() {
        let packed = F32Panels::pack(&[0.5; 40 * 3], 3, 40, true).unwrap();
        let (n, k, panels) = packed.parts();
        assert_eq!((n, k, panels.len()), (40, 3, 2 * 3 * NR));
        assert!(F32Panels::from_parts(n, k, panels.clone()).is_some());
        // Another size, another type, sizes whose product overflows.
        assert!(F32Panels::from_parts(n, k + 1, panels.clone()).is_none());
        assert!(F32Panels::from_parts(n + 40, k, panels.clone()).is_none());
        assert!(F32Panels::from_parts(0, k, panels.clone()).is_none());
        let ints = rctensor1(&vec![0i32; panels.len()]);
        assert!(F32Panels::from_parts(n, k, ints).is_none());
        assert!(F32Panels::from_parts(usize::MAX, usize::MAX / 2, panels.clone()).is_none());
        let (bytes, _) = q4_weight(40, 64, &mut 3);
        let q4 = Q4Packed::from_q4_0(&bytes, 40, 64).unwrap();
        let (n, k, scales, nibbles) = q4.parts();
        let parts = |n, k| Q4Packed::from_parts(n, k, scales.to_vec(), nibbles.to_vec());
        assert!(parts(n, k).is_some());
        assert!(parts(n, k + 32).is_none());
        assert!(parts(n, 48).is_none());
        assert!(parts(usize::MAX, usize::MAX - 31).is_none());
    }

    /// ONNX `MatMulNBits` bytes (values `2i`, `2i + 1` in the low and high nibble of byte
    /// `i`) pack to what the same codes and scales as `Q4_0` pack to; wrong sizes are refused.
    #[test]
    fn matmul_nbits_layout_packs_like_q4_0() {
        let (n, k) = (45, 96);
        let (q4, _) = q4_weight(n, k, &mut 7);
        let (mut b, mut scales) = (vec![], vec![]);
        for block in q4.chunks_exact(18) {
            scales.push(f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32());
            let code = |i: usize| {
                if i < 16 {
                    block[2 + i] & 15
                } else {
                    block[2 + i - 16] >> 4
                }
            };
            b.extend((0..16).map(|i| code(2 * i) | code(2 * i + 1) << 4));
        }
        let ours = Q4Packed::from_matmul_nbits(&b, &scales, n, k).unwrap();
        let theirs = Q4Packed::from_q4_0(&q4, n, k).unwrap();
        assert_eq!(ours.scales, theirs.scales);
        assert_eq!(ours.nibbles, theirs.nibbles);
        assert!(Q4Packed::from_matmul_nbits(&b[1..], &scales, n, k).is_none());
        assert!(Q4Packed::from_matmul_nbits(&b, &scales[1..], n, k).is_none());
        assert!(Q4Packed::from_matmul_nbits(&b, &scales, n, k + 16).is_none());
    }

    /// Row tails 1-8, the row-by-row path for a few rows, partial panels, 1 and 2 threads,
    /// against the f64 definition, on every kernel this CPU runs.
    #[test]
    fn q4_product_equals_the_definition() {
        let kernels = kernels_here();
        if kernels.is_empty() {
            eprintln!("skipped: this CPU has no f32 panel kernel");
            return;
        }
        let mut seed = 11;
        // The last two are large enough to be split over threads; the last has two blocks
        // of rows and two contraction slices.
        for &(m, k, n) in &[
            (1, 32, 1),
            (3, 256, 70),
            (9, 64, 45),
            (16, 96, 32),
            (23, 256, 70),
            (40, 512, 250),
            (391, 320, 70),
        ] {
            let (bytes, w) = q4_weight(n, k, &mut seed);
            let packed = Q4Packed::from_q4_0(&bytes, n, k).unwrap();
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            for (kernel, threads) in kernels.iter().flat_map(|&k| [(k, 1), (k, 2)]) {
                let mut c = vec![f32::NAN; m * n];
                let executor = crate::int8mm::tests::executor(threads);
                tract_linalg::multithread::multithread_tract_scope(executor, || {
                    packed.matmul_on(kernel, &a, m, &mut c)
                });
                for r in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|i| a[r * k + i] as f64 * w[j * k + i] as f64)
                            .sum();
                        let got = c[r * n + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "m={m} k={k} n={n} {kernel:?} threads={threads} at ({r}, {j}): {got} \
                             vs {want}"
                        );
                    }
                }
            }
        }
        assert!(Q4Packed::from_q4_0(&[0; 18], 1, 16).is_none());
        assert!(Q4Packed::from_q4_0(&[0; 17], 1, 32).is_none());
    }
}
