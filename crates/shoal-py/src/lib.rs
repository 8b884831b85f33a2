//! PyO3 bindings of shoal-core, imported as `shoal._native`.
//!
//! This crate only converts values and errors at the boundary. Two rules hold everywhere:
//! only bytes cross into Rust (pickling stays in Python), and every call that can block releases
//! the GIL, waiting in short slices so that Ctrl-C is heard between them.

use std::io::{BufReader, BufWriter, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBool, PyByteArray, PyBytes, PyFloat, PyInt, PyList, PyString, PyTuple};

use shoal_core::blake2b::Blake2b;
use shoal_core::chunking::{ChunkPolicy, ItemTimer};
use shoal_core::fdpass;
use shoal_core::pickle;
use shoal_core::plain;
use shoal_core::progress::Progress;
use shoal_core::protocol::{self, Kind};
use shoal_core::scheduler::{SessionOptions, Status};
use shoal_core::supervisor::{Engine as CoreEngine, EngineConfig};

create_exception!(
    _native,
    EngineError,
    PyRuntimeError,
    "An error inside the native engine (closed pool, unknown session, I/O failure)."
);

fn to_py(err: shoal_core::Error) -> PyErr {
    EngineError::new_err(err.to_string())
}

/// Set at interpreter exit (see [`at_exit`]).
static EXITING: AtomicBool = AtomicBool::new(false);
/// The thread that ran the exit hooks: the main thread, which is never unwound.
static EXIT_THREAD: OnceLock<ThreadId> = OnceLock::new();

/// Called when the interpreter starts to exit. From then on, a thread other than the main one
/// that comes out of a blocking wait parks forever instead of taking the GIL back: at
/// finalization CPython 3.11 unwinds such threads with `pthread_exit`, and that forced unwind
/// through Rust frames aborts the whole process. Parking is harmless: the process is ending.
#[pyfunction]
fn at_exit() {
    let _ = EXIT_THREAD.set(std::thread::current().id());
    EXITING.store(true, Ordering::SeqCst);
}

fn park_if_exiting() {
    if EXITING.load(Ordering::SeqCst) && EXIT_THREAD.get() != Some(&std::thread::current().id()) {
        loop {
            std::thread::park();
        }
    }
}

/// Longest time a blocking call stays in Rust before checking for signals (Ctrl-C).
const SIGNAL_SLICE: Duration = Duration::from_millis(50);

/// Outcome kinds returned by `Engine.wait`.
const DONE: u8 = 0;
const WORKER_LOST: u8 = 1;
const START_FAILED: u8 = 2;
const TIMED_OUT: u8 = 3;
const MEMORY_EXCEEDED: u8 = 4;
const PARTIAL: u8 = 5;

/// A pool of worker processes (the processes backend's engine).
#[pyclass(frozen, module = "shoal._native")]
struct Engine {
    inner: CoreEngine,
}

type WaitItem<'py> = (
    u64,
    u8,
    Bound<'py, PyBytes>,
    u64,
    Option<u32>,
    String,
    Vec<Segment>,
);
/// `(kind, id, aux, payload)` of a frame received by a worker.
type Received<'py> = (u8, u64, u64, Bound<'py, PyBytes>);

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (program, args, env, workers, idle_timeout=None, target_chunk_s=0.004, max_chunk=50_000, machine_interval=0.5, queue_any=false))]
    // A Python constructor: these are its keyword arguments.
    #[allow(clippy::too_many_arguments)]
    fn new(
        program: PathBuf,
        args: Vec<String>,
        env: Vec<(String, String)>,
        workers: usize,
        idle_timeout: Option<f64>,
        target_chunk_s: f64,
        max_chunk: usize,
        machine_interval: f64,
        queue_any: bool,
    ) -> PyResult<Self> {
        let policy = ChunkPolicy {
            target_ns: (target_chunk_s * 1e9) as u64,
            max_items: max_chunk,
            ..ChunkPolicy::default()
        };
        let config = EngineConfig {
            program,
            args,
            env,
            workers,
            idle_timeout: idle_timeout.map(Duration::from_secs_f64),
            policy,
            machine_interval: Duration::from_secs_f64(machine_interval.max(0.02)),
            queue_any,
        };
        Ok(Engine {
            inner: CoreEngine::start(config).map_err(to_py)?,
        })
    }

    #[getter]
    fn workers(&self) -> usize {
        self.inner.workers()
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    fn prestart(&self, count: usize) -> PyResult<()> {
        self.inner.prestart(count).map_err(to_py)
    }

    #[pyo3(signature = (ordered, timeout=None, max_tasks_per_worker=None, max_worker_memory=None, max_load=None, max_memory=None))]
    // A Python method: these are its keyword arguments.
    #[allow(clippy::too_many_arguments)]
    fn open_session(
        &self,
        ordered: bool,
        timeout: Option<f64>,
        max_tasks_per_worker: Option<u64>,
        max_worker_memory: Option<u64>,
        max_load: Option<f64>,
        max_memory: Option<u64>,
    ) -> PyResult<u64> {
        let options = SessionOptions {
            ordered,
            timeout_ns: timeout.map(|t| (t.max(0.0) * 1e9) as u64),
            max_items_per_worker: max_tasks_per_worker,
            max_rss_bytes: max_worker_memory,
            max_load,
            max_used_memory: max_memory,
        };
        self.inner.open_session_with(options).map_err(to_py)
    }

    fn add_setup(&self, session: u64, blob: &[u8]) -> PyResult<u64> {
        self.inner.add_setup(session, blob.to_vec()).map_err(to_py)
    }

    /// Starts a setup's cost estimate from an earlier call of the same function.
    fn hint_setup(&self, setup: u64, per_item_ns: f64) {
        self.inner.hint_setup(setup, per_item_ns)
    }

    /// Nanoseconds per item that the setup's chunks measured, or None.
    fn item_ns(&self, setup: u64) -> Option<f64> {
        self.inner.item_ns(setup)
    }

    fn remove_setup(&self, setup: u64) -> PyResult<()> {
        self.inner.remove_setup(setup).map_err(to_py)
    }

    #[pyo3(signature = (setup, weight, payload, exclusive=false))]
    fn submit(&self, setup: u64, weight: u64, payload: &[u8], exclusive: bool) -> PyResult<u64> {
        self.inner
            .submit_with(setup, weight, payload.to_vec(), exclusive)
            .map_err(to_py)
    }

    #[pyo3(signature = (setup, remaining=None))]
    fn chunk_size(&self, setup: u64, remaining: Option<u64>) -> usize {
        self.inner.chunk_size(setup, remaining)
    }

    #[pyo3(signature = (session, seqs=None))]
    fn cancel(&self, session: u64, seqs: Option<Vec<u64>>) -> PyResult<Vec<u64>> {
        self.inner.cancel(session, seqs.as_deref()).map_err(to_py)
    }

    #[pyo3(signature = (session, abort=false))]
    fn close_session(&self, session: u64, abort: bool) {
        self.inner.close_session(session, abort)
    }

    fn wake(&self, session: u64) {
        self.inner.wake(session)
    }

    /// Waits for outcomes of a session; `None` waits until there is one (or a wake).
    ///
    /// Returns a list of `(seq, kind, payload, elapsed_ns, pid, message, segments)`, where
    /// `segments` are the shared-memory segments the worker passed with its result.
    #[pyo3(signature = (session, timeout=None))]
    fn wait<'py>(
        &self,
        py: Python<'py>,
        session: u64,
        timeout: Option<f64>,
    ) -> PyResult<Vec<WaitItem<'py>>> {
        let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
        loop {
            let slice = match deadline {
                Some(d) => d
                    .saturating_duration_since(Instant::now())
                    .min(SIGNAL_SLICE),
                None => SIGNAL_SLICE,
            };
            let (outcomes, woken) = py
                .detach(|| {
                    let waited = self.inner.wait(session, slice);
                    park_if_exiting();
                    waited
                })
                .map_err(to_py)?;
            if !outcomes.is_empty() {
                return Ok(outcomes
                    .into_iter()
                    .map(|o| {
                        let (kind, pid, msg) = match o.status {
                            Status::Done => (DONE, None, String::new()),
                            Status::WorkerLost { pid, exit } => (WORKER_LOST, pid, exit),
                            Status::StartFailed(msg) => (START_FAILED, None, msg),
                            Status::TimedOut { pid, limit_ns } => {
                                (TIMED_OUT, pid, limit_ns.to_string())
                            }
                            Status::MemoryExceeded { pid, rss, limit } => {
                                (MEMORY_EXCEEDED, pid, format!("{rss} {limit}"))
                            }
                            Status::Partial { items } => (PARTIAL, None, items.to_string()),
                        };
                        (
                            o.seq,
                            kind,
                            PyBytes::new(py, &o.payload),
                            o.elapsed_ns,
                            pid,
                            msg,
                            o.fds.into_iter().map(Segment::adopt).collect(),
                        )
                    })
                    .collect());
            }
            py.check_signals()?;
            if woken || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(Vec::new());
            }
        }
    }

    fn pids(&self) -> Vec<u32> {
        self.inner.pids()
    }

    #[pyo3(signature = (kill=false))]
    fn shutdown(&self, py: Python<'_>, kill: bool) {
        py.detach(|| {
            self.inner.shutdown(kill);
            park_if_exiting();
        })
    }
}

/// The worker's end of its channel to the driver.
///
/// Results are buffered and flushed only when the worker is about to block waiting for work,
/// so a burst of small tasks is answered with few system calls.
#[pyclass(module = "shoal._native")]
struct WorkerChannel {
    reader: BufReader<UnixStream>,
    writer: BufWriter<UnixStream>,
}

#[pymethods]
impl WorkerChannel {
    #[new]
    fn new(fd: i32) -> PyResult<Self> {
        // SAFETY: the driver passed this descriptor to us for our exclusive use; we take
        // ownership of it here and nothing else in the worker uses it.
        let stream = unsafe { UnixStream::from_raw_fd(fd) };
        let write_half = stream.try_clone()?;
        // Only a worker makes a channel: its chunks reuse freed heap instead of new pages.
        shoal_core::heap::tune_for_worker();
        Ok(WorkerChannel {
            reader: BufReader::with_capacity(1 << 16, stream),
            writer: BufWriter::with_capacity(1 << 16, write_half),
        })
    }

    fn hello(&mut self, py: Python<'_>, pid: u32) -> PyResult<()> {
        let header = protocol::encode_header(Kind::Hello, pid as u64, 0, 0, &[]);
        let writer = &mut self.writer;
        py.detach(|| writer.write_all(&header).and_then(|_| writer.flush()))?;
        Ok(())
    }

    /// Blocks for the next frame: `(kind, id, aux, payload)`, or `None` at end of stream.
    fn recv<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Received<'py>>> {
        let (reader, writer) = (&mut self.reader, &mut self.writer);
        let frame = py.detach(|| -> shoal_core::Result<_> {
            if !protocol::holds_complete_frame(reader.buffer()) {
                writer.flush()?;
            }
            protocol::read_frame(reader)
        });
        match frame {
            Ok(Some(f)) => Ok(Some((
                f.kind as u8,
                f.id,
                f.aux,
                PyBytes::new(py, &f.payload),
            ))),
            Ok(None) => Ok(None),
            Err(e) => Err(to_py(e)),
        }
    }

    /// Queues a result frame (sent at the next `recv` or `flush`).
    ///
    /// With `fds` (the descriptors of shared-memory segments holding the result's large
    /// buffers), the frame is sent at once, the descriptors passed with it; the caller may
    /// close its segments as soon as this returns.
    #[pyo3(signature = (task, elapsed_ns, payload, fds=Vec::new()))]
    fn send_result(
        &mut self,
        py: Python<'_>,
        task: u64,
        elapsed_ns: u64,
        payload: PyBackedBytes,
        fds: Vec<i32>,
    ) -> PyResult<()> {
        self.send(py, Kind::Result, task, elapsed_ns, payload, fds)
    }

    /// Sends, at once, the outcome of the next `items` items of a task that goes on (a long
    /// chunk reports as it runs, so that what finished survives a crash of the worker).
    #[pyo3(signature = (task, items, payload, fds=Vec::new()))]
    fn send_partial(
        &mut self,
        py: Python<'_>,
        task: u64,
        items: u64,
        payload: PyBackedBytes,
        fds: Vec<i32>,
    ) -> PyResult<()> {
        self.send(py, Kind::Partial, task, items, payload, fds)?;
        self.flush(py)
    }

    fn flush(&mut self, py: Python<'_>) -> PyResult<()> {
        let writer = &mut self.writer;
        py.detach(|| writer.flush())?;
        Ok(())
    }
}

impl WorkerChannel {
    fn send(
        &mut self,
        py: Python<'_>,
        kind: Kind,
        task: u64,
        aux: u64,
        payload: PyBackedBytes,
        fds: Vec<i32>,
    ) -> PyResult<()> {
        if fds.len() > protocol::MAX_FDS as usize {
            return Err(PyValueError::new_err(format!(
                "{} segments for one result (at most {})",
                fds.len(),
                protocol::MAX_FDS
            )));
        }
        let header =
            protocol::encode_header_with_fds(kind, task, aux, payload.len(), &[], fds.len() as u16);
        let writer = &mut self.writer;
        py.detach(|| {
            if fds.is_empty() {
                return writer
                    .write_all(&header)
                    .and_then(|_| writer.write_all(&payload));
            }
            // Earlier frames first, so the stream stays in order.
            writer.flush()?;
            fdpass::send_with_fds(writer.get_ref(), &[&header, &payload], &fds)
        })?;
        Ok(())
    }
}

/// The adaptive chunk-size policy, for backends that do not run on the native engine.
#[pyclass(module = "shoal._native")]
struct ChunkSizer {
    policy: ChunkPolicy,
    timer: ItemTimer,
    workers: usize,
}

#[pymethods]
impl ChunkSizer {
    #[new]
    #[pyo3(signature = (workers, target_chunk_s=0.004, max_chunk=50_000))]
    fn new(workers: usize, target_chunk_s: f64, max_chunk: usize) -> Self {
        ChunkSizer {
            policy: ChunkPolicy {
                target_ns: (target_chunk_s * 1e9) as u64,
                max_items: max_chunk,
                ..ChunkPolicy::default()
            },
            timer: ItemTimer::default(),
            workers,
        }
    }

    fn record(&mut self, items: u64, elapsed_ns: u64) {
        self.timer.record(items, elapsed_ns)
    }

    #[pyo3(signature = (remaining=None))]
    fn size(&self, remaining: Option<u64>) -> usize {
        self.policy
            .chunk_size(self.timer.per_item_ns(), remaining, self.workers)
    }
}

/// A progress bar on stderr, redrawn by a Rust thread (the driver only sets two counters).
#[pyclass(module = "shoal._native")]
struct ProgressBar {
    inner: Progress,
}

#[pymethods]
impl ProgressBar {
    #[new]
    #[pyo3(signature = (total=None, label=None, interval=0.1))]
    fn new(total: Option<u64>, label: Option<String>, interval: f64) -> PyResult<Self> {
        let inner = Progress::start(
            label.unwrap_or_default(),
            total,
            Duration::from_secs_f64(interval.max(0.01)),
            Box::new(std::io::stderr()),
        )?;
        Ok(ProgressBar { inner })
    }

    fn update(&self, done: u64, failed: u64) {
        self.inner.update(done, failed)
    }

    fn close(&mut self, py: Python<'_>) {
        let inner = &mut self.inner;
        py.detach(|| inner.finish())
    }
}

/// Number of CPUs this process may use (affinity, cgroup quota, Slurm allocation).
#[pyfunction]
fn cpu_count() -> usize {
    shoal_core::cpu::available_cpus()
}

/// An anonymous shared-memory segment (a memfd) holding a copy of one buffer.
///
/// Workers map it through `/proc/<driver pid>/fd/<fd>`, so no file ever appears in
/// `/dev/shm`, and the kernel frees the memory once the driver has closed it and no worker maps
/// it any more, whatever happened to the processes.
#[pyclass(module = "shoal._native")]
struct Segment {
    fd: Option<OwnedFd>,
    size: usize,
}

#[pymethods]
impl Segment {
    /// Copies `data` (any contiguous buffer) into a new segment, with the GIL released.
    #[new]
    fn new(py: Python<'_>, data: PyBuffer<u8>) -> PyResult<Self> {
        if !data.is_c_contiguous() {
            return Err(PyValueError::new_err(
                "a shared-memory segment needs a contiguous buffer",
            ));
        }
        let size = data.len_bytes();
        let ptr = data.buf_ptr() as usize;
        let fd = py.detach(move || -> std::io::Result<OwnedFd> {
            // SAFETY: `data` (a buffer export) keeps the memory alive and unmoved until it is
            // dropped after this call; we only read `size` bytes from its start.
            let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, size) };
            memfd_with(bytes)
        })?;
        drop(data);
        Ok(Segment { fd: Some(fd), size })
    }

    /// A new segment of `size` zero bytes (pages are only allocated when first written).
    #[staticmethod]
    fn zeroed(size: usize) -> PyResult<Self> {
        let fd = memfd_with(&[])?;
        let file = std::fs::File::from(fd);
        file.set_len(size as u64)?;
        Ok(Segment {
            fd: Some(file.into()),
            size,
        })
    }

    /// The segment's file descriptor in this process (-1 once closed).
    #[getter]
    fn fd(&self) -> i32 {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    #[getter]
    fn size(&self) -> usize {
        self.size
    }

    /// Closes this process's handle; workers that mapped the segment keep their mappings.
    fn close(&mut self) {
        self.fd = None;
    }
}

/// A mapping of a shared-memory segment, exported as a buffer.
///
/// Python's `mmap.mmap` keeps a duplicate of the file descriptor for as long as the mapping
/// lives, so every array received through shared memory would hold a descriptor, and a few
/// thousand results would exhaust the process's limit. This mapping holds none: it is unmapped
/// when the last buffer export (numpy array, memoryview) built on it is gone.
///
/// A private mapping (the default) is copy-on-write: writes stay in this process and never
/// reach the segment. A shared one (`shared=True`) writes through to the segment.
#[pyclass(module = "shoal._native", frozen, weakref)]
struct Mapping {
    addr: usize,
    len: usize,
}

#[pymethods]
impl Mapping {
    /// Maps `size` bytes of the file `fd` (which the caller keeps and may close at once).
    #[new]
    #[pyo3(signature = (fd, size, shared=false))]
    fn new(fd: i32, size: usize, shared: bool) -> PyResult<Self> {
        if size == 0 {
            return Err(PyValueError::new_err("cannot map an empty segment"));
        }
        let flags = if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        // SAFETY: mmap of a caller-provided descriptor; failure is reported as MAP_FAILED.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(Mapping {
            addr: addr as usize,
            len: size,
        })
    }

    /// Address of the first mapped byte.
    #[getter]
    fn address(&self) -> usize {
        self.addr
    }

    fn __len__(&self) -> usize {
        self.len
    }

    /// Drops the pages this process wrote into a private mapping since it was made, so that
    /// they read as the segment again (see `shoal_core::pages`); returns how many it dropped.
    /// The caller makes sure no buffer export of this mapping is alive (the pages of one
    /// would change under it), which `sys.getrefcount` tells: each export holds a reference.
    fn revert_written(&self, py: Python<'_>) -> PyResult<usize> {
        let (addr, len) = (self.addr, self.len);
        // SAFETY: a private mapping made in `new` (the Python layer only calls this on those),
        // which nobody uses during the call, as required above.
        py.detach(|| unsafe { shoal_core::pages::revert_written(addr, len) })
            .map_err(Into::into)
    }

    /// # Safety
    /// Called by CPython with a valid `view` to fill.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: std::os::raw::c_int,
    ) -> PyResult<()> {
        let (addr, len) = (slf.get().addr, slf.get().len);
        // SAFETY: the region stays mapped while `slf` lives, and the filled view holds a
        // reference to `slf` (PyBuffer_FillInfo increments it).
        let rc = unsafe {
            pyo3::ffi::PyBuffer_FillInfo(view, slf.as_ptr(), addr as *mut _, len as isize, 0, flags)
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(PyErr::fetch(slf.py()))
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: this exact region was mapped in `new` and nothing references it any more:
        // every buffer export held a reference to this object.
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len);
        }
    }
}

impl Segment {
    /// Wraps a segment received from a worker; its size is the file's.
    fn adopt(fd: OwnedFd) -> Segment {
        let file = std::fs::File::from(fd);
        let size = file.metadata().map_or(0, |m| m.len() as usize);
        Segment {
            fd: Some(file.into()),
            size,
        }
    }
}

fn memfd_with(bytes: &[u8]) -> std::io::Result<OwnedFd> {
    let name = c"shoal";
    // SAFETY: plain syscall with a valid NUL-terminated name.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut file = std::fs::File::from(fd);
    file.set_len(bytes.len() as u64)?;
    // Write (not mmap-and-copy): a full memory cgroup or tmpfs limit is then an error here,
    // which the caller turns into a fallback, instead of a SIGBUS later.
    file.write_all(bytes)?;
    Ok(OwnedFd::from(file))
}

/// Address and length of a contiguous buffer's memory (to find which segment, if any, holds it).
#[pyfunction]
fn buffer_span(data: PyBuffer<u8>) -> PyResult<(usize, usize)> {
    if !data.is_c_contiguous() {
        return Err(PyValueError::new_err("the buffer is not contiguous"));
    }
    Ok((data.buf_ptr() as usize, data.len_bytes()))
}

/// The 128-bit content hash of a contiguous buffer (XXH3), computed with the GIL released.
#[pyfunction]
fn content_hash(py: Python<'_>, data: PyBuffer<u8>) -> PyResult<u128> {
    if !data.is_c_contiguous() {
        return Err(PyValueError::new_err("the buffer is not contiguous"));
    }
    let (ptr, size) = (data.buf_ptr() as usize, data.len_bytes());
    let digest = py.detach(move || {
        // SAFETY: `data` (a buffer export) keeps the memory alive and unmoved until it is
        // dropped after this call; we only read `size` bytes from its start.
        let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, size) };
        shoal_core::content::content_hash(bytes)
    });
    drop(data);
    Ok(digest)
}

/// The keyed BLAKE2b digests of `digest_size` bytes of each bytes object in `messages`, the same
/// as `hashlib.blake2b(m, digest_size=digest_size, key=key).digest()` each, hashed in one call
/// with the GIL released (a store hashes every item's pickled arguments).
#[pyfunction]
fn blake2b_many<'py>(
    py: Python<'py>,
    key: &[u8],
    digest_size: usize,
    messages: &Bound<'py, PyList>,
) -> PyResult<Bound<'py, PyList>> {
    let hasher = Blake2b::new(key, digest_size).ok_or_else(|| {
        PyValueError::new_err("blake2b_many: the key is at most 64 bytes, digest_size 1 to 64")
    })?;
    let mut data = Vec::new();
    let mut ends = Vec::with_capacity(messages.len());
    for message in messages.iter() {
        data.extend_from_slice(message.cast::<PyBytes>()?.as_bytes());
        ends.push(data.len());
    }
    let digests = py.detach(|| {
        let mut at = 0;
        hasher.digest_many(ends.iter().map(|&end| {
            let message = &data[at..end];
            at = end;
            message
        }))
    });
    PyList::new(
        py,
        digests
            .chunks_exact(digest_size)
            .map(|d| PyBytes::new(py, d)),
    )
}

/// Appends the protocol-5 pickle of `v` to `out` if it is a plain value (an exact int of 64
/// bits, float, string, bytes, boolean, or `None`); `false`, with nothing appended, otherwise.
fn pickle_into(v: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> PyResult<bool> {
    // Exact types only: a subclass must come back as itself, which only pickle can do.
    let value = if v.is_exact_instance_of::<PyInt>() {
        match v.extract::<i64>() {
            Ok(i) => plain::Value::Int(i),
            Err(_) => return Ok(false),
        }
    } else if v.is_exact_instance_of::<PyFloat>() {
        plain::Value::Float(v.extract::<f64>()?)
    } else if v.is_none() {
        plain::Value::None
    } else if v.is_exact_instance_of::<PyBool>() {
        plain::Value::Bool(v.is_truthy()?)
    } else if let Ok(s) = v.cast_exact::<PyString>() {
        return Ok(match s.to_str() {
            Ok(text) => pickle::write(plain::Value::Str(text), out),
            Err(_) => false, // lone surrogates: not UTF-8
        });
    } else if let Ok(b) = v.cast_exact::<PyBytes>() {
        return Ok(pickle::write(plain::Value::Bytes(b.as_bytes()), out));
    } else {
        return Ok(false);
    };
    Ok(pickle::write(value, out))
}

/// The pickle of each value of `values` (an iterable of plain values: exact ints of 64 bits,
/// floats, strings, bytes, booleans, `None`) as a bytearray, or `None` if some value is not a
/// plain one: the caller then pickles them itself. A store keeps each result as a pickle; a
/// bytearray binds to SQLite without the adapter look-up that bytes go through.
#[pyfunction]
fn pickle_plain<'py>(
    py: Python<'py>,
    values: &Bound<'py, PyAny>,
) -> PyResult<Option<Bound<'py, PyList>>> {
    let mut out = Vec::new();
    let mut buf = Vec::with_capacity(64);
    for v in values.try_iter()? {
        buf.clear();
        if !pickle_into(&v?, &mut buf)? {
            return Ok(None);
        }
        out.push(PyByteArray::new(py, &buf));
    }
    Ok(Some(PyList::new(py, out)?))
}

/// The parameters of a store's rows for done items, in one flat list, ten per row: `id` (from
/// `first_id` on), `key` (the identity, as a bytearray), `idx` (from the iterable `idx`),
/// `started`, `finished`, `pid`, `host`, `attempts`, `value` (the pickle of the result, as a
/// bytearray) and `nbuf` (0). Each of `values` is an item's `(result, pid, host, started,
/// finished)` (see `shoal._itemcall.ItemCall`); once every row is built, `values[i]` becomes
/// the result alone. `None`, with `values` untouched, if some entry is not such a tuple or
/// some result not a plain value (see [`pickle_plain`]): the caller then does it item by item.
///
/// One call per batch of results does what costs a store's driver most per item: no tuple per
/// row, no Python-level loop, and the GIL is held only for the object handling.
#[pyfunction]
fn store_rows<'py>(
    py: Python<'py>,
    first_id: i64,
    idents: &Bound<'py, PyList>,
    idx: &Bound<'py, PyAny>,
    values: &Bound<'py, PyList>,
    attempts: &Bound<'py, PyAny>,
) -> PyResult<Option<Bound<'py, PyList>>> {
    let n = values.len();
    if idents.len() != n {
        return Err(PyValueError::new_err(
            "store_rows: idents and values differ in length",
        ));
    }
    let mut data = Vec::with_capacity(16 * n);
    let mut ends = Vec::with_capacity(n);
    let mut facts = Vec::with_capacity(n);
    for wrapped in values.iter() {
        let Ok(fact) = wrapped.cast_exact::<PyTuple>() else {
            return Ok(None);
        };
        if fact.len() != 5 || !pickle_into(&fact.get_item(0)?, &mut data)? {
            return Ok(None);
        }
        ends.push(data.len());
        facts.push(fact.clone());
    }
    let zero = 0i64.into_pyobject(py)?.into_any();
    let mut indexes = idx.try_iter()?;
    let mut flat: Vec<Bound<'py, PyAny>> = Vec::with_capacity(10 * n);
    let mut at = 0;
    for (i, (fact, end)) in facts.iter().zip(ends).enumerate() {
        let ident = idents.get_item(i)?;
        let index = indexes
            .next()
            .ok_or_else(|| PyValueError::new_err("store_rows: idx is shorter than values"))??;
        flat.push((first_id + i as i64).into_pyobject(py)?.into_any());
        flat.push(PyByteArray::new(py, ident.cast::<PyBytes>()?.as_bytes()).into_any());
        flat.push(index);
        flat.push(fact.get_item(3)?);
        flat.push(fact.get_item(4)?);
        flat.push(fact.get_item(1)?);
        flat.push(fact.get_item(2)?);
        flat.push(attempts.clone());
        flat.push(PyByteArray::new(py, &data[at..end]).into_any());
        flat.push(zero.clone());
        at = end;
    }
    let rows = PyList::new(py, flat)?;
    for (i, fact) in facts.iter().enumerate() {
        values.set_item(i, fact.get_item(0)?)?;
    }
    Ok(Some(rows))
}

/// Encodes `values[lo:hi]` (whose first item has input index `start`; `hi` defaults to the
/// end) in the compact plain encoding of `shoal_core::plain`, or returns `None` if some value is
/// not a plain one (an int beyond 64 bits, a subclass, a container...): the caller then
/// pickles the items. Packing a range of the caller's list spares it a slice.
#[pyfunction]
#[pyo3(signature = (start, values, lo=0, hi=None))]
fn pack_plain<'py>(
    py: Python<'py>,
    start: u64,
    values: &Bound<'py, PyList>,
    lo: usize,
    hi: Option<usize>,
) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let hi = hi.unwrap_or(usize::MAX).min(values.len());
    let lo = lo.min(hi);
    let Ok(count) = u32::try_from(hi - lo) else {
        return Ok(None);
    };
    if let Some(packed) = pack_array(start, lo, count, values) {
        return Ok(Some(PyBytes::new(py, &packed)));
    }
    let mut w = plain::Writer::new(start, count);
    for i in lo..hi {
        let v = values.get_item(i)?;
        // Exact types only: a subclass (a bool is an int, an IntEnum...) must come back as
        // itself, which only pickle can do.
        if v.is_exact_instance_of::<PyInt>() {
            match v.extract::<i64>() {
                Ok(i) => w.int(i),
                Err(_) => return Ok(None),
            }
        } else if v.is_exact_instance_of::<PyFloat>() {
            w.float(v.extract::<f64>()?);
        } else if v.is_none() {
            w.none();
        } else if v.is_exact_instance_of::<PyBool>() {
            w.bool(v.is_truthy()?);
        } else if let Ok(s) = v.cast_exact::<PyString>() {
            match s.to_str() {
                Ok(text) => w.str(text).map_err(to_py)?,
                Err(_) => return Ok(None), // lone surrogates: not UTF-8
            }
        } else if let Ok(b) = v.cast_exact::<PyBytes>() {
            w.bytes(b.as_bytes()).map_err(to_py)?;
        } else {
            return Ok(None);
        }
    }
    Ok(Some(PyBytes::new(py, &w.finish())))
}

/// The packed array of `count` items of a list from `lo` on, all exact ints (each fitting 64
/// bits) or all exact floats, or `None`.
///
/// The common case of a map over numbers, done with the C API directly: a type-pointer compare
/// and a conversion per item, faster than pickling the list.
fn pack_array(start: u64, lo: usize, count: u32, values: &Bound<'_, PyList>) -> Option<Vec<u8>> {
    let list = values.as_ptr();
    let lo = lo as ffi::Py_ssize_t;
    let end = lo + count as ffi::Py_ssize_t;
    // SAFETY: the `values` reference holds the list (and the GIL) for this whole call; the
    // items are borrowed references valid while the list is not mutated, and no Python code
    // runs here that could mutate it. PyLong_Type/PyFloat_Type are static type objects. The
    // caller clamped `lo + count` to the list's length.
    unsafe {
        let int_type = std::ptr::addr_of_mut!(ffi::PyLong_Type);
        let float_type = std::ptr::addr_of_mut!(ffi::PyFloat_Type);
        if count == 0 {
            return None; // an empty list: the tagged layout is as small
        }
        let first = ffi::PyList_GetItem(list, lo);
        if first.is_null() {
            ffi::PyErr_Clear();
            return None;
        }
        let kind = ffi::Py_TYPE(first);
        if kind == int_type {
            let mut w = plain::Writer::ints(start, count);
            for i in lo..end {
                let item = ffi::PyList_GetItem(list, i);
                if ffi::Py_TYPE(item) != int_type {
                    return None;
                }
                let mut overflow: std::os::raw::c_int = 0;
                let v = ffi::PyLong_AsLongLongAndOverflow(item, &mut overflow);
                if overflow != 0 {
                    return None;
                }
                w.raw_i64(v);
            }
            Some(w.finish())
        } else if kind == float_type {
            let mut w = plain::Writer::floats(start, count);
            for i in lo..end {
                let item = ffi::PyList_GetItem(list, i);
                if ffi::Py_TYPE(item) != float_type {
                    return None;
                }
                w.raw_f64(ffi::PyFloat_AsDouble(item));
            }
            Some(w.finish())
        } else {
            None
        }
    }
}

/// A new list of the ints or floats in a packed array.
fn unpack_array<'py>(
    py: Python<'py>,
    layout: plain::Layout,
    data: &[u8],
) -> PyResult<Bound<'py, PyList>> {
    let count = data.len() / 8;
    // SAFETY: PyList_New returns a new list (or NULL with an exception set, turned into an
    // error); each slot is filled exactly once with a new reference, which PyList_SetItem
    // steals. A NULL from a constructor (out of memory) is an error; the partly filled list
    // holds NULL slots, which list deallocation accepts.
    unsafe {
        let list = Bound::from_owned_ptr_or_err(py, ffi::PyList_New(count as ffi::Py_ssize_t))?;
        for (i, raw) in data.chunks_exact(8).enumerate() {
            let bytes: [u8; 8] = raw.try_into().expect("8-byte chunks");
            let item = match layout {
                plain::Layout::Floats => ffi::PyFloat_FromDouble(f64::from_le_bytes(bytes)),
                _ => ffi::PyLong_FromLongLong(i64::from_le_bytes(bytes)),
            };
            if item.is_null() {
                return Err(PyErr::fetch(py));
            }
            ffi::PyList_SetItem(list.as_ptr(), i as ffi::Py_ssize_t, item);
        }
        Ok(list.cast_into_unchecked())
    }
}

/// Decodes what [`pack_plain`] made: `(start, values)`.
#[pyfunction]
fn unpack_plain<'py>(py: Python<'py>, data: &[u8]) -> PyResult<(u64, Bound<'py, PyList>)> {
    let mut r = plain::Reader::new(data).map_err(to_py)?;
    let layout = r.layout();
    if layout != plain::Layout::Tagged {
        return Ok((
            r.start(),
            unpack_array(py, layout, r.array().map_err(to_py)?)?,
        ));
    }
    let list = PyList::empty(py);
    for _ in 0..r.count() {
        let item = match r.next_value().map_err(to_py)? {
            plain::Value::None => py.None().into_bound(py),
            plain::Value::Int(i) => i.into_pyobject(py)?.into_any(),
            plain::Value::Float(f) => f.into_pyobject(py)?.into_any(),
            plain::Value::Bool(b) => b.into_pyobject(py)?.to_owned().into_any(),
            plain::Value::Str(s) => PyString::new(py, s).into_any(),
            plain::Value::Bytes(b) => PyBytes::new(py, b).into_any(),
        };
        list.append(item)?;
    }
    Ok((r.start(), list))
}

/// Total memory of the machine in bytes (0 if unknown).
#[pyfunction]
fn total_memory() -> u64 {
    shoal_core::supervisor::total_memory().unwrap_or(0)
}

/// Name of a signal number, e.g. 9 -> "SIGKILL".
#[pyfunction]
fn signal_name(sig: i32) -> &'static str {
    shoal_core::supervisor::signal_name(sig)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_class::<WorkerChannel>()?;
    m.add_class::<ChunkSizer>()?;
    m.add_class::<ProgressBar>()?;
    m.add_class::<Segment>()?;
    m.add_class::<Mapping>()?;
    m.add_function(wrap_pyfunction!(cpu_count, m)?)?;
    m.add_function(wrap_pyfunction!(signal_name, m)?)?;
    m.add_function(wrap_pyfunction!(total_memory, m)?)?;
    m.add_function(wrap_pyfunction!(buffer_span, m)?)?;
    m.add_function(wrap_pyfunction!(content_hash, m)?)?;
    m.add_function(wrap_pyfunction!(blake2b_many, m)?)?;
    m.add_function(wrap_pyfunction!(pickle_plain, m)?)?;
    m.add_function(wrap_pyfunction!(store_rows, m)?)?;
    m.add_function(wrap_pyfunction!(pack_plain, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_plain, m)?)?;
    m.add_function(wrap_pyfunction!(at_exit, m)?)?;
    m.add("EngineError", m.py().get_type::<EngineError>())?;
    m.add("KIND_SETUP", Kind::Setup as u8)?;
    m.add("KIND_TASK", Kind::Task as u8)?;
    m.add("KIND_RELEASE", Kind::Release as u8)?;
    m.add("KIND_SHUTDOWN", Kind::Shutdown as u8)?;
    m.add("OUTCOME_DONE", DONE)?;
    m.add("OUTCOME_WORKER_LOST", WORKER_LOST)?;
    m.add("OUTCOME_START_FAILED", START_FAILED)?;
    m.add("OUTCOME_TIMED_OUT", TIMED_OUT)?;
    m.add("OUTCOME_MEMORY_EXCEEDED", MEMORY_EXCEEDED)?;
    m.add("OUTCOME_PARTIAL", PARTIAL)?;
    Ok(())
}
