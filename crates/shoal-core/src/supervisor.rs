//! The supervisor: worker processes, their sockets, and the threads that move bytes.
//!
//! Data flow:
//!
//! ```text
//!  caller thread ──submit()──► Mutex<State>{Scheduler} ──Action::SendTask──► writer thread ──► worker
//!        ▲                          ▲    │                                                    │
//!        └──wait(): Condvar◄────────┘    └──Action::Spawn──► spawner thread (fork+exec)       │
//!                                   ▲                                                         │
//!                                   └──────────── reader thread ◄──── Result frames ◄─────────┘
//! ```
//!
//! Every worker has one Unix socketpair, a reader thread and a writer thread. All decisions are
//! made by the [`Scheduler`] under one mutex; the supervisor only carries out its [`Action`]s.
//! Sends go through channels, so no socket write ever happens while the lock is held.
//!
//! Workers are started by one long-lived *spawner* thread with fork+exec (`std::process::Command`
//! with a `pre_exec` hook). The hook makes the worker its own process-group leader (a terminal's
//! Ctrl-C reaches only the driver, which then stops the workers itself), ignores SIGINT, and sets
//! `PR_SET_PDEATHSIG` so the kernel kills the worker when the driver dies. Linux ties that signal
//! to the *thread* that forked, which is why all spawns happen on the spawner thread, which lives
//! as long as the pool. A worker also exits when its socket reaches end-of-file.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::chunking::ChunkPolicy;
use crate::error::{Error, Result};
use crate::fdpass::FdReader;
use crate::protocol::{self, Frame, Kind};
use crate::scheduler::{
    Action, Machine, Outcome, Scheduler, SchedulerConfig, SessionId, SessionOptions, SetupId,
    WorkerId,
};

/// How to start workers and size the pool.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The program to run (the Python interpreter).
    pub program: PathBuf,
    /// Its arguments; the socket's file descriptor number is appended as the last one.
    pub args: Vec<String>,
    /// Extra environment variables for workers.
    pub env: Vec<(String, String)>,
    /// Pool size.
    pub workers: usize,
    /// Idle workers exit after this long; `None` keeps them.
    pub idle_timeout: Option<Duration>,
    /// Chunking policy.
    pub policy: ChunkPolicy,
    /// How often machine load and memory are sampled, when a session limits by them.
    pub machine_interval: Duration,
    /// Any task may queue behind a busy worker (see [`SchedulerConfig::queue_any`]).
    pub queue_any: bool,
}

enum Outgoing {
    /// Header bytes plus a shared payload (sent without copying the payload into a frame).
    Frame(Vec<u8>, Option<Arc<[u8]>>),
}

struct Link {
    pid: u32,
    tx: Sender<Outgoing>,
}

struct State {
    sched: Scheduler,
    links: HashMap<WorkerId, Link>,
    readers: Vec<JoinHandle<()>>,
    woken: Vec<SessionId>,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
    config: EngineConfig,
    epoch: Instant,
    spawn_tx: Mutex<Option<Sender<WorkerId>>>,
    stop: AtomicBool,
}

/// A running pool of worker processes. Cheap to share across threads (`&Engine` is enough).
pub struct Engine {
    /// The process that started the pool. After a `fork()`, the child holds a copy of this
    /// object but none of its threads, and the workers are not its children: there, the
    /// engine must do nothing, and above all not kill the parent's workers.
    owner_pid: u32,
    shared: Arc<Shared>,
    spawner: Mutex<Option<JoinHandle<()>>>,
    housekeeper: Mutex<Option<JoinHandle<()>>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; keep serving rather than cascade.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Carries out scheduler actions. Called with the lock held; never blocks.
    fn apply(&self, st: &mut State, actions: Vec<Action>) {
        let mut wake = false;
        for action in actions {
            match action {
                Action::Spawn { worker } => {
                    let sent = self
                        .spawn_tx
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_ref()
                        .map(|tx| tx.send(worker));
                    if !matches!(sent, Some(Ok(()))) {
                        let more = st
                            .sched
                            .worker_lost(worker, "the pool is shutting down".into());
                        self.apply(st, more);
                    }
                }
                Action::SendSetup {
                    worker,
                    setup,
                    blob,
                } => {
                    send(
                        st,
                        worker,
                        protocol::encode_header(Kind::Setup, setup, 0, blob.len(), &[]),
                        Some(blob),
                    );
                }
                Action::SendTask {
                    worker,
                    task,
                    setup,
                    payload,
                } => {
                    let header =
                        protocol::encode_header(Kind::Task, task, setup, payload.len(), &[]);
                    send(st, worker, header, Some(payload));
                }
                Action::SendRelease { worker, setup } => {
                    send(
                        st,
                        worker,
                        protocol::encode_header(Kind::Release, setup, 0, 0, &[]),
                        None,
                    );
                }
                Action::Retire { worker } => {
                    send(
                        st,
                        worker,
                        protocol::encode_header(Kind::Shutdown, 0, 0, 0, &[]),
                        None,
                    );
                }
                Action::Kill { worker } => {
                    if let Some(link) = st.links.get(&worker) {
                        kill(link.pid);
                    }
                }
                Action::CheckMemory { worker, limit } => {
                    if let Some(rss) = st.links.get(&worker).and_then(|l| resident_bytes(l.pid)) {
                        let more = st.sched.memory_report(worker, rss, Some(limit));
                        self.apply(st, more);
                    }
                }
                Action::Wake { .. } => wake = true,
            }
        }
        if wake {
            self.ready.notify_all();
        }
    }
}

fn send(st: &State, worker: WorkerId, header: Vec<u8>, payload: Option<Arc<[u8]>>) {
    if let Some(link) = st.links.get(&worker) {
        // A closed channel means the worker is going away; its loss is reported by its reader.
        let _ = link.tx.send(Outgoing::Frame(header, payload));
    }
}

fn kill(pid: u32) {
    // SAFETY: plain syscall. The pid is still ours: a link is removed before its child is reaped.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// Busy and total CPU time of the whole machine, from the first line of `/proc/stat`.
pub fn cpu_times(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?;
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let values: Vec<u64> = fields.filter_map(|f| f.parse().ok()).collect();
    if values.len() < 5 {
        return None;
    }
    // Guest time is already counted in user time: only the first 8 fields add up.
    let total: u64 = values.iter().take(8).sum();
    let idle = values[3] + values[4]; // idle + iowait
    Some((total - idle, total))
}

/// Memory in use (total minus available), in bytes, from `/proc/meminfo`.
pub fn used_memory(meminfo: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|kb| kb * 1024)
    };
    Some(field("MemTotal:")?.saturating_sub(field("MemAvailable:")?))
}

/// Total memory of the machine in bytes.
pub fn total_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

/// Resident memory of a process, from `/proc/PID/statm`.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(4096) as u64)
}

/// Describes how a process ended, for error messages.
pub fn describe_exit(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit code {code}");
    }
    match status.signal() {
        Some(sig) => format!("killed by signal {sig} ({})", signal_name(sig)),
        None => "ended for an unknown reason".into(),
    }
}

/// The conventional name of a signal number.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        _ => "signal",
    }
}

impl Engine {
    /// Starts the pool's service threads. Workers start on demand (or with [`Engine::prestart`]).
    ///
    /// # Errors
    /// [`Error::Spawn`] if a service thread cannot be created.
    pub fn start(config: EngineConfig) -> Result<Engine> {
        let sched = Scheduler::new(SchedulerConfig {
            max_workers: config.workers.max(1),
            policy: config.policy,
            queue_any: config.queue_any,
            ..SchedulerConfig::default()
        });
        let (spawn_tx, spawn_rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                sched,
                links: HashMap::new(),
                readers: Vec::new(),
                woken: Vec::new(),
                closed: false,
            }),
            ready: Condvar::new(),
            config,
            epoch: Instant::now(),
            spawn_tx: Mutex::new(Some(spawn_tx)),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let spawner = thread::Builder::new()
            .name("shoal-spawner".into())
            .spawn(move || spawner_loop(&s, spawn_rx))
            .map_err(|e| Error::Spawn(e.to_string()))?;
        let s = shared.clone();
        let housekeeper = thread::Builder::new()
            .name("shoal-housekeeper".into())
            .spawn(move || housekeeper_loop(&s))
            .map_err(|e| Error::Spawn(e.to_string()))?;
        Ok(Engine {
            owner_pid: std::process::id(),
            shared,
            spawner: Mutex::new(Some(spawner)),
            housekeeper: Mutex::new(Some(housekeeper)),
        })
    }

    /// Whether this process is the one that started the pool (false in a forked child).
    pub fn is_owner(&self) -> bool {
        std::process::id() == self.owner_pid
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> Result<(T, Vec<Action>)>) -> Result<T> {
        if !self.is_owner() {
            return Err(Error::Closed);
        }
        let mut st = self.shared.lock();
        if st.closed {
            return Err(Error::Closed);
        }
        let (value, actions) = f(&mut st)?;
        self.shared.apply(&mut st, actions);
        Ok(value)
    }

    /// The pool size.
    pub fn workers(&self) -> usize {
        self.shared.config.workers.max(1)
    }

    /// Starts up to `count` workers now instead of on first use.
    ///
    /// # Errors
    /// [`Error::Closed`] after shutdown.
    pub fn prestart(&self, count: usize) -> Result<()> {
        self.with_state(|st| Ok(((), st.sched.prestart(count))))
    }

    /// Opens a session (see [`Scheduler::open_session`]).
    ///
    /// # Errors
    /// [`Error::Closed`] after shutdown.
    pub fn open_session(&self, ordered: bool) -> Result<SessionId> {
        self.with_state(|st| Ok((st.sched.open_session(ordered), Vec::new())))
    }

    /// Opens a session with limits (see [`SessionOptions`]).
    ///
    /// # Errors
    /// [`Error::Closed`] after shutdown.
    pub fn open_session_with(&self, options: SessionOptions) -> Result<SessionId> {
        self.with_state(|st| Ok((st.sched.open_session_with(options), Vec::new())))
    }

    /// Registers a setup for a session.
    ///
    /// # Errors
    /// [`Error::Closed`], or [`Error::Unknown`] for a closed session.
    pub fn add_setup(&self, session: SessionId, blob: Vec<u8>) -> Result<SetupId> {
        self.with_state(|st| Ok((st.sched.add_setup(session, Arc::from(blob))?, Vec::new())))
    }

    /// Starts a setup's cost estimate from an earlier call's (see [`Scheduler::hint_setup`]).
    pub fn hint_setup(&self, setup: SetupId, per_item_ns: f64) {
        self.shared.lock().sched.hint_setup(setup, per_item_ns);
    }

    /// The cost per item that a setup's chunks measured, if any reported.
    pub fn item_ns(&self, setup: SetupId) -> Option<f64> {
        self.shared.lock().sched.item_ns(setup)
    }

    /// Releases a setup on every worker.
    ///
    /// # Errors
    /// [`Error::Closed`] after shutdown.
    pub fn remove_setup(&self, setup: SetupId) -> Result<()> {
        self.with_state(|st| Ok(((), st.sched.remove_setup(setup))))
    }

    /// Queues a task; returns its sequence number in the session.
    ///
    /// # Errors
    /// [`Error::Closed`], or [`Error::Unknown`] for a removed setup.
    pub fn submit(&self, setup: SetupId, weight: u64, payload: Vec<u8>) -> Result<u64> {
        self.submit_with(setup, weight, payload, false)
    }

    /// Queues a task; an `exclusive` one runs alone on its worker.
    ///
    /// # Errors
    /// [`Error::Closed`], or [`Error::Unknown`] for a removed setup.
    pub fn submit_with(
        &self,
        setup: SetupId,
        weight: u64,
        payload: Vec<u8>,
        exclusive: bool,
    ) -> Result<u64> {
        self.with_state(|st| {
            st.sched
                .submit_with(setup, weight, Arc::from(payload), exclusive)
        })
    }

    /// Suggested items for the next chunk of `setup`.
    pub fn chunk_size(&self, setup: SetupId, remaining: Option<u64>) -> usize {
        self.shared.lock().sched.chunk_size(setup, remaining)
    }

    /// Drops queued tasks of a session (all, or those with the given sequence numbers);
    /// returns the sequence numbers dropped (the others had started or finished).
    ///
    /// # Errors
    /// [`Error::Closed`] after shutdown.
    pub fn cancel(&self, session: SessionId, only: Option<&[u64]>) -> Result<Vec<u64>> {
        self.with_state(|st| Ok((st.sched.cancel(session, only), Vec::new())))
    }

    /// Closes a session; with `abort`, kills the workers running its tasks.
    pub fn close_session(&self, session: SessionId, abort: bool) {
        let _ = self.with_state(|st| Ok(((), st.sched.close_session(session, abort))));
        self.shared.ready.notify_all();
    }

    /// Makes a pending [`Engine::wait`] on `session` return early (with what is ready, maybe
    /// nothing).
    pub fn wake(&self, session: SessionId) {
        self.shared.lock().woken.push(session);
        self.shared.ready.notify_all();
    }

    /// Waits up to `timeout` for outcomes of `session` and takes them all.
    ///
    /// Returns the outcomes (empty on timeout) and whether [`Engine::wake`] cut the wait short.
    ///
    /// # Errors
    /// [`Error::Unknown`] for a closed session, [`Error::Closed`] after shutdown.
    pub fn wait(&self, session: SessionId, timeout: Duration) -> Result<(Vec<Outcome>, bool)> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            let ready = st.sched.take_ready(session)?;
            if !ready.is_empty() {
                return Ok((ready, false));
            }
            if st.closed {
                return Err(Error::Closed);
            }
            if let Some(pos) = st.woken.iter().position(|&s| s == session) {
                st.woken.swap_remove(pos);
                return Ok((Vec::new(), true));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok((Vec::new(), false));
            }
            st = self
                .shared
                .ready
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Pids of the live worker processes.
    pub fn pids(&self) -> Vec<u32> {
        let st = self.shared.lock();
        let mut pids: Vec<u32> = st.links.values().map(|l| l.pid).collect();
        pids.sort_unstable();
        pids
    }

    /// Whether [`Engine::shutdown`] has run.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }

    /// Stops the pool. With `kill`, workers are killed at once; otherwise each finishes the
    /// task in its hands and exits. Waits for every worker process to be reaped. Idempotent.
    pub fn shutdown(&self, kill_now: bool) {
        if !self.is_owner() {
            return; // a forked copy: the workers and threads belong to the parent
        }
        let readers = {
            let mut st = self.shared.lock();
            st.closed = true;
            for link in st.links.values() {
                if kill_now {
                    kill(link.pid);
                } else {
                    let header = protocol::encode_header(Kind::Shutdown, 0, 0, 0, &[]);
                    let _ = link.tx.send(Outgoing::Frame(header, None));
                }
            }
            std::mem::take(&mut st.readers)
        };
        self.shared.ready.notify_all();
        for reader in readers {
            let _ = reader.join();
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared
            .spawn_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        for handle in [&self.spawner, &self.housekeeper] {
            if let Some(h) = handle.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = h.join();
            }
        }
        // Workers whose spawn raced with shutdown are killed by the spawner; reap their readers.
        let late = std::mem::take(&mut self.shared.lock().readers);
        for reader in late {
            let _ = reader.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown(true);
    }
}

fn spawner_loop(shared: &Arc<Shared>, rx: Receiver<WorkerId>) {
    for worker in rx {
        match spawn_worker(&shared.config) {
            Ok((child, stream)) => attach_worker(shared, worker, child, stream),
            Err(e) => {
                let mut st = shared.lock();
                let actions = st.sched.worker_lost(worker, e.to_string());
                shared.apply(&mut st, actions);
            }
        }
    }
}

/// Bytes either end of a worker's socket may have in flight before a send waits (the kernel
/// caps it at `net.core.wmem_max`). The default (about 208 KiB) is less than one chunk of
/// results of 25,000 small values: the worker then sleeps in `send` until the driver's reader
/// has drained the socket, a wake-up per chunk on both sides.
const SOCKET_BUFFER: libc::c_int = 1 << 20;

fn widen_send_buffer(stream: &UnixStream) {
    let size = SOCKET_BUFFER;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local; a failure only
    // leaves the default size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            std::ptr::addr_of!(size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn spawn_worker(config: &EngineConfig) -> Result<(Child, UnixStream)> {
    let (ours, theirs) = UnixStream::pair()?;
    widen_send_buffer(&ours);
    widen_send_buffer(&theirs);
    let fd = theirs.as_raw_fd();
    // SAFETY: getpid is always safe.
    let parent = unsafe { libc::getpid() };
    let mut cmd = Command::new(&config.program);
    cmd.args(&config.args)
        .arg(fd.to_string())
        .envs(config.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null());
    // SAFETY: the hook runs in the forked child before exec and only makes async-signal-safe
    // syscalls (setpgid, prctl, getppid, kill, fcntl, signal).
    unsafe {
        cmd.pre_exec(move || {
            libc::setpgid(0, 0);
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            if libc::getppid() != parent {
                // The driver died between fork and prctl.
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| Error::Spawn(format!("{}: {e}", config.program.display())))?;
    drop(theirs);
    Ok((child, ours))
}

fn attach_worker(shared: &Arc<Shared>, worker: WorkerId, mut child: Child, stream: UnixStream) {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let write_half = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            let mut st = shared.lock();
            let actions = st
                .sched
                .worker_lost(worker, format!("socket clone failed: {e}"));
            shared.apply(&mut st, actions);
            return;
        }
    };
    // Register the link before the reader can see the worker's hello, so that the first tasks
    // the scheduler sends in reply find a channel to go through.
    {
        let mut st = shared.lock();
        if st.closed {
            drop(st);
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        st.links.insert(worker, Link { pid, tx });
    }
    let writer = thread::Builder::new()
        .name(format!("shoal-writer-{pid}"))
        .spawn(move || writer_loop(write_half, rx));
    let s = shared.clone();
    let reader = thread::Builder::new()
        .name(format!("shoal-reader-{pid}"))
        .spawn(move || reader_loop(&s, worker, child, stream));
    let mut st = shared.lock();
    match (writer, reader) {
        (Ok(_), Ok(reader)) => {
            // Drop handles of readers that already ended (retired or crashed workers).
            st.readers.retain(|h| !h.is_finished());
            st.readers.push(reader);
        }
        _ => {
            kill(pid);
            st.links.remove(&worker);
            let actions = st
                .sched
                .worker_lost(worker, "could not start I/O threads".into());
            shared.apply(&mut st, actions);
        }
    }
}

fn writer_loop(stream: UnixStream, rx: Receiver<Outgoing>) {
    let mut out = BufWriter::with_capacity(1 << 16, stream);
    while let Ok(first) = rx.recv() {
        // Drain whatever else is queued so a burst of small tasks costs one syscall.
        let mut next = Some(first);
        while let Some(Outgoing::Frame(header, payload)) = next {
            if out.write_all(&header).is_err() {
                return;
            }
            if let Some(p) = payload {
                if out.write_all(&p).is_err() {
                    return;
                }
            }
            next = rx.try_recv().ok();
        }
        if out.flush().is_err() {
            return;
        }
    }
}

fn reader_loop(shared: &Arc<Shared>, worker: WorkerId, mut child: Child, stream: UnixStream) {
    let mut input = BufReader::with_capacity(1 << 16, FdReader::new(stream));
    let mut protocol_error = None;
    loop {
        match protocol::read_frame(&mut input) {
            Ok(Some(frame)) => {
                let Some(fds) = input.get_mut().take(frame.n_fds.into()) else {
                    protocol_error = Some("a frame's descriptors did not arrive".to_string());
                    break;
                };
                handle_frame(shared, worker, frame, fds);
            }
            Ok(None) => break,
            Err(e) => {
                protocol_error = Some(e.to_string());
                break;
            }
        }
    }
    // Unregister first, so nobody signals this pid after it is reaped.
    shared.lock().links.remove(&worker);
    let status = reap(&mut child);
    let mut exit = status.map_or_else(|| "unknown exit status".into(), describe_exit);
    if let Some(err) = protocol_error {
        exit = format!("{exit} after a broken channel ({err})");
    }
    let mut st = shared.lock();
    let actions = st.sched.worker_lost(worker, exit);
    shared.apply(&mut st, actions);
}

/// Waits for a child whose socket has closed; kills it if it lingers (it may have closed the
/// socket without exiting).
fn reap(child: &mut Child) -> Option<ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                return child.wait().ok();
            }
            Err(_) => return None,
        }
    }
}

fn handle_frame(shared: &Arc<Shared>, worker: WorkerId, frame: Frame, fds: Vec<OwnedFd>) {
    let now = shared.now_ns();
    let mut st = shared.lock();
    let actions = match frame.kind {
        Kind::Hello => st.sched.worker_started(worker, frame.id as u32, now),
        Kind::Result => {
            st.sched
                .task_finished_with(worker, frame.id, frame.aux, frame.payload, fds, now)
        }
        Kind::Partial => st
            .sched
            .task_partial(worker, frame.id, frame.aux, frame.payload, fds),
        // Other kinds only travel towards workers; ignore rather than kill the pool.
        _ => Vec::new(),
    };
    shared.apply(&mut st, actions);
}

fn housekeeper_loop(shared: &Arc<Shared>) {
    // Timeouts and memory limits are enforced from here, so the tick bounds their precision.
    let tick = Duration::from_millis(20);
    let mut since_reap = Duration::ZERO;
    let mut since_machine = Duration::MAX;
    let mut last_cpu: Option<(u64, u64)> = None;
    let mut measured = false;
    while !shared.stop.load(Ordering::SeqCst) {
        thread::sleep(tick);
        since_reap += tick;
        since_machine = since_machine.saturating_add(tick);
        let now = shared.now_ns();
        let watch_machine = shared.lock().sched.watches_machine();
        let mut machine = None;
        // The first reading needs two samples: take the second one soon.
        let due = if last_cpu.is_none() || !measured {
            Duration::from_millis(100).min(shared.config.machine_interval)
        } else {
            shared.config.machine_interval
        };
        if watch_machine && since_machine >= due {
            since_machine = Duration::ZERO;
            // Read outside the lock: these are files, not instant.
            let cpu = std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|t| cpu_times(&t));
            let mem = std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|t| used_memory(&t));
            if let (Some((busy, total)), Some((busy0, total0))) = (cpu, last_cpu) {
                let load = (busy.saturating_sub(busy0)) as f64
                    / (total.saturating_sub(total0)).max(1) as f64;
                machine = Some(Machine {
                    load,
                    used_memory: mem.unwrap_or(0),
                });
                measured = true;
            }
            last_cpu = cpu.or(last_cpu);
        } else if !watch_machine {
            last_cpu = None;
            measured = false;
            since_machine = Duration::MAX;
        }
        let mut st = shared.lock();
        if st.closed {
            break;
        }
        let mut actions = st.sched.tick(now);
        if let Some(m) = machine {
            actions.extend(st.sched.machine_state(m));
        }
        for (worker, limit) in st.sched.memory_watch() {
            if let Some(rss) = st.links.get(&worker).and_then(|l| resident_bytes(l.pid)) {
                actions.extend(st.sched.memory_report(worker, rss, Some(limit)));
            }
        }
        if let Some(idle) = shared.config.idle_timeout {
            if since_reap >= Duration::from_millis(200) {
                since_reap = Duration::ZERO;
                actions.extend(st.sched.reap_idle(now, idle.as_nanos() as u64));
            }
        }
        shared.apply(&mut st, actions);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::Status;

    /// A worker written in shell is too awkward; these tests use `python3` when present and a
    /// tiny echo worker in Python, which exercises the real spawn, socket and reaping paths.
    fn python() -> Option<PathBuf> {
        let out = Command::new("python3")
            .arg("-c")
            .arg("import sys; print(sys.executable)")
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    }

    const ECHO_WORKER: &str = r#"
import os, socket, struct, sys
fd = int(sys.argv[-1])
s = socket.socket(fileno=fd)
H = struct.Struct("<HBBHHQQQ")
def send(kind, ident, aux, payload=b"", fds=()):
    frame = H.pack(0x5348, 2, kind, 0, len(fds), ident, aux, len(payload)) + payload
    if fds:
        socket.send_fds(s, [frame], list(fds))
    else:
        s.sendall(frame)
def recvn(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            sys.exit(0)
        b += c
    return b
send(1, os.getpid(), 0)
while True:
    magic, ver, kind, nbuf, nfds, ident, aux, plen = H.unpack(recvn(32))
    payload = recvn(plen)
    if kind == 3:
        if payload == b"die":
            os.kill(os.getpid(), 9)
        if payload.startswith(b"fd:"):
            seg = os.memfd_create("t")
            os.write(seg, payload[3:])
            send(4, ident, 7, b"with fd", [seg])
            os.close(seg)
            continue
        send(4, ident, 7, payload.upper())
    elif kind == 6:
        sys.exit(0)
"#;

    fn engine(workers: usize) -> Option<Engine> {
        let program = python()?;
        Some(
            Engine::start(EngineConfig {
                program,
                args: vec!["-c".into(), ECHO_WORKER.into()],
                env: Vec::new(),
                workers,
                idle_timeout: None,
                policy: ChunkPolicy::default(),
                machine_interval: Duration::from_millis(100),
                queue_any: false,
            })
            .unwrap(),
        )
    }

    fn collect(e: &Engine, session: SessionId, n: usize) -> Vec<Outcome> {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < n && Instant::now() < deadline {
            got.extend(e.wait(session, Duration::from_millis(100)).unwrap().0);
        }
        got
    }

    #[test]
    fn round_trip_through_real_processes() {
        let Some(e) = engine(2) else { return };
        let session = e.open_session(true).unwrap();
        let setup = e.add_setup(session, b"setup".to_vec()).unwrap();
        for i in 0..20 {
            assert_eq!(
                e.submit(setup, 1, format!("item{i}").into_bytes()).unwrap(),
                i
            );
        }
        let got = collect(&e, session, 20);
        assert_eq!(got.len(), 20);
        for (i, o) in got.iter().enumerate() {
            assert_eq!(o.seq, i as u64);
            assert_eq!(o.status, Status::Done);
            assert_eq!(o.payload, format!("ITEM{i}").into_bytes());
            assert_eq!(o.elapsed_ns, 7);
        }
        assert!(e.pids().len() <= 2);
        e.shutdown(false);
        assert!(e.pids().is_empty());
    }

    #[test]
    fn descriptors_passed_with_a_result_reach_its_outcome() {
        use std::io::{Read, Seek, SeekFrom};
        let Some(e) = engine(1) else { return };
        let session = e.open_session(true).unwrap();
        let setup = e.add_setup(session, Vec::new()).unwrap();
        for item in ["a", "fd:first", "b", "fd:second"] {
            e.submit(setup, 1, item.as_bytes().to_vec()).unwrap();
        }
        let got = collect(&e, session, 4);
        let texts: Vec<Vec<String>> = got
            .into_iter()
            .map(|o| {
                o.fds
                    .into_iter()
                    .map(|fd| {
                        let mut file = std::fs::File::from(fd);
                        file.seek(SeekFrom::Start(0)).unwrap();
                        let mut text = String::new();
                        file.read_to_string(&mut text).unwrap();
                        text
                    })
                    .collect()
            })
            .collect();
        assert_eq!(
            texts,
            vec![
                vec![],
                vec!["first".to_string()],
                vec![],
                vec!["second".to_string()]
            ]
        );
        e.shutdown(false);
    }

    #[test]
    fn a_killed_worker_fails_only_its_task_and_is_replaced() {
        let Some(e) = engine(1) else { return };
        let session = e.open_session(true).unwrap();
        let setup = e.add_setup(session, Vec::new()).unwrap();
        e.submit(setup, 1, b"a".to_vec()).unwrap();
        e.submit(setup, 1, b"die".to_vec()).unwrap();
        e.submit(setup, 1, b"c".to_vec()).unwrap();
        let got = collect(&e, session, 3);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].payload, b"A");
        match &got[1].status {
            Status::WorkerLost { exit, pid } => {
                assert!(exit.contains("SIGKILL"), "{exit}");
                assert!(pid.is_some());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(got[2].payload, b"C");
    }

    #[test]
    fn a_program_that_cannot_start_fails_the_work() {
        let e = Engine::start(EngineConfig {
            program: PathBuf::from("/nonexistent/python"),
            args: Vec::new(),
            env: Vec::new(),
            workers: 1,
            idle_timeout: None,
            policy: ChunkPolicy::default(),
            machine_interval: Duration::from_millis(100),
            queue_any: false,
        })
        .unwrap();
        let session = e.open_session(true).unwrap();
        let setup = e.add_setup(session, Vec::new()).unwrap();
        e.submit(setup, 1, b"a".to_vec()).unwrap();
        let got = collect(&e, session, 1);
        assert!(
            matches!(&got[0].status, Status::StartFailed(m) if m.contains("/nonexistent/python"))
        );
    }

    #[test]
    fn machine_readings() {
        let stat = "cpu  100 5 50 800 45 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8\n";
        assert_eq!(cpu_times(stat), Some((155, 1000)));
        let meminfo = "MemTotal:       1000 kB\nMemFree:  10 kB\nMemAvailable:    250 kB\n";
        assert_eq!(used_memory(meminfo), Some(750 * 1024));
        assert!(cpu_times(&std::fs::read_to_string("/proc/stat").unwrap()).is_some());
        assert!(total_memory().unwrap() > 0);
    }

    #[test]
    fn idle_workers_exit() {
        let Some(program) = python() else { return };
        let e = Engine::start(EngineConfig {
            program,
            args: vec!["-c".into(), ECHO_WORKER.into()],
            env: Vec::new(),
            workers: 1,
            idle_timeout: Some(Duration::from_millis(300)),
            policy: ChunkPolicy::default(),
            machine_interval: Duration::from_millis(100),
            queue_any: false,
        })
        .unwrap();
        let session = e.open_session(true).unwrap();
        let setup = e.add_setup(session, Vec::new()).unwrap();
        e.submit(setup, 1, b"a".to_vec()).unwrap();
        assert_eq!(collect(&e, session, 1).len(), 1);
        assert_eq!(e.pids().len(), 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !e.pids().is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        assert!(e.pids().is_empty(), "idle worker should have retired");
        // And the pool comes back on demand.
        e.submit(setup, 1, b"b".to_vec()).unwrap();
        assert_eq!(collect(&e, session, 1)[0].payload, b"B");
    }
}
