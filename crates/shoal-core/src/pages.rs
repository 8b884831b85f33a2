//! Undoing a process's own writes to a private file mapping.
//!
//! A worker maps a shared-memory segment privately (copy-on-write), so a task may write into
//! the arrays it received without anyone else seeing it. Mapping the same segment afresh for
//! every call costs a page fault per page on first touch (tens of milliseconds for 200 MB),
//! so a worker keeps the mapping for later calls that send the same data. Before reusing it,
//! [`revert_written`] finds the pages that a task copied on write (they are anonymous now,
//! no longer the segment's) through `/proc/self/pagemap` and drops them with
//! `MADV_DONTNEED`, after which they read as the segment again. Untouched pages keep their
//! page-table entries: no new faults.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Page present in memory.
const PRESENT: u64 = 1 << 63;
/// Page swapped out (only anonymous pages are, so it was written).
const SWAPPED: u64 = 1 << 62;
/// Page is a file page (or shared anonymous): still the segment's own.
const FILE: u64 = 1 << 61;

/// Entries read from `/proc/self/pagemap` at a time (8 bytes each).
const BATCH: usize = 8192;

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as usize
    } else {
        4096
    }
}

/// Whether a pagemap entry is a page this process wrote (copied on write, or swapped out).
fn written(entry: u64) -> bool {
    (entry & PRESENT != 0 && entry & FILE == 0) || entry & SWAPPED != 0
}

/// Drops every page of the private file mapping `[addr, addr + len)` that this process wrote
/// since it was mapped, so that it reads as the file again; returns how many pages it dropped.
///
/// # Safety
///
/// `[addr, addr + len)` must be a private file mapping of this process (page aligned at
/// `addr`), and nothing may read or write it during the call; what was written there is lost.
pub unsafe fn revert_written(addr: usize, len: usize) -> io::Result<usize> {
    let page = page_size();
    if addr % page != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "mapping is not page aligned",
        ));
    }
    let pages = len.div_ceil(page);
    let first = addr / page;
    let map = File::open("/proc/self/pagemap")?;
    let mut buf = vec![0u8; BATCH * 8];
    let mut dropped = 0;
    let mut run: Option<(usize, usize)> = None; // (first page index, count) of a written run
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(BATCH);
        let bytes = &mut buf[..n * 8];
        map.read_exact_at(bytes, ((first + done) * 8) as u64)?;
        for (i, raw) in bytes.chunks_exact(8).enumerate() {
            let entry = u64::from_ne_bytes(raw.try_into().expect("8 bytes"));
            let index = done + i;
            if written(entry) {
                run = match run {
                    Some((start, count)) if start + count == index => Some((start, count + 1)),
                    Some((start, count)) => {
                        // SAFETY: within the mapping, as the caller promised.
                        unsafe { discard(addr + start * page, count * page)? };
                        dropped += count;
                        Some((index, 1))
                    }
                    None => Some((index, 1)),
                };
            }
        }
        done += n;
    }
    if let Some((start, count)) = run {
        // SAFETY: within the mapping, as the caller promised.
        unsafe { discard(addr + start * page, count * page)? };
        dropped += count;
    }
    Ok(dropped)
}

/// # Safety
/// `[addr, addr + len)` lies in a private mapping nobody uses during the call.
unsafe fn discard(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: forwarded from the caller.
    if unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    fn private_map(file: &File, len: usize) -> *mut u8 {
        // SAFETY: a fresh private mapping of a file we own.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        addr as *mut u8
    }

    #[test]
    fn written_pages_read_as_the_file_again_and_others_are_kept() {
        let page = page_size();
        let len = 64 * page;
        let mut file = tempfile_in_memory();
        file.write_all(&vec![7u8; len]).unwrap();
        let base = private_map(&file, len);
        // SAFETY: every access below is inside the mapping.
        unsafe {
            for i in 0..64 {
                assert_eq!(*base.add(i * page), 7); // read: maps the file's pages
            }
            for i in [3usize, 4, 5, 40, 63] {
                *base.add(i * page + 1) = 1; // written: copied on write
            }
            let dropped = revert_written(base as usize, len).unwrap();
            assert_eq!(dropped, 5);
            for i in 0..64 {
                assert_eq!(*base.add(i * page + 1), 7, "page {i} reads as the file");
            }
            assert_eq!(revert_written(base as usize, len).unwrap(), 0);
            libc::munmap(base as *mut libc::c_void, len);
        }
    }

    #[test]
    fn an_unaligned_address_is_refused() {
        // SAFETY: refused before anything is touched.
        let err = unsafe { revert_written(page_size() + 1, 10) }.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    fn tempfile_in_memory() -> File {
        let name = std::ffi::CString::new("shoal-pages-test").unwrap();
        // SAFETY: memfd_create with a valid name.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    }
}
