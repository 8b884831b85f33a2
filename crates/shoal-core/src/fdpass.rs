//! File descriptors passed with frames over a Unix socket (`SCM_RIGHTS`).
//!
//! A worker sends a result's large buffers as shared-memory segments (memfds) instead of bytes:
//! it writes each buffer into a segment and passes the segments' descriptors with the result
//! frame. The driver then maps the segments, so the buffers are never copied through the socket,
//! and a result that has arrived survives its worker dying right after sending it.
//!
//! On a stream socket the kernel delivers passed descriptors with the first bytes of the
//! `sendmsg` that carried them, and never merges two such messages' descriptors into one
//! `recvmsg`. A sender therefore passes a frame's descriptors with the frame's own first bytes,
//! and [`FdReader`] queues descriptors as they arrive: by the time a frame is complete, its
//! descriptors are at the front of the queue, after those of earlier frames, and the frame's
//! header says how many to take (`n_fds`).

use std::collections::VecDeque;
use std::io::{self, Read};
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::protocol::MAX_FDS;

/// Room for the control message of one `recvmsg`: at most [`MAX_FDS`] descriptors.
fn control_len() -> usize {
    // SAFETY: CMSG_SPACE is a pure computation.
    unsafe { libc::CMSG_SPACE((MAX_FDS as usize * mem::size_of::<RawFd>()) as u32) as usize }
}

/// A reader over a Unix stream socket that keeps the descriptors passed with the bytes it reads.
///
/// Wrap it in a `BufReader` like any reader; after each frame, [`FdReader::take`] the number of
/// descriptors its header announced.
#[derive(Debug)]
pub struct FdReader {
    stream: UnixStream,
    fds: VecDeque<OwnedFd>,
    control: Vec<u64>,
}

impl FdReader {
    /// Reads from `stream`.
    pub fn new(stream: UnixStream) -> Self {
        let words = control_len().div_ceil(mem::size_of::<u64>());
        FdReader {
            stream,
            fds: VecDeque::new(),
            control: vec![0; words],
        }
    }

    /// Takes the `n` oldest received descriptors, or `None` if fewer than `n` have arrived
    /// (a protocol error: a frame's descriptors arrive no later than its first byte).
    pub fn take(&mut self, n: usize) -> Option<Vec<OwnedFd>> {
        if self.fds.len() < n {
            return None;
        }
        Some(self.fds.drain(..n).collect())
    }

    /// How many received descriptors no frame has claimed yet.
    pub fn pending(&self) -> usize {
        self.fds.len()
    }
}

impl Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain old data; every pointer set below outlives the call.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = self.control.as_mut_ptr().cast();
        msg.msg_controllen = self.control.len() * mem::size_of::<u64>();
        // Close-on-exec at once: the spawner forks new workers concurrently, and a received
        // segment must not leak into them.
        // SAFETY: a valid socket and a msghdr whose buffers are valid for their lengths.
        let n = unsafe { libc::recvmsg(self.stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel filled `msg`'s control buffer; we walk it with the CMSG macros and
        // take ownership of every descriptor it holds exactly once.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                let header = &*cmsg;
                if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                    let bytes = header.cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..bytes / mem::size_of::<RawFd>() {
                        let fd = data.add(i).read_unaligned();
                        self.fds.push_back(OwnedFd::from_raw_fd(fd));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            // More descriptors than a frame may carry: the excess was closed by the kernel, so
            // the frames can no longer be matched with their descriptors.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a peer passed more descriptors than one frame may carry",
            ));
        }
        Ok(n as usize)
    }
}

/// Sends `parts` (one frame's bytes) on `stream`, passing `fds` with the first byte.
///
/// The caller must have flushed anything it buffered for this stream before, so that frames
/// stay in order.
///
/// # Errors
/// Any error of `sendmsg` or `write`; `InvalidInput` for more than [`MAX_FDS`] descriptors.
pub fn send_with_fds(stream: &UnixStream, parts: &[&[u8]], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} descriptors for one frame (at most {MAX_FDS})",
                fds.len()
            ),
        ));
    }
    let first = parts.iter().position(|p| !p.is_empty());
    let Some(first) = first else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "descriptors need at least one byte to travel with",
        ));
    };
    let mut control = vec![0u64; control_len().div_ceil(mem::size_of::<u64>())];
    let mut iovs: Vec<libc::iovec> = parts[first..]
        .iter()
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    // SAFETY: msghdr is plain old data; its pointers (iovecs, control buffer) outlive the call,
    // and the control buffer is large enough for MAX_FDS descriptors.
    let sent = unsafe {
        let mut msg: libc::msghdr = mem::zeroed();
        msg.msg_iov = iovs.as_mut_ptr();
        msg.msg_iovlen = iovs.len();
        if !fds.is_empty() {
            let payload = mem::size_of_val(fds);
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(payload as u32) as usize;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                fds.len(),
            );
        }
        loop {
            let n = libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
            if n >= 0 {
                break n as usize;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    };
    // The descriptors went with the first bytes; the rest of the frame is plain bytes.
    let mut skip = sent;
    let mut writer = stream;
    for part in &parts[first..] {
        if skip >= part.len() {
            skip -= part.len();
            continue;
        }
        io::Write::write_all(&mut writer, &part[skip..])?;
        skip = 0;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufReader, Seek, SeekFrom, Write};

    fn memfd_with(text: &[u8]) -> OwnedFd {
        // SAFETY: plain syscall with a valid name.
        let raw = unsafe { libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh descriptor nobody else owns.
        let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        file.write_all(text).unwrap();
        file.into()
    }

    fn contents(fd: OwnedFd) -> Vec<u8> {
        let mut file = std::fs::File::from(fd);
        file.seek(SeekFrom::Start(0)).unwrap();
        let mut out = Vec::new();
        file.read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn descriptors_arrive_with_their_bytes_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let first = memfd_with(b"one");
        let second = [memfd_with(b"two"), memfd_with(b"three")];
        let size = 1 << 20; // larger than a socket buffer: sent in pieces
        let big = vec![7u8; size];
        let sender = std::thread::spawn(move || {
            send_with_fds(&a, &[b"AAAA", b"", b"tail"], &[first.as_raw_fd()]).unwrap();
            (&a).write_all(b"plain").unwrap();
            let raw: Vec<RawFd> = second.iter().map(AsRawFd::as_raw_fd).collect();
            send_with_fds(&a, &[b"BB", &big], &raw).unwrap();
        });
        let mut reader = BufReader::new(FdReader::new(b));
        let mut got = vec![0u8; 8 + 5 + 2 + size];
        reader.read_exact(&mut got).unwrap();
        sender.join().unwrap();
        assert_eq!(&got[..15], b"AAAAtailplainBB");
        assert!(got[15..].iter().all(|&x| x == 7));
        let fds = reader.get_mut();
        assert_eq!(fds.pending(), 3);
        assert_eq!(contents(fds.take(1).unwrap().remove(0)), b"one");
        let rest = fds.take(2).unwrap();
        let texts: Vec<Vec<u8>> = rest.into_iter().map(contents).collect();
        assert_eq!(texts, vec![b"two".to_vec(), b"three".to_vec()]);
        assert!(fds.take(1).is_none());
    }

    #[test]
    fn too_many_descriptors_are_refused_before_sending() {
        let (a, _b) = UnixStream::pair().unwrap();
        let fds = vec![a.as_raw_fd(); MAX_FDS as usize + 1];
        let err = send_with_fds(&a, &[b"x"], &fds).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
