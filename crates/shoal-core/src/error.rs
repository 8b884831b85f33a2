//! The one error type of shoal-core.

use std::io;

/// Everything that can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O failure (sockets, process spawning).
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// A frame on the wire that does not follow the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A worker process could not be started.
    #[error("could not start a worker: {0}")]
    Spawn(String),
    /// An id that the engine does not know (a closed session, a released setup).
    #[error("unknown {what} {id}")]
    Unknown {
        /// What kind of id.
        what: &'static str,
        /// The id itself.
        id: u64,
    },
    /// The engine was shut down.
    #[error("the pool has been shut down")]
    Closed,
}

/// Result alias for shoal-core.
pub type Result<T> = std::result::Result<T, Error>;
