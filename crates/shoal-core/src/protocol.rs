//! The wire protocol between the driver and its workers.
//!
//! Every message is one *frame*: a fixed 32-byte header, then the lengths of any out-of-band
//! buffers, then those buffers, then the payload. Payloads and buffers are opaque bytes: Rust never
//! looks inside them (pickling happens in Python). The out-of-band buffer slots are there so that a
//! later transport can ship large buffers (pickle protocol 5) beside the payload, or replace them by
//! shared-memory handles, without changing the frame layout. The same encoding works over any
//! byte stream (a Unix socket today, TCP or an MPI message tomorrow).
//!
//! Header layout (little endian):
//!
//! | bytes  | field        | meaning                                            |
//! |--------|--------------|----------------------------------------------------|
//! | 0..2   | magic        | `0x5348` ("SH"), catches a desynchronised stream  |
//! | 2      | version      | [`VERSION`]                                        |
//! | 3      | kind         | [`Kind`]                                           |
//! | 4..6   | n_buffers    | number of out-of-band buffers                      |
//! | 6..8   | n_fds        | file descriptors passed with the frame (see below) |
//! | 8..16  | id           | task id, setup id or pid, depending on the kind    |
//! | 16..24 | aux          | setup id of a task, elapsed ns of a result         |
//! | 24..32 | payload_len  | length of the payload in bytes                     |
//!
//! A frame may come with file descriptors (shared-memory segments holding a result's large
//! buffers), passed as `SCM_RIGHTS` ancillary data with the frame's first bytes; the header says
//! how many, so the reader hands exactly those to the frame (see [`crate::fdpass`]).

use std::io::{self, Read, Write};

use crate::error::{Error, Result};

/// Length of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 32;
/// Magic number at the start of every frame.
pub const MAGIC: u16 = 0x5348;
/// Protocol version; bumped on any incompatible change.
pub const VERSION: u8 = 2;
/// Largest payload or buffer accepted, so that a corrupt length cannot make us allocate wildly.
pub const MAX_SECTION_LEN: u64 = 1 << 36;
/// Largest number of out-of-band buffers in one frame.
pub const MAX_BUFFERS: u32 = u16::MAX as u32;
/// Largest number of file descriptors passed with one frame.
pub const MAX_FDS: u16 = 64;

/// What a frame means. Driver-to-worker kinds and worker-to-driver kinds share one space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Worker to driver, first frame: `id` is the worker's pid.
    Hello = 1,
    /// Driver to worker: `id` is a setup id, payload is the pickled call spec (function, fixed args).
    Setup = 2,
    /// Driver to worker: `id` is the task id, `aux` its setup id, payload the pickled chunk.
    Task = 3,
    /// Worker to driver: `id` is the task id, `aux` the elapsed ns, payload the pickled outcome.
    Result = 4,
    /// Driver to worker: forget setup `id`.
    Release = 5,
    /// Driver to worker: exit cleanly.
    Shutdown = 6,
    /// Worker to driver, while a long task runs: `id` is the task id, `aux` the number of its
    /// items the payload covers (the next ones not yet reported), payload their pickled outcome.
    /// The task goes on; its `Result` covers only the items after those reported.
    Partial = 7,
}

impl Kind {
    /// Decodes a kind byte.
    ///
    /// # Errors
    /// [`Error::Protocol`] for an unknown byte.
    pub fn from_u8(byte: u8) -> Result<Self> {
        Ok(match byte {
            1 => Kind::Hello,
            2 => Kind::Setup,
            3 => Kind::Task,
            4 => Kind::Result,
            5 => Kind::Release,
            6 => Kind::Shutdown,
            7 => Kind::Partial,
            other => return Err(Error::Protocol(format!("unknown frame kind {other}"))),
        })
    }
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the frame means.
    pub kind: Kind,
    /// Task id, setup id or pid (see [`Kind`]).
    pub id: u64,
    /// Second integer field (see [`Kind`]).
    pub aux: u64,
    /// The main opaque payload.
    pub payload: Vec<u8>,
    /// Out-of-band buffers, in order.
    pub buffers: Vec<Vec<u8>>,
    /// How many file descriptors were passed with this frame.
    pub n_fds: u16,
}

impl Frame {
    /// A frame with a payload and no out-of-band buffers.
    pub fn new(kind: Kind, id: u64, aux: u64, payload: Vec<u8>) -> Self {
        Frame {
            kind,
            id,
            aux,
            payload,
            buffers: Vec::new(),
            n_fds: 0,
        }
    }
}

/// Encodes a header for a payload of `payload_len` bytes and the given buffer lengths.
pub fn encode_header(
    kind: Kind,
    id: u64,
    aux: u64,
    payload_len: usize,
    buffer_lens: &[usize],
) -> Vec<u8> {
    encode_header_with_fds(kind, id, aux, payload_len, buffer_lens, 0)
}

/// [`encode_header`] for a frame that comes with `n_fds` file descriptors.
pub fn encode_header_with_fds(
    kind: Kind,
    id: u64,
    aux: u64,
    payload_len: usize,
    buffer_lens: &[usize],
    n_fds: u16,
) -> Vec<u8> {
    debug_assert!(buffer_lens.len() <= MAX_BUFFERS as usize && n_fds <= MAX_FDS);
    let mut out = Vec::with_capacity(HEADER_LEN + 8 * buffer_lens.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&(buffer_lens.len() as u16).to_le_bytes());
    out.extend_from_slice(&n_fds.to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&aux.to_le_bytes());
    out.extend_from_slice(&(payload_len as u64).to_le_bytes());
    for len in buffer_lens {
        out.extend_from_slice(&(*len as u64).to_le_bytes());
    }
    out
}

/// Appends the whole encoded frame (header, buffers, payload) to `out`.
///
/// Taking slices rather than a [`Frame`] lets callers send shared payloads without copying them
/// into an owned frame first.
pub fn encode_into(
    out: &mut Vec<u8>,
    kind: Kind,
    id: u64,
    aux: u64,
    payload: &[u8],
    buffers: &[&[u8]],
) {
    let lens: Vec<usize> = buffers.iter().map(|b| b.len()).collect();
    out.extend_from_slice(&encode_header(kind, id, aux, payload.len(), &lens));
    for buffer in buffers {
        out.extend_from_slice(buffer);
    }
    out.extend_from_slice(payload);
}

/// Encodes a frame into a fresh byte vector.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let buffers: Vec<&[u8]> = frame.buffers.iter().map(Vec::as_slice).collect();
    let mut out = Vec::with_capacity(HEADER_LEN + frame.payload.len());
    encode_into(
        &mut out,
        frame.kind,
        frame.id,
        frame.aux,
        &frame.payload,
        &buffers,
    );
    out[6..8].copy_from_slice(&frame.n_fds.to_le_bytes());
    out
}

/// Writes one frame to `w` (no flush).
///
/// # Errors
/// Any I/O error of the writer.
pub fn write_frame(w: &mut impl Write, frame: &Frame) -> io::Result<()> {
    w.write_all(&encode(frame))
}

struct Header {
    kind: Kind,
    n_buffers: u32,
    n_fds: u16,
    id: u64,
    aux: u64,
    payload_len: u64,
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(raw)
}

fn parse_header(bytes: &[u8; HEADER_LEN]) -> Result<Header> {
    let magic = u16::from_le_bytes([bytes[0], bytes[1]]);
    if magic != MAGIC {
        return Err(Error::Protocol(format!(
            "bad magic {magic:#06x}: stream out of sync"
        )));
    }
    if bytes[2] != VERSION {
        return Err(Error::Protocol(format!(
            "protocol version {} on the wire, {VERSION} expected (mixed shoal installs?)",
            bytes[2]
        )));
    }
    let kind = Kind::from_u8(bytes[3])?;
    let n_buffers = u32::from(u16::from_le_bytes([bytes[4], bytes[5]]));
    let n_fds = u16::from_le_bytes([bytes[6], bytes[7]]);
    if n_fds > MAX_FDS {
        return Err(Error::Protocol(format!(
            "{n_fds} descriptors with one frame"
        )));
    }
    let payload_len = u64_at(bytes, 24);
    if payload_len > MAX_SECTION_LEN {
        return Err(Error::Protocol(format!("payload of {payload_len} bytes")));
    }
    Ok(Header {
        kind,
        n_buffers,
        n_fds,
        id: u64_at(bytes, 8),
        aux: u64_at(bytes, 16),
        payload_len,
    })
}

fn read_section(r: &mut impl Read, len: u64) -> Result<Vec<u8>> {
    if len > MAX_SECTION_LEN {
        return Err(Error::Protocol(format!("section of {len} bytes")));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// Reads one frame. Returns `Ok(None)` on a clean end of stream at a frame boundary.
///
/// # Errors
/// [`Error::Io`] for I/O failures or a stream cut inside a frame; [`Error::Protocol`] for a
/// malformed header.
pub fn read_frame(r: &mut impl Read) -> Result<Option<Frame>> {
    let mut header = [0u8; HEADER_LEN];
    // Distinguish "no more frames" from "stream cut mid-frame".
    let mut filled = 0;
    while filled < HEADER_LEN {
        match r.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(Error::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::Io(e)),
        }
    }
    let head = parse_header(&header)?;
    let mut lens = Vec::with_capacity(head.n_buffers as usize);
    for _ in 0..head.n_buffers {
        let mut raw = [0u8; 8];
        r.read_exact(&mut raw)?;
        lens.push(u64::from_le_bytes(raw));
    }
    let mut buffers = Vec::with_capacity(lens.len());
    for len in lens {
        buffers.push(read_section(r, len)?);
    }
    let payload = read_section(r, head.payload_len)?;
    Ok(Some(Frame {
        kind: head.kind,
        id: head.id,
        aux: head.aux,
        payload,
        buffers,
        n_fds: head.n_fds,
    }))
}

/// Whether `buf` starts with at least one complete frame.
///
/// A worker uses this to decide whether its next read can be served from what it has already
/// buffered; if not, it flushes its pending results before blocking, which batches results
/// naturally when tasks arrive faster than they finish.
pub fn holds_complete_frame(buf: &[u8]) -> bool {
    if buf.len() < HEADER_LEN {
        return false;
    }
    let n_buffers = u16::from_le_bytes([buf[4], buf[5]]) as usize;
    let lens_end = HEADER_LEN + 8 * n_buffers;
    if buf.len() < lens_end {
        return false;
    }
    let mut total = lens_end as u64 + u64_at(buf, 24);
    for i in 0..n_buffers {
        total = total.saturating_add(u64_at(buf, HEADER_LEN + 8 * i));
    }
    (buf.len() as u64) >= total
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn sample() -> Frame {
        Frame {
            kind: Kind::Task,
            id: 42,
            aux: u64::MAX - 1,
            payload: b"hello payload".to_vec(),
            buffers: vec![vec![1, 2, 3], Vec::new(), vec![9; 1000]],
            n_fds: 3,
        }
    }

    #[test]
    fn round_trip_with_buffers() {
        let frame = sample();
        let bytes = encode(&frame);
        let back = read_frame(&mut Cursor::new(bytes)).unwrap().unwrap();
        assert_eq!(back, frame);
    }

    #[test]
    fn several_frames_then_clean_eof() {
        let mut bytes = Vec::new();
        for i in 0..5u64 {
            write_frame(
                &mut bytes,
                &Frame::new(Kind::Result, i, i * 10, vec![i as u8; i as usize]),
            )
            .unwrap();
        }
        let mut cursor = Cursor::new(bytes);
        for i in 0..5u64 {
            let f = read_frame(&mut cursor).unwrap().unwrap();
            assert_eq!(
                (f.kind, f.id, f.aux, f.payload.len()),
                (Kind::Result, i, i * 10, i as usize)
            );
        }
        assert!(read_frame(&mut cursor).unwrap().is_none());
    }

    #[test]
    fn truncated_frame_is_an_error_not_eof() {
        let bytes = encode(&sample());
        for cut in [1, HEADER_LEN - 1, HEADER_LEN + 3, bytes.len() - 1] {
            let err = read_frame(&mut Cursor::new(&bytes[..cut])).unwrap_err();
            assert!(matches!(err, Error::Io(_)), "cut at {cut}: {err:?}");
        }
    }

    #[test]
    fn bad_magic_and_kind_are_protocol_errors() {
        let mut bytes = encode(&sample());
        bytes[0] ^= 0xff;
        assert!(matches!(
            read_frame(&mut Cursor::new(&bytes)),
            Err(Error::Protocol(_))
        ));
        let mut bytes = encode(&sample());
        bytes[3] = 99;
        assert!(matches!(
            read_frame(&mut Cursor::new(&bytes)),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn descriptor_count_travels_and_is_bounded() {
        let mut frame = Frame::new(Kind::Result, 7, 1, b"x".to_vec());
        frame.n_fds = MAX_FDS;
        let bytes = encode(&frame);
        assert_eq!(
            read_frame(&mut Cursor::new(&bytes)).unwrap().unwrap().n_fds,
            MAX_FDS
        );
        let mut bytes = bytes;
        bytes[6..8].copy_from_slice(&(MAX_FDS + 1).to_le_bytes());
        assert!(matches!(
            read_frame(&mut Cursor::new(&bytes)),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn huge_length_is_rejected_before_allocating() {
        let mut bytes = encode(&Frame::new(Kind::Setup, 1, 0, Vec::new()));
        bytes[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            read_frame(&mut Cursor::new(&bytes)),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn complete_frame_detection() {
        let bytes = encode(&sample());
        for cut in 0..bytes.len() {
            assert!(!holds_complete_frame(&bytes[..cut]), "cut {cut}");
        }
        assert!(holds_complete_frame(&bytes));
        let mut two = bytes.clone();
        two.extend_from_slice(&bytes[..10]);
        assert!(holds_complete_frame(&two));
    }
}
