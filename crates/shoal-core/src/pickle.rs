//! Pickles of plain values, written without Python's pickler.
//!
//! A result store keeps each item's value as a pickle, which any Python reads back with
//! `pickle.loads`. A run of a million cheap items stores a million small values (ints, floats,
//! short strings); writing their pickles here, in one call per chunk, costs a fraction of a
//! `pickle.dumps` call each. The bytes are a valid protocol-5 pickle (`pickle.loads` gives the
//! value back), not necessarily the same bytes as `pickle.dumps` (no frame, no memo).

use crate::plain::Value;

const PROTO: u8 = 0x80;
const STOP: u8 = b'.';
const NONE: u8 = b'N';
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const BININT: u8 = b'J';
const LONG1: u8 = 0x8a;
const BINFLOAT: u8 = b'G';
const SHORT_BINUNICODE: u8 = 0x8c;
const BINUNICODE: u8 = b'X';
const SHORT_BINBYTES: u8 = b'C';
const BINBYTES: u8 = b'B';

/// Appends the protocol-5 pickle of `value` to `out`; `false` (and nothing appended) if a
/// string or bytes value is 4 GiB or longer (a pickle needs 8-byte lengths for those).
///
/// # Examples
///
/// ```
/// use shoal_core::{pickle::write, plain::Value};
/// let mut out = Vec::new();
/// assert!(write(Value::Int(7), &mut out));
/// assert_eq!(out, b"\x80\x05K\x07.");
/// ```
pub fn write(value: Value<'_>, out: &mut Vec<u8>) -> bool {
    let long = |n: usize| u32::try_from(n).is_err();
    match value {
        Value::Str(s) if long(s.len()) => return false,
        Value::Bytes(b) if long(b.len()) => return false,
        _ => {}
    }
    out.extend_from_slice(&[PROTO, 5]);
    match value {
        Value::None => out.push(NONE),
        Value::Bool(true) => out.push(NEWTRUE),
        Value::Bool(false) => out.push(NEWFALSE),
        Value::Int(v) => {
            if (0..256).contains(&v) {
                out.extend_from_slice(&[BININT1, v as u8]);
            } else if (0..65536).contains(&v) {
                out.push(BININT2);
                out.extend_from_slice(&(v as u16).to_le_bytes());
            } else if let Ok(small) = i32::try_from(v) {
                out.push(BININT);
                out.extend_from_slice(&small.to_le_bytes());
            } else {
                // Two's complement, little-endian; pickle reads any length.
                out.extend_from_slice(&[LONG1, 8]);
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        Value::Float(v) => {
            out.push(BINFLOAT);
            out.extend_from_slice(&v.to_be_bytes());
        }
        Value::Str(s) => sized(out, SHORT_BINUNICODE, BINUNICODE, s.as_bytes()),
        Value::Bytes(b) => sized(out, SHORT_BINBYTES, BINBYTES, b),
    }
    out.push(STOP);
    true
}

/// A length-prefixed payload: the `short` opcode with a 1-byte length under 256 bytes, else
/// the `long` one with a 4-byte length (`write` refused 4 GiB and more).
fn sized(out: &mut Vec<u8>, short: u8, long: u8, data: &[u8]) {
    if data.len() < 256 {
        out.extend_from_slice(&[short, data.len() as u8]);
    } else {
        out.push(long);
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pickled(value: Value<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        assert!(write(value, &mut out));
        out
    }

    /// Values whose `pickle.dumps(value, 5)` has no frame are written byte for byte the same.
    #[test]
    fn short_values_match_pythons_pickler() {
        assert_eq!(pickled(Value::None), b"\x80\x05N.");
        assert_eq!(pickled(Value::Bool(true)), b"\x80\x05\x88.");
        assert_eq!(pickled(Value::Bool(false)), b"\x80\x05\x89.");
        assert_eq!(pickled(Value::Int(0)), b"\x80\x05K\x00.");
        assert_eq!(pickled(Value::Int(255)), b"\x80\x05K\xff.");
    }

    #[test]
    fn each_int_width() {
        assert_eq!(pickled(Value::Int(256)), b"\x80\x05M\x00\x01.");
        assert_eq!(pickled(Value::Int(65536)), b"\x80\x05J\x00\x00\x01\x00.");
        assert_eq!(pickled(Value::Int(-1)), b"\x80\x05J\xff\xff\xff\xff.");
        let mut big = b"\x80\x05\x8a\x08".to_vec();
        big.extend_from_slice(&i64::MIN.to_le_bytes());
        big.push(b'.');
        assert_eq!(pickled(Value::Int(i64::MIN)), big);
    }

    #[test]
    fn floats_strings_and_bytes() {
        let mut f = b"\x80\x05G".to_vec();
        f.extend_from_slice(&1.5f64.to_be_bytes());
        f.push(b'.');
        assert_eq!(pickled(Value::Float(1.5)), f);
        assert_eq!(pickled(Value::Str("hé")), b"\x80\x05\x8c\x03h\xc3\xa9.");
        assert_eq!(pickled(Value::Bytes(b"ab")), b"\x80\x05C\x02ab.");
        let long = "x".repeat(300);
        let out = pickled(Value::Str(&long));
        assert_eq!(&out[..7], b"\x80\x05X\x2c\x01\x00\x00");
        assert_eq!(out.len(), 2 + 5 + 300 + 1);
        let out = pickled(Value::Bytes(long.as_bytes()));
        assert_eq!(&out[..7], b"\x80\x05B\x2c\x01\x00\x00");
    }
}
