//! Content hashes of large buffers.
//!
//! A call that passes the same large array as an earlier call (an optimiser or a sampler
//! calling `map` at every step) should not copy it into shared memory again. The Python layer
//! keys the segments it keeps across calls by the buffer's length and its 128-bit XXH3 hash,
//! which runs at memory speed: a fraction of the cost of copying the buffer into fresh pages.
//! A 128-bit hash makes serving another buffer's bytes by accident (a collision) negligible,
//! and any change to the data, one element included, changes the hash.

use xxhash_rust::xxh3::xxh3_128;

/// The 128-bit XXH3 hash of `data`.
///
/// # Examples
///
/// ```
/// let a = shoal_core::content::content_hash(b"abc");
/// assert_eq!(a, shoal_core::content::content_hash(b"abc"));
/// assert_ne!(a, shoal_core::content::content_hash(b"abd"));
/// ```
pub fn content_hash(data: &[u8]) -> u128 {
    xxh3_128(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_changed_byte_changes_the_hash() {
        let mut data = vec![7u8; 1 << 20];
        let before = content_hash(&data);
        data[123_457] ^= 1;
        assert_ne!(before, content_hash(&data));
        data[123_457] ^= 1;
        assert_eq!(before, content_hash(&data));
    }

    #[test]
    fn length_is_part_of_the_content() {
        assert_ne!(content_hash(&[0u8; 16]), content_hash(&[0u8; 17]));
    }
}
