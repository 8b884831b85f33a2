//! Content hashes of large buffers.
//!
//! A call that passes the same large array as an earlier call (an optimiser or a sampler
//! calling `map` at every step) should not copy it into shared memory again. The Python layer
//! keys the segments it keeps across calls by the buffer's length and its 128-bit XXH3 hash,
//! which runs at memory speed: a fraction of the cost of copying the buffer into fresh pages.
//! A 128-bit hash makes serving another buffer's bytes by accident (a collision) negligible,
//! and any change to the data, one element included, changes the hash.

use xxhash_rust::xxh3::xxh3_128;

/// Bytes per part of a large buffer: parts are hashed on separate threads. Fixed, so that a
/// buffer's hash never depends on how many threads computed it.
pub const PART: usize = 16 << 20;

/// Most threads one hash uses. Hashing is bound by memory bandwidth, which a few cores
/// saturate; more threads would only take cores from other work.
pub const MAX_THREADS: usize = 8;

/// The 128-bit content hash of `data`: XXH3 of the bytes for a buffer of at most [`PART`]
/// bytes; for a larger one, XXH3 over the length and the XXH3 hashes of its [`PART`]-sized
/// parts, computed on up to `min(cores, MAX_THREADS)` threads.
///
/// A single thread reads about 30 GB/s at best, so a 200 MB array costs some 7 ms per call
/// hashed on one; on a node whose workers each take a slice of the call, that would be much
/// of the call. The parts make the work parallel without changing what the hash depends on.
///
/// # Examples
///
/// ```
/// let a = shoal_core::content::content_hash(b"abc");
/// assert_eq!(a, shoal_core::content::content_hash(b"abc"));
/// assert_ne!(a, shoal_core::content::content_hash(b"abd"));
/// ```
pub fn content_hash(data: &[u8]) -> u128 {
    if data.len() <= PART {
        return xxh3_128(data); // the common case: no CPU count to read
    }
    content_hash_on(data, crate::cpu::available_cpus().clamp(1, MAX_THREADS))
}

/// [`content_hash`] on at most `threads` threads (the result does not depend on `threads`).
pub fn content_hash_on(data: &[u8], threads: usize) -> u128 {
    if data.len() <= PART {
        return xxh3_128(data);
    }
    let parts: Vec<&[u8]> = data.chunks(PART).collect();
    let mut digests = vec![0u128; parts.len()];
    let threads = threads.clamp(1, parts.len());
    if threads == 1 {
        for (digest, part) in digests.iter_mut().zip(&parts) {
            *digest = xxh3_128(part);
        }
    } else {
        // Thread i takes parts i, i + threads, ...: equal shares (within one part).
        std::thread::scope(|scope| {
            let mut shares: Vec<Vec<(&mut u128, &[u8])>> =
                (0..threads).map(|_| Vec::new()).collect();
            for (i, (digest, part)) in digests.iter_mut().zip(&parts).enumerate() {
                shares[i % threads].push((digest, part));
            }
            for share in shares {
                scope.spawn(move || {
                    for (digest, part) in share {
                        *digest = xxh3_128(part);
                    }
                });
            }
        });
    }
    let mut summary = Vec::with_capacity(8 + 16 * digests.len());
    summary.extend_from_slice(&(data.len() as u64).to_le_bytes());
    for digest in &digests {
        summary.extend_from_slice(&digest.to_le_bytes());
    }
    xxh3_128(&summary)
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
        let big = vec![0u8; 2 * PART + 1];
        assert_ne!(content_hash(&big), content_hash(&big[..2 * PART]));
    }

    #[test]
    fn a_large_buffer_hashes_the_same_on_any_number_of_threads() {
        let data: Vec<u8> = (0..3 * PART + 12_345)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let one = content_hash_on(&data, 1);
        for threads in [2, 3, 4, 8] {
            assert_eq!(one, content_hash_on(&data, threads));
        }
        assert_eq!(one, content_hash(&data));
    }

    #[test]
    fn one_changed_byte_in_any_part_changes_a_large_hash() {
        let mut data = vec![5u8; 3 * PART + 7];
        let before = content_hash_on(&data, 4);
        for at in [0, PART - 1, PART, 2 * PART + 3, data.len() - 1] {
            data[at] ^= 0x40;
            assert_ne!(before, content_hash_on(&data, 4), "byte {at}");
            data[at] ^= 0x40;
        }
        assert_eq!(before, content_hash_on(&data, 4));
    }
}
