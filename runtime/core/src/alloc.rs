//! Allocator settings for inference processes.
//!
//! Every run allocates its intermediate tensors again, many of them tens of MB (a ViT's
//! `heads x 1024 x 1024` attention scores: 50 MB). glibc serves blocks above its mmap
//! threshold (at most 32 MB, however it adapts) with fresh `mmap`s and unmaps them on free,
//! so each such tensor costs a page fault per 4 KiB on first touch, every run: 20-30 ms per
//! 50 MB on this project's machines, 35 % of the probe static-QDQ vision encoder's run
//! time. ONNX Runtime avoids this with its own arena. [`reuse_freed_memory`] has glibc keep
//! freed memory in the heap instead: the peak stays what the largest run needs; memory
//! freed after it stays mapped to the process until exit.
//!
//! Loading a graph is the opposite case: its transients (a protobuf's copy of every weight,
//! weights before they are packed) are freed once and never needed again. Kept in the heap
//! they would stay resident, and when two graphs load on two threads, each thread's malloc
//! arena keeps its own, so the peaks add up. [`while_loading`] puts glibc back to returning
//! large freed blocks for the duration of a load.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Whether [`reuse_freed_memory`] set the thresholds (and so may set them again).
static REUSING: AtomicBool = AtomicBool::new(false);
/// Loads running now ([`while_loading`] calls can nest and run on several threads); changed
/// under [`SWITCH`], read without it by [`loads_in_progress`].
static LOADS: AtomicUsize = AtomicUsize::new(0);
/// Held while a load starts or ends, so that the settings change with the first and the
/// last one.
static SWITCH: Mutex<()> = Mutex::new(());

/// Graph loads running now in this process ([`while_loading`]); inference splits leave
/// their cores to them (`team::for_each_part`).
pub(crate) fn loads_in_progress() -> usize {
    LOADS.load(Ordering::SeqCst)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    const GIB: libc::c_int = 1 << 30;
    /// The [`super::reuse_freed_memory`] values.
    pub(super) const REUSE: [(libc::c_int, libc::c_int); 2] = [
        (libc::M_MMAP_THRESHOLD, GIB),
        (libc::M_TRIM_THRESHOLD, 2 * (GIB - 1) + 1),
    ];
    /// While a graph loads: blocks from 8 MiB get their own mapping and go back to the
    /// system when freed (the heap keeps the reuse trim threshold: glibc's default of
    /// 128 KiB made float16 loads, which convert every weight, ~0.2 s slower still).
    /// Measured on the SmolVLM2-256M-shaped packages (two graphs loading at once): a 1 MiB
    /// mmap threshold gives the lowest peaks but makes loads up to 30 % slower (every
    /// weight-sized block faults its pages in afresh); 8 MiB keeps most of the gain (4-bit
    /// package 808 -> ~546 MiB) for ~0.1 s of load, more on float16 and QDQ packages
    /// (probe: ~0.25 s and ~0.1 s).
    pub(super) const LOAD: [(libc::c_int, libc::c_int); 1] = [(libc::M_MMAP_THRESHOLD, 8 << 20)];

    pub(super) fn set(params: &[(libc::c_int, libc::c_int)]) {
        for &(param, value) in params {
            // SAFETY: mallopt only changes allocator parameters; any value is valid and it
            // is thread-safe (glibc takes the arena lock).
            unsafe { libc::mallopt(param, value) };
        }
    }

    /// Gives the free pages of every arena back to the system.
    pub(super) fn trim() {
        // SAFETY: malloc_trim only releases memory no allocation holds.
        unsafe { libc::malloc_trim(0) };
    }
}

/// Makes glibc's `malloc` serve large blocks from the heap and keep freed memory for reuse
/// (`M_MMAP_THRESHOLD` 1 GiB, `M_TRIM_THRESHOLD` 2 GiB; `MALLOC_MMAP_THRESHOLD_` and
/// `MALLOC_TRIM_THRESHOLD_` in the environment still win). Call once, early, from a process
/// that runs models. A no-op on other C libraries.
pub fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let from_env = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
            .map(|var| std::env::var_os(var).is_some());
        let _switch = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        if !from_env.contains(&true) {
            REUSING.store(true, Ordering::SeqCst);
        }
        if LOADS.load(Ordering::SeqCst) == 0 {
            for (setting, from_env) in glibc::REUSE.iter().zip(from_env) {
                if !from_env {
                    glibc::set(std::slice::from_ref(setting));
                }
            }
        }
    }
}

/// Runs `load` with glibc returning large freed blocks to the system, then gives back what
/// the load freed in the heap (`malloc_trim`) and puts [`reuse_freed_memory`]'s settings
/// back. Calls may nest and run on several threads at once: the settings change when the
/// first load starts and when the last one ends, and inference running meanwhile on another
/// thread allocates under the load settings (correct, a little slower). Without
/// [`reuse_freed_memory`] in effect (another C library, or a threshold set in the
/// environment) it only runs `load`.
pub fn while_loading<R>(load: impl FnOnce() -> R) -> R {
    struct Loading;
    impl Drop for Loading {
        fn drop(&mut self) {
            let _switch = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
            let last = LOADS.fetch_sub(1, Ordering::SeqCst) == 1;
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            if last && REUSING.load(Ordering::SeqCst) {
                glibc::trim();
                glibc::set(&glibc::REUSE);
            }
        }
    }
    {
        let _switch = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        let first = LOADS.fetch_add(1, Ordering::SeqCst) == 0;
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if first && REUSING.load(Ordering::SeqCst) {
            glibc::set(&glibc::LOAD);
        }
    }
    let _loading = Loading;
    load()
}

#[cfg(test)]
mod tests {
    /// A weight-sized block allocated during a load has its own mapping (so freeing it gives
    /// it back), where [`super::reuse_freed_memory`] alone keeps blocks up to 1 GiB in the
    /// heap; a nested load ending does not end the outer one's settings.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_load_maps_large_blocks_on_their_own() {
        super::reuse_freed_memory();
        // SAFETY: mallinfo2 only reads allocator statistics.
        let mapped = || unsafe { libc::mallinfo2() }.hblkhd;
        // Above the load threshold, and small enough for a thread arena's 64 MiB heaps
        // (glibc maps bigger blocks of non-main threads on their own whatever the settings).
        const BLOCK: usize = 16 << 20;
        let inner = super::while_loading(|| {
            let inner = super::while_loading(|| 7);
            let before = mapped();
            let block = vec![1u8; BLOCK];
            let during = mapped();
            drop(std::hint::black_box(block));
            assert!(
                during >= before + BLOCK,
                "a {BLOCK}-byte block allocated while loading is not mmapped \
                 (mapped bytes {before} -> {during})"
            );
            inner
        });
        assert_eq!(inner, 7);
    }
}
