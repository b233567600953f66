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

/// Makes glibc's `malloc` serve large blocks from the heap and keep freed memory for reuse
/// (`M_MMAP_THRESHOLD` 1 GiB, `M_TRIM_THRESHOLD` 2 GiB; `MALLOC_MMAP_THRESHOLD_` and
/// `MALLOC_TRIM_THRESHOLD_` in the environment still win). Call once, early, from a process
/// that runs models. A no-op on other C libraries.
pub fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const GIB: libc::c_int = 1 << 30;
        let set = |var: &str, param: libc::c_int, value: libc::c_int| {
            if std::env::var_os(var).is_none() {
                // SAFETY: mallopt only changes allocator parameters; any value is valid and
                // it is thread-safe (glibc takes the arena lock).
                unsafe { libc::mallopt(param, value) };
            }
        };
        set("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, GIB);
        set(
            "MALLOC_TRIM_THRESHOLD_",
            libc::M_TRIM_THRESHOLD,
            2 * (GIB - 1) + 1,
        );
    }
}
