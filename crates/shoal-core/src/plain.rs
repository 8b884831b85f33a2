//! A compact encoding for lists of plain values: ints, floats, strings, bytes, booleans and
//! `None`.
//!
//! Most maps send lists of numbers or short strings and get lists of numbers back. Pickling
//! such a list walks it object by object in Python's pickler and unpickling rebuilds it the
//! same way; this encoding is written and read by Rust in one pass, with no pickle machinery,
//! which is what makes 100,000 no-op calls cheap. A list holding anything else is pickled as
//! before: the Python layer tries this encoding first and falls back when [`Writer`] is given a
//! value it cannot hold.
//!
//! Layout: the 4-byte [`MAGIC`], the input index of the first item (u64, little-endian), the
//! count (u32), then the values. A list of ints only, or of floats only (the common case), is
//! one [`INTS`] or [`FLOATS`] byte and a packed array of 8-byte values. Otherwise each value is
//! tagged: a tag byte, then 8 bytes for an int or a float, or a u32 length and the bytes of a
//! string or bytes.

use crate::error::{Error, Result};

/// First bytes of an encoded list (never the start of a pickle, nor of a shared-memory payload).
pub const MAGIC: &[u8; 4] = b"PLN\x01";

const NONE: u8 = 0;
const INT: u8 = 1;
const FLOAT: u8 = 2;
const STR: u8 = 3;
const BYTES: u8 = 4;
const TRUE: u8 = 5;
const FALSE: u8 = 6;
/// Layout byte of a list of ints only: `count` little-endian i64 follow.
pub const INTS: u8 = 7;
/// Layout byte of a list of floats only: `count` little-endian f64 follow.
pub const FLOATS: u8 = 8;

/// One decoded value, borrowing strings and bytes from the buffer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    /// `None`.
    None,
    /// An int that fits in 64 bits.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string (valid UTF-8).
    Str(&'a str),
    /// Bytes.
    Bytes(&'a [u8]),
    /// A boolean.
    Bool(bool),
}

/// Builds an encoded list.
///
/// # Examples
///
/// ```
/// use shoal_core::plain::{Reader, Value, Writer};
/// let mut w = Writer::new(10, 2);
/// w.int(7);
/// w.str("x");
/// let bytes = w.finish();
/// let mut r = Reader::new(&bytes).unwrap();
/// assert_eq!((r.start(), r.count()), (10, 2));
/// assert_eq!(r.next_value().unwrap(), Value::Int(7));
/// assert_eq!(r.next_value().unwrap(), Value::Str("x"));
/// ```
#[derive(Debug)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// A list of `count` values whose first item has input index `start`.
    pub fn new(start: u64, count: u32) -> Self {
        let mut buf = Vec::with_capacity(16 + 9 * count as usize);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&start.to_le_bytes());
        buf.extend_from_slice(&count.to_le_bytes());
        Writer { buf }
    }

    /// Appends `None`.
    pub fn none(&mut self) {
        self.buf.push(NONE);
    }

    /// Appends an int.
    pub fn int(&mut self, v: i64) {
        self.buf.push(INT);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// Appends a float.
    pub fn float(&mut self, v: f64) {
        self.buf.push(FLOAT);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// Appends a boolean.
    pub fn bool(&mut self, v: bool) {
        self.buf.push(if v { TRUE } else { FALSE });
    }

    /// Appends a string.
    ///
    /// # Errors
    /// [`Error::Protocol`] if it is longer than `u32::MAX` bytes.
    pub fn str(&mut self, v: &str) -> Result<()> {
        self.sized(STR, v.as_bytes())
    }

    /// Appends bytes.
    ///
    /// # Errors
    /// [`Error::Protocol`] if they are longer than `u32::MAX` bytes.
    pub fn bytes(&mut self, v: &[u8]) -> Result<()> {
        self.sized(BYTES, v)
    }

    fn sized(&mut self, tag: u8, v: &[u8]) -> Result<()> {
        let len = u32::try_from(v.len())
            .map_err(|_| Error::Protocol(format!("a value of {} bytes is too long", v.len())))?;
        self.buf.push(tag);
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(v);
        Ok(())
    }

    /// The encoded bytes.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }

    /// A list of `count` ints only: call [`Writer::raw_i64`] `count` times, then
    /// [`Writer::finish`].
    pub fn ints(start: u64, count: u32) -> Self {
        let mut w = Writer::new(start, count);
        w.buf.reserve(8 * count as usize);
        w.buf.push(INTS);
        w
    }

    /// A list of `count` floats only: call [`Writer::raw_f64`] `count` times.
    pub fn floats(start: u64, count: u32) -> Self {
        let mut w = Writer::new(start, count);
        w.buf.reserve(8 * count as usize);
        w.buf.push(FLOATS);
        w
    }

    /// Appends an int to a list made by [`Writer::ints`].
    #[inline]
    pub fn raw_i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// Appends a float to a list made by [`Writer::floats`].
    #[inline]
    pub fn raw_f64(&mut self, v: f64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
}

/// How the values of an encoded list are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One tag per value ([`Reader::next_value`]).
    Tagged,
    /// Ints only ([`Reader::array`] holds them, 8 bytes each).
    Ints,
    /// Floats only ([`Reader::array`] holds them, 8 bytes each).
    Floats,
}

/// Reads an encoded list.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    start: u64,
    count: u32,
}

impl<'a> Reader<'a> {
    /// Reads the header of `buf`.
    ///
    /// # Errors
    /// [`Error::Protocol`] if `buf` does not start with [`MAGIC`] and a whole header.
    pub fn new(buf: &'a [u8]) -> Result<Self> {
        if buf.len() < 16 || &buf[..4] != MAGIC {
            return Err(Error::Protocol(
                "not an encoded list of plain values".into(),
            ));
        }
        let start = u64::from_le_bytes(buf[4..12].try_into().expect("8 bytes"));
        let count = u32::from_le_bytes(buf[12..16].try_into().expect("4 bytes"));
        Ok(Reader {
            buf,
            pos: 16,
            start,
            count,
        })
    }

    /// How the values are laid out.
    pub fn layout(&self) -> Layout {
        match self.buf.get(16) {
            Some(&INTS) if self.pos == 16 => Layout::Ints,
            Some(&FLOATS) if self.pos == 16 => Layout::Floats,
            _ => Layout::Tagged,
        }
    }

    /// The packed 8-byte values of an [`Layout::Ints`] or [`Layout::Floats`] list.
    ///
    /// # Errors
    /// [`Error::Protocol`] if the buffer does not hold `count` of them.
    pub fn array(&self) -> Result<&'a [u8]> {
        let want = 8 * self.count as usize;
        let data = &self.buf[17.min(self.buf.len())..];
        if data.len() != want {
            return Err(Error::Protocol("encoded array has the wrong length".into()));
        }
        Ok(data)
    }

    /// Input index of the first item.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Number of values.
    pub fn count(&self) -> u32 {
        self.count
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| Error::Protocol("encoded list is truncated".into()))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    /// The next value.
    ///
    /// # Errors
    /// [`Error::Protocol`] for a truncated buffer, an unknown tag or a string that is not UTF-8.
    pub fn next_value(&mut self) -> Result<Value<'a>> {
        let tag = self.take(1)?[0];
        Ok(match tag {
            NONE => Value::None,
            TRUE => Value::Bool(true),
            FALSE => Value::Bool(false),
            INT => Value::Int(i64::from_le_bytes(self.take(8)?.try_into().expect("8"))),
            FLOAT => Value::Float(f64::from_le_bytes(self.take(8)?.try_into().expect("8"))),
            STR | BYTES => {
                let len = u32::from_le_bytes(self.take(4)?.try_into().expect("4")) as usize;
                let raw = self.take(len)?;
                if tag == BYTES {
                    Value::Bytes(raw)
                } else {
                    Value::Str(std::str::from_utf8(raw).map_err(|e| {
                        Error::Protocol(format!("encoded string is not UTF-8: {e}"))
                    })?)
                }
            }
            other => return Err(Error::Protocol(format!("unknown value tag {other}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips() {
        let mut w = Writer::new(u64::MAX - 1, 7);
        w.none();
        w.int(i64::MIN);
        w.float(-0.5);
        w.str("héllo").unwrap();
        w.bytes(b"\x00\xff").unwrap();
        w.bool(true);
        w.bool(false);
        let buf = w.finish();
        let mut r = Reader::new(&buf).unwrap();
        assert_eq!(r.start(), u64::MAX - 1);
        let got: Vec<Value> = (0..r.count()).map(|_| r.next_value().unwrap()).collect();
        assert_eq!(
            got,
            vec![
                Value::None,
                Value::Int(i64::MIN),
                Value::Float(-0.5),
                Value::Str("héllo"),
                Value::Bytes(b"\x00\xff"),
                Value::Bool(true),
                Value::Bool(false),
            ]
        );
    }

    #[test]
    fn arrays_round_trip() {
        let mut w = Writer::ints(3, 3);
        for v in [1, -2, i64::MAX] {
            w.raw_i64(v);
        }
        let buf = w.finish();
        let r = Reader::new(&buf).unwrap();
        assert_eq!(r.layout(), Layout::Ints);
        let got: Vec<i64> = r
            .array()
            .unwrap()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, vec![1, -2, i64::MAX]);
        let mut w = Writer::floats(0, 1);
        w.raw_f64(2.5);
        let buf = w.finish();
        let r = Reader::new(&buf).unwrap();
        assert_eq!(r.layout(), Layout::Floats);
        assert_eq!(r.array().unwrap(), 2.5f64.to_le_bytes());
        assert!(Reader::new(&buf[..buf.len() - 1]).unwrap().array().is_err());
    }

    #[test]
    fn damaged_input_is_an_error_not_a_panic() {
        let mut w = Writer::new(0, 1);
        w.str("abc").unwrap();
        let buf = w.finish();
        for cut in 0..buf.len() {
            if let Ok(mut r) = Reader::new(&buf[..cut]) {
                assert!(r.next_value().is_err());
            }
        }
        let mut bad = buf.clone();
        bad[16] = 99;
        assert!(Reader::new(&bad).unwrap().next_value().is_err());
        assert!(Reader::new(b"\x80\x05pickle-ish bytes").is_err());
    }
}
