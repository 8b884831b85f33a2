//! shoal-core: the pure-Rust engine of shoal, with no Python in it.
//!
//! It runs a pool of worker processes and moves opaque bytes between a driver and those workers.
//! What the bytes mean (pickled functions, chunks of items, results) is the Python layer's
//! business; this crate decides *where and when* they go.
//!
//! - [`protocol`]: the framed wire format.
//! - [`scheduler`]: the sans-I/O state machine (queueing, assignment, in-flight accounting,
//!   ordering of results). Tested without processes.
//! - [`chunking`]: adaptive chunk sizes from measured item times.
//! - [`supervisor`]: processes, sockets and threads that carry out the scheduler's decisions.
//! - [`fdpass`]: file descriptors (shared-memory segments) passed with frames.
//! - [`heap`]: allocator settings for worker processes (freed heap reused chunk after chunk).
//! - [`cpu`]: how many CPUs this process may use.
//! - [`content`]: content hashes of large buffers (to recognise data sent before).
//! - [`blake2b`]: keyed BLAKE2b of many short messages (the identities of a store's items).
//! - [`progress`]: a progress bar redrawn by its own thread.
//! - [`plain`]: a compact encoding for lists of plain values (ints, floats, strings, bytes).
//! - [`pages`]: undoing a worker's own writes to a privately mapped segment, to reuse it.
//! - [`pickle`]: pickles of plain values, written without Python (a store's results).

pub mod blake2b;
pub mod chunking;
pub mod content;
pub mod cpu;
pub mod error;
pub mod fdpass;
pub mod heap;
pub mod pages;
pub mod pickle;
pub mod plain;
pub mod progress;
pub mod protocol;
pub mod scheduler;
pub mod supervisor;

pub use error::{Error, Result};
