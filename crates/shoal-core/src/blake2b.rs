//! Keyed BLAKE2b (RFC 7693) of many short messages: the identities of a store's items.
//!
//! A result store names each item by a 16-byte keyed BLAKE2b hash of its pickled arguments,
//! keyed by a hash of the call's fixed part (the same bytes as Python's
//! `hashlib.blake2b(data, digest_size=16, key=key)`). A run of a million cheap items hashes a
//! million short pickles; done here in one call per chunk, with the key block compressed once
//! for all of them, that costs a fraction of a `hashlib` object per item.

/// The initialisation vector (the SHA-512 one).
const IV: [u64; 8] = [
    0x6a09_e667_f3bc_c908,
    0xbb67_ae85_84ca_a73b,
    0x3c6e_f372_fe94_f82b,
    0xa54f_f53a_5f1d_36f1,
    0x510e_527f_ade6_82d1,
    0x9b05_688c_2b3e_6c1f,
    0x1f83_d9ab_fb41_bd6b,
    0x5be0_cd19_137e_2179,
];

/// The message word schedule of each round (rounds 10 and 11 reuse rows 0 and 1).
const SIGMA: [[usize; 16]; 10] = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
    [11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4],
    [7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8],
    [9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13],
    [2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9],
    [12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11],
    [13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10],
    [6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5],
    [10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0],
];

const BLOCK: usize = 128;

/// Longest key and digest, in bytes.
pub const MAX_LEN: usize = 64;

/// A keyed BLAKE2b with a fixed digest length, ready to hash many messages.
///
/// # Examples
///
/// ```
/// use shoal_core::blake2b::Blake2b;
/// let hasher = Blake2b::new(b"key", 16).unwrap();
/// let mut out = [0u8; 16];
/// hasher.digest(b"abc", &mut out);
/// let mut again = [0u8; 16];
/// hasher.digest(b"abc", &mut again);
/// assert_eq!(out, again);
/// hasher.digest(b"abd", &mut again);
/// assert_ne!(out, again);
/// ```
#[derive(Clone, Debug)]
pub struct Blake2b {
    /// The state before any block: the IV with the parameter block folded in.
    start: [u64; 8],
    /// The state after the key block (equal to `start` without a key).
    keyed: [u64; 8],
    /// The key, zero-padded to a block (the last block of an empty message).
    key_block: [u8; BLOCK],
    key_len: usize,
    digest_len: usize,
}

impl Blake2b {
    /// A hasher with `key` (at most 64 bytes, may be empty) and digests of `digest_len` bytes
    /// (1 to 64); `None` if a length is out of range.
    pub fn new(key: &[u8], digest_len: usize) -> Option<Self> {
        if key.len() > MAX_LEN || digest_len == 0 || digest_len > MAX_LEN {
            return None;
        }
        let mut start = IV;
        start[0] ^= 0x0101_0000 ^ ((key.len() as u64) << 8) ^ digest_len as u64;
        let mut key_block = [0u8; BLOCK];
        key_block[..key.len()].copy_from_slice(key);
        let mut keyed = start;
        if !key.is_empty() {
            compress(&mut keyed, &key_block, BLOCK as u128, false);
        }
        Some(Self {
            start,
            keyed,
            key_block,
            key_len: key.len(),
            digest_len,
        })
    }

    /// Bytes in each digest.
    pub fn digest_len(&self) -> usize {
        self.digest_len
    }

    /// The digest of `data` into `out` (`digest_len` bytes).
    ///
    /// # Panics
    ///
    /// If `out` is not `digest_len` bytes long.
    pub fn digest(&self, data: &[u8], out: &mut [u8]) {
        assert_eq!(
            out.len(),
            self.digest_len,
            "digest buffer of the wrong length"
        );
        let mut h;
        if data.is_empty() {
            h = self.start;
            // The key block alone is the last block (an all-zero one without a key).
            let t = if self.key_len > 0 { BLOCK as u128 } else { 0 };
            compress(&mut h, &self.key_block, t, true);
        } else {
            h = self.keyed;
            let mut t: u128 = if self.key_len > 0 { BLOCK as u128 } else { 0 };
            let mut rest = data;
            while rest.len() > BLOCK {
                let (block, tail) = rest.split_at(BLOCK);
                t += BLOCK as u128;
                compress(&mut h, block.try_into().expect("a full block"), t, false);
                rest = tail;
            }
            let mut last = [0u8; BLOCK];
            last[..rest.len()].copy_from_slice(rest);
            t += rest.len() as u128;
            compress(&mut h, &last, t, true);
        }
        let mut bytes = [0u8; MAX_LEN];
        for (chunk, word) in bytes.chunks_exact_mut(8).zip(h.iter()) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        out.copy_from_slice(&bytes[..self.digest_len]);
    }

    /// The digests of `messages`, one after the other (`digest_len` bytes each).
    pub fn digest_many<'a>(&self, messages: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
        let mut out = Vec::new();
        for message in messages {
            let at = out.len();
            out.resize(at + self.digest_len, 0);
            self.digest(message, &mut out[at..]);
        }
        out
    }
}

#[inline(always)]
fn mix(v: &mut [u64; 16], a: usize, b: usize, c: usize, d: usize, x: u64, y: u64) {
    v[a] = v[a].wrapping_add(v[b]).wrapping_add(x);
    v[d] = (v[d] ^ v[a]).rotate_right(32);
    v[c] = v[c].wrapping_add(v[d]);
    v[b] = (v[b] ^ v[c]).rotate_right(24);
    v[a] = v[a].wrapping_add(v[b]).wrapping_add(y);
    v[d] = (v[d] ^ v[a]).rotate_right(16);
    v[c] = v[c].wrapping_add(v[d]);
    v[b] = (v[b] ^ v[c]).rotate_right(63);
}

/// The compression function F: `block` into the state `h`, `t` bytes hashed so far.
fn compress(h: &mut [u64; 8], block: &[u8; BLOCK], t: u128, last: bool) {
    let mut m = [0u64; 16];
    for (word, bytes) in m.iter_mut().zip(block.chunks_exact(8)) {
        *word = u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
    }
    let mut v = [0u64; 16];
    v[..8].copy_from_slice(h);
    v[8..].copy_from_slice(&IV);
    v[12] ^= t as u64;
    v[13] ^= (t >> 64) as u64;
    if last {
        v[14] = !v[14];
    }
    for round in 0..12 {
        let s = &SIGMA[round % 10];
        mix(&mut v, 0, 4, 8, 12, m[s[0]], m[s[1]]);
        mix(&mut v, 1, 5, 9, 13, m[s[2]], m[s[3]]);
        mix(&mut v, 2, 6, 10, 14, m[s[4]], m[s[5]]);
        mix(&mut v, 3, 7, 11, 15, m[s[6]], m[s[7]]);
        mix(&mut v, 0, 5, 10, 15, m[s[8]], m[s[9]]);
        mix(&mut v, 1, 6, 11, 12, m[s[10]], m[s[11]]);
        mix(&mut v, 2, 7, 8, 13, m[s[12]], m[s[13]]);
        mix(&mut v, 3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for i in 0..8 {
        h[i] ^= v[i] ^ v[i + 8];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn hash(key: &[u8], len: usize, data: &[u8]) -> String {
        let hasher = Blake2b::new(key, len).unwrap();
        let mut out = vec![0u8; len];
        hasher.digest(data, &mut out);
        hex(&out)
    }

    #[test]
    fn rfc_7693_abc() {
        // RFC 7693, appendix A: BLAKE2b-512("abc").
        assert_eq!(
            hash(b"", 64, b"abc"),
            "ba80a53f981c4d0d6a2797b69f12f6e94c212f14685ac4b74b12bb6fdbffa2d1\
             7d87c5392aab792dc252d5de4533cc9518d38aa8dbf1925ab92386edd4009923"
        );
    }

    #[test]
    fn unkeyed_empty_message() {
        // The BLAKE2b-512 of the empty string (the reference implementation's value).
        assert_eq!(
            hash(b"", 64, b""),
            "786a02f742015903c6c6fd852552d272912f4740e15847618a86e217f71f5419\
             d25e1031afee585313896444934eb04b903a685b1448b755d56f701afe9be2ce"
        );
    }

    /// Keyed 16-byte digests as Python's `hashlib.blake2b(data, digest_size=16, key=key)`
    /// computes them, across block boundaries (the key is 32 bytes of 0..31).
    #[test]
    fn keyed_short_digests_match_hashlib() {
        let key: Vec<u8> = (0..32).collect();
        let cases: [(&[u8], &str); 5] = [
            (b"", "3daf97bce7888fd59773c66bf647459c"),
            (b"\x80\x05K\x07.", "fe7f03f04bd37ccc661d3d94cca351a1"),
            (&[7u8; 128], "e8f025fc5c677f37e785dccd0d3804c2"),
            (&[7u8; 129], "42939f4ea690578058ff97d3c731e3f1"),
            (&[1u8; 300], "43bbc2fd6702939fc6903f554457e1b9"),
        ];
        for (data, expected) in cases {
            assert_eq!(hash(&key, 16, data), expected, "{} bytes", data.len());
        }
    }

    #[test]
    fn many_is_one_by_one() {
        let hasher = Blake2b::new(b"k", 16).unwrap();
        let messages: [&[u8]; 3] = [b"a", b"", &[9u8; 200]];
        let all = hasher.digest_many(messages);
        assert_eq!(all.len(), 48);
        for (i, m) in messages.iter().enumerate() {
            let mut one = [0u8; 16];
            hasher.digest(m, &mut one);
            assert_eq!(&all[16 * i..16 * (i + 1)], &one);
        }
    }

    #[test]
    fn lengths_out_of_range_are_refused() {
        assert!(Blake2b::new(&[0u8; 65], 16).is_none());
        assert!(Blake2b::new(b"", 0).is_none());
        assert!(Blake2b::new(b"", 65).is_none());
        assert_eq!(Blake2b::new(&[0u8; 64], 64).unwrap().digest_len(), 64);
    }
}
