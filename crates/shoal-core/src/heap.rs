//! Allocator settings for worker processes.
//!
//! A worker handles one chunk after another, and each chunk allocates about the same buffers:
//! the received frame, the list of items, the list of results, the packed reply (hundreds of
//! kilobytes for a chunk of small items). With glibc's defaults, blocks of 128 KiB or more are
//! `mmap`ed and unmapped again when freed, and free memory at the top of the heap is handed back
//! to the kernel (`brk`): the next chunk then takes the same pages afresh, a page fault (and a
//! page zeroed by the kernel) every 4 KiB. Profiles of 100,000 no-op items showed a quarter of a
//! worker's CPU there. Keeping a few megabytes of freed heap for the next chunk removes it.
//!
//! Only shoal's own worker processes call this: the driver is the user's process, and its
//! allocator is left as the user has it.

/// Blocks below this come from the heap (and are reused) rather than from their own mapping.
pub const MMAP_THRESHOLD: i32 = 4 << 20;
/// Free memory at the top of the heap kept for reuse rather than returned to the kernel.
pub const TRIM_THRESHOLD: i32 = 16 << 20;

/// Tunes glibc's allocator for a worker (see the module docs); returns whether it applied.
/// Elsewhere (another C library) it does nothing.
pub fn tune_for_worker() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is called at worker start-up,
        // and glibc serialises it with allocations.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_accepts_the_settings() {
        assert!(super::tune_for_worker());
    }
}
