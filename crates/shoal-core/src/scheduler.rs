//! The scheduler: a sans-I/O state machine that decides which task runs where.
//!
//! It owns no process, socket or clock. Its inputs are method calls ("a task was submitted",
//! "worker 3 said hello", "task 17 finished after 2 ms", "worker 3 is gone"), and its outputs are
//! [`Action`]s for the supervisor to carry out ("start a worker", "send this setup to worker 3").
//! Time enters only as a `now_ns` argument. That is what makes it testable with `cargo test`
//! alone (see the tests at the bottom), and reusable by other transports.
//!
//! Vocabulary:
//!
//! - A **session** is one stream of tasks with one completion queue: one `map` call, or one
//!   `Executor`. An *ordered* session releases outcomes in submission order (for `map`/`imap`),
//!   an unordered one as they complete (`as_completed`, futures).
//! - A **setup** is what a worker must hold before it can run a task: the pickled function and
//!   the fixed arguments of a call. It is sent to a worker once, just before that worker's first
//!   task that needs it, never with every chunk.
//! - A **task** is an opaque payload (usually a pickled chunk of items) with a `weight` (its
//!   number of items), which the chunk-size estimate uses.
//!
//! Dispatch is first-in first-out over all sessions. A worker takes a task when it is idle, or,
//! when the cost of tasks is known, while its queued work stays under a small time budget: short
//! tasks are pipelined (no idle gap while a result travels back), long ones are not (no task
//! waits behind another while a worker is free).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::chunking::{ChunkPolicy, ItemTimer};
use crate::error::{Error, Result};

/// A task estimated at or under this many nanoseconds may be queued behind another.
const PIPELINE_ANY_NS: f64 = 1_000_000.0;
/// Work a worker may hold queued, at the least, when tasks are pipelined.
const PIPELINE_MIN_BUDGET_NS: f64 = 1_000_000.0;
/// A task of at least this many items may be queued behind another, whatever its cost.
const PIPELINE_MIN_ITEMS: u64 = 8;

/// Identifies a worker slot (not a pid: a restarted worker gets a new id).
pub type WorkerId = u64;
/// Identifies a session.
pub type SessionId = u64;
/// Identifies a setup.
pub type SetupId = u64;
/// Identifies a task.
pub type TaskId = u64;

/// Tunables of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// The pool size: how many workers may run at once.
    pub max_workers: usize,
    /// The chunk-size policy; its `target_ns` also sets the pipelining budget.
    pub policy: ChunkPolicy,
    /// Most tasks queued on one worker at a time.
    pub max_tasks_per_worker: usize,
    /// After this many workers in a row die before saying hello, queued work fails instead of
    /// looping on a broken interpreter.
    pub max_start_failures: u32,
    /// Any task may wait behind a busy worker's running one, whatever its cost (exclusive tasks
    /// and workers aside): for a client that already bounds the work it hands over, such as an
    /// MPI relay with one worker, whose rank 0 queues at most one chunk behind the running one.
    /// That chunk would run on that worker next anyway; in the worker's pipe it starts without
    /// the round trip of the result that would otherwise release it.
    pub queue_any: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_workers: 1,
            policy: ChunkPolicy::default(),
            max_tasks_per_worker: 256,
            max_start_failures: 3,
            queue_any: false,
        }
    }
}

/// Something the supervisor must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a worker process for this slot.
    Spawn {
        /// The new slot.
        worker: WorkerId,
    },
    /// Send a setup to a worker.
    SendSetup {
        /// Destination.
        worker: WorkerId,
        /// Which setup.
        setup: SetupId,
        /// Its pickled bytes.
        blob: Arc<[u8]>,
    },
    /// Send a task to a worker.
    SendTask {
        /// Destination.
        worker: WorkerId,
        /// Which task.
        task: TaskId,
        /// The setup it runs under (already sent).
        setup: SetupId,
        /// The task payload.
        payload: Arc<[u8]>,
    },
    /// Tell a worker to forget a setup.
    SendRelease {
        /// Destination.
        worker: WorkerId,
        /// Which setup.
        setup: SetupId,
    },
    /// Ask an idle worker to exit.
    Retire {
        /// Which worker.
        worker: WorkerId,
    },
    /// Stop a worker now (its running task is abandoned).
    Kill {
        /// Which worker.
        worker: WorkerId,
    },
    /// Read the resident memory of a worker and report it with [`Scheduler::memory_report`].
    CheckMemory {
        /// Which worker.
        worker: WorkerId,
        /// The limit that applies, in bytes.
        limit: u64,
    },
    /// A session has outcomes ready (wake its waiter).
    Wake {
        /// Which session.
        session: SessionId,
    },
}

/// Limits that a session puts on its tasks and on the workers that run them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionOptions {
    /// Release outcomes in submission order.
    pub ordered: bool,
    /// Kill a task's worker when the task runs longer than this. Tasks of such a session run
    /// alone on their worker (no pipelining), so that "running" starts when it is sent.
    pub timeout_ns: Option<u64>,
    /// Replace a worker once it has run this many items of this session.
    pub max_items_per_worker: Option<u64>,
    /// Replace a worker whose resident memory exceeds this after a task; kill it (failing the
    /// task) if it exceeds it while running one.
    pub max_rss_bytes: Option<u64>,
    /// Dispatch no new task while the machine's CPU use (0..1 of all CPUs) is above this.
    pub max_load: Option<f64>,
    /// Dispatch no new task while the machine's used memory (bytes) is above this.
    pub max_used_memory: Option<u64>,
}

/// What the supervisor measured of the machine (see [`Scheduler::machine_state`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Machine {
    /// Fraction of all CPUs busy over the last interval (0..1).
    pub load: f64,
    /// Memory in use (total minus available), in bytes.
    pub used_memory: u64,
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// The worker ran it and sent back a payload (which may itself describe Python errors).
    Done,
    /// The worker died while the task was in its hands.
    WorkerLost {
        /// Pid of the dead worker, if it had said hello.
        pid: Option<u32>,
        /// How it ended, for example "killed by signal 9 (SIGKILL)".
        exit: String,
    },
    /// No worker could be started to run it.
    StartFailed(String),
    /// It ran past the session's timeout; its worker was killed.
    TimedOut {
        /// Pid of the killed worker.
        pid: Option<u32>,
        /// The limit, in nanoseconds.
        limit_ns: u64,
    },
    /// Not an end: the worker reported the outcome of the task's next `items` items while it
    /// goes on with the others. Delivered at once, even on an ordered session, and always
    /// before the task's own outcome. If the worker then dies, the task ends with
    /// [`Status::WorkerLost`] and is not run again: only its unreported items remain.
    Partial {
        /// How many items the payload covers.
        items: u64,
    },
    /// Its worker's resident memory went past the session's limit; the worker was killed.
    MemoryExceeded {
        /// Pid of the killed worker.
        pid: Option<u32>,
        /// Resident memory seen, in bytes.
        rss: u64,
        /// The limit, in bytes.
        limit: u64,
    },
}

/// A finished task, as handed to the session's consumer.
#[derive(Debug)]
pub struct Outcome {
    /// The task's sequence number within its session (0, 1, 2, ...).
    pub seq: u64,
    /// How it ended.
    pub status: Status,
    /// The worker's reply (empty unless `status` is `Done`).
    pub payload: Vec<u8>,
    /// Compute time reported by the worker.
    pub elapsed_ns: u64,
    /// Descriptors the worker passed with its reply (shared-memory segments holding the
    /// reply's large buffers); dropping the outcome closes them.
    pub fds: Vec<OwnedFd>,
}

#[derive(Debug, PartialEq, Eq)]
enum WorkerState {
    Starting,
    Ready,
    Retiring,
}

#[derive(Debug)]
struct Worker {
    pid: Option<u32>,
    state: WorkerState,
    running: Vec<TaskId>,
    load_ns: f64,
    unknown_cost: usize,
    /// Runs an exclusive task: nothing may be pipelined behind it.
    exclusive: bool,
    /// Items run so far (for recycling).
    items_done: u64,
    /// Why we killed it, if we did: the status its running task gets.
    kill_reason: Option<Status>,
    setups: HashSet<SetupId>,
    last_active_ns: u64,
}

#[derive(Debug)]
struct Task {
    session: SessionId,
    setup: SetupId,
    seq: u64,
    weight: u64,
    payload: Arc<[u8]>,
    worker: Option<WorkerId>,
    est_ns: Option<f64>,
    /// Runs alone on its worker: it was in the pipeline of a worker that died (so a crash is
    /// attributable), the caller asked, or its session has a timeout.
    exclusive: bool,
    /// When it was sent to its worker.
    started_ns: u64,
    /// Items whose outcome the worker has reported ahead of the task's end.
    reported: u64,
}

#[derive(Debug, Default)]
struct Session {
    ordered: bool,
    options: SessionOptions,
    next_seq: u64,
    next_out: u64,
    parked: BTreeMap<u64, Outcome>,
    /// Cancelled sequence numbers an ordered session must not wait for.
    skipped: HashSet<u64>,
    ready: VecDeque<Outcome>,
    setups: HashSet<SetupId>,
}

#[derive(Debug)]
struct Setup {
    session: SessionId,
    blob: Arc<[u8]>,
    timer: ItemTimer,
}

/// How much costlier than a hint says items are taken to be until a chunk reports (see
/// [`Scheduler::chunk_size`]).
const HINT_SHARE: f64 = 8.0;

/// The scheduler state machine. See the module documentation.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    workers: BTreeMap<WorkerId, Worker>,
    sessions: HashMap<SessionId, Session>,
    setups: HashMap<SetupId, Setup>,
    tasks: HashMap<TaskId, Task>,
    queue: VecDeque<TaskId>,
    next_id: u64,
    start_failures: u32,
    /// The latest time any input told us; dispatch stamps tasks with it.
    clock_ns: u64,
    /// The machine as last measured, for sessions with load or memory limits (`None` until
    /// the first reading: such sessions wait for it).
    machine: Option<Machine>,
}

impl Scheduler {
    /// A scheduler with no worker yet; workers are requested when work arrives.
    pub fn new(config: SchedulerConfig) -> Self {
        Scheduler {
            config,
            workers: BTreeMap::new(),
            sessions: HashMap::new(),
            setups: HashMap::new(),
            tasks: HashMap::new(),
            queue: VecDeque::new(),
            next_id: 1,
            start_failures: 0,
            clock_ns: 0,
            machine: None,
        }
    }

    fn fresh_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// The pool size.
    pub fn max_workers(&self) -> usize {
        self.config.max_workers
    }

    /// Opens a session.
    pub fn open_session(&mut self, ordered: bool) -> SessionId {
        self.open_session_with(SessionOptions {
            ordered,
            ..SessionOptions::default()
        })
    }

    /// Opens a session with limits (see [`SessionOptions`]).
    pub fn open_session_with(&mut self, options: SessionOptions) -> SessionId {
        let id = self.fresh_id();
        self.sessions.insert(
            id,
            Session {
                ordered: options.ordered,
                options,
                ..Session::default()
            },
        );
        id
    }

    /// Registers a setup (pickled function and fixed arguments) for a session.
    ///
    /// # Errors
    /// [`Error::Unknown`] if the session is closed.
    pub fn add_setup(&mut self, session: SessionId, blob: Arc<[u8]>) -> Result<SetupId> {
        if !self.sessions.contains_key(&session) {
            return Err(Error::Unknown {
                what: "session",
                id: session,
            });
        }
        let id = self.fresh_id();
        self.setups.insert(
            id,
            Setup {
                session,
                blob,
                timer: ItemTimer::default(),
            },
        );
        self.sessions
            .get_mut(&session)
            .expect("checked")
            .setups
            .insert(id);
        Ok(id)
    }

    /// Starts `setup`'s cost estimate from `per_item_ns`, measured by an earlier call of the
    /// same function, so its first chunks need no single-item probes (see
    /// [`Scheduler::chunk_size`]). Ignored once the setup has a measurement of its own.
    pub fn hint_setup(&mut self, setup: SetupId, per_item_ns: f64) {
        if let Some(s) = self.setups.get_mut(&setup) {
            if s.timer.per_item_ns().is_none() && per_item_ns.is_finite() && per_item_ns > 0.0 {
                s.timer = ItemTimer::hinted(per_item_ns);
            }
        }
    }

    /// The cost per item that `setup`'s own chunks measured, to hint the next call of the same
    /// function (`None` before any reported, or while too few cheap items did; see
    /// [`ItemTimer::hint_ns`]).
    pub fn item_ns(&self, setup: SetupId) -> Option<f64> {
        self.setups.get(&setup).and_then(|s| s.timer.hint_ns())
    }

    /// Forgets a setup and tells the workers holding it to drop it.
    pub fn remove_setup(&mut self, setup: SetupId) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(s) = self.setups.remove(&setup) {
            if let Some(sess) = self.sessions.get_mut(&s.session) {
                sess.setups.remove(&setup);
            }
            self.release_everywhere(setup, &mut out);
        }
        out
    }

    fn release_everywhere(&mut self, setup: SetupId, out: &mut Vec<Action>) {
        for (&id, w) in self.workers.iter_mut() {
            if w.setups.remove(&setup) {
                out.push(Action::SendRelease { worker: id, setup });
            }
        }
    }

    /// Queues a task of `weight` items under `setup`; returns its sequence number.
    ///
    /// # Errors
    /// [`Error::Unknown`] if the setup was removed or its session closed.
    pub fn submit(
        &mut self,
        setup: SetupId,
        weight: u64,
        payload: Arc<[u8]>,
    ) -> Result<(u64, Vec<Action>)> {
        self.submit_with(setup, weight, payload, false)
    }

    /// Like [`Scheduler::submit`]; an `exclusive` task runs alone on its worker, so that if the
    /// worker dies, this task is the one to blame.
    ///
    /// # Errors
    /// [`Error::Unknown`] if the setup was removed or its session closed.
    pub fn submit_with(
        &mut self,
        setup: SetupId,
        weight: u64,
        payload: Arc<[u8]>,
        exclusive: bool,
    ) -> Result<(u64, Vec<Action>)> {
        let session = self
            .setups
            .get(&setup)
            .map(|s| s.session)
            .ok_or(Error::Unknown {
                what: "setup",
                id: setup,
            })?;
        let sess = self.sessions.get_mut(&session).ok_or(Error::Unknown {
            what: "session",
            id: session,
        })?;
        let seq = sess.next_seq;
        sess.next_seq += 1;
        let exclusive = exclusive
            || sess.options.timeout_ns.is_some()
            || sess.options.max_items_per_worker.is_some();
        let id = self.fresh_id();
        self.tasks.insert(
            id,
            Task {
                session,
                setup,
                seq,
                weight: weight.max(1),
                payload,
                worker: None,
                est_ns: None,
                exclusive,
                started_ns: 0,
                reported: 0,
            },
        );
        self.queue.push_back(id);
        let mut out = Vec::new();
        self.dispatch(&mut out);
        Ok((seq, out))
    }

    /// Items per chunk the policy suggests for the next task of `setup`.
    ///
    /// A session with a timeout gets single items (a timeout is per item), and so does one that
    /// recycles workers after n items (so that no worker runs more than n).
    pub fn chunk_size(&self, setup: SetupId, remaining: Option<u64>) -> usize {
        let Some(s) = self.setups.get(&setup) else {
            return 1;
        };
        // A hint from an earlier call may be wrong (the same function, other inputs): until a
        // chunk of this call reports, chunks are sized as if items cost HINT_SHARE times more,
        // which bounds what a wrong hint can put into one chunk.
        let per_item = s.timer.per_item_ns().map(|ns| {
            if s.timer.is_hint() {
                ns * HINT_SHARE
            } else {
                ns
            }
        });
        let size = self
            .config
            .policy
            .chunk_size(per_item, remaining, self.config.max_workers);
        let Some(options) = self.sessions.get(&s.session).map(|sess| &sess.options) else {
            return size;
        };
        if options.timeout_ns.is_some() || options.max_items_per_worker.is_some() {
            return 1;
        }
        size
    }

    /// Asks for workers up front (up to the pool size), so the first task does not wait for a
    /// start.
    pub fn prestart(&mut self, count: usize) -> Vec<Action> {
        let mut out = Vec::new();
        while self.live_workers() < count.min(self.config.max_workers) {
            self.spawn(&mut out);
        }
        out
    }

    fn live_workers(&self) -> usize {
        self.workers
            .values()
            .filter(|w| w.state != WorkerState::Retiring)
            .count()
    }

    fn spawn(&mut self, out: &mut Vec<Action>) {
        let id = self.fresh_id();
        self.workers.insert(
            id,
            Worker {
                pid: None,
                state: WorkerState::Starting,
                running: Vec::new(),
                load_ns: 0.0,
                unknown_cost: 0,
                exclusive: false,
                items_done: 0,
                kill_reason: None,
                setups: HashSet::new(),
                last_active_ns: 0,
            },
        );
        out.push(Action::Spawn { worker: id });
    }

    /// A worker process said hello: it can take tasks.
    pub fn worker_started(&mut self, worker: WorkerId, pid: u32, now_ns: u64) -> Vec<Action> {
        self.clock_ns = self.clock_ns.max(now_ns);
        let mut out = Vec::new();
        if let Some(w) = self.workers.get_mut(&worker) {
            w.pid = Some(pid);
            if w.state == WorkerState::Starting {
                w.state = WorkerState::Ready;
            }
            w.last_active_ns = now_ns;
            self.start_failures = 0;
            self.dispatch(&mut out);
        }
        out
    }

    /// A worker finished a task.
    pub fn task_finished(
        &mut self,
        worker: WorkerId,
        task: TaskId,
        elapsed_ns: u64,
        payload: Vec<u8>,
        now_ns: u64,
    ) -> Vec<Action> {
        self.task_finished_with(worker, task, elapsed_ns, payload, Vec::new(), now_ns)
    }

    /// [`Scheduler::task_finished`] for a reply that came with descriptors (see
    /// [`Outcome::fds`]). If nobody wants the outcome any more, they are closed here.
    pub fn task_finished_with(
        &mut self,
        worker: WorkerId,
        task: TaskId,
        elapsed_ns: u64,
        payload: Vec<u8>,
        fds: Vec<OwnedFd>,
        now_ns: u64,
    ) -> Vec<Action> {
        self.clock_ns = self.clock_ns.max(now_ns);
        let mut out = Vec::new();
        if let Some(t) = self.tasks.remove(&task) {
            let limits = self
                .sessions
                .get(&t.session)
                .map(|s| s.options.clone())
                .unwrap_or_default();
            if let Some(w) = self.workers.get_mut(&worker) {
                w.running.retain(|&id| id != task);
                w.exclusive = false;
                match t.est_ns {
                    Some(est) => w.load_ns = (w.load_ns - est).max(0.0),
                    None => w.unknown_cost = w.unknown_cost.saturating_sub(1),
                }
                w.last_active_ns = now_ns;
                w.items_done += t.weight;
                let worn_out = limits
                    .max_items_per_worker
                    .is_some_and(|n| w.items_done >= n);
                if worn_out && w.state == WorkerState::Ready {
                    // Recycle: nothing new goes to it; it exits after what it holds.
                    w.state = WorkerState::Retiring;
                    out.push(Action::Retire { worker });
                } else if let (Some(limit), WorkerState::Ready) = (limits.max_rss_bytes, &w.state) {
                    out.push(Action::CheckMemory { worker, limit });
                }
            }
            if let Some(s) = self.setups.get_mut(&t.setup) {
                s.timer.record(t.weight, elapsed_ns);
            }
            let outcome = Outcome {
                seq: t.seq,
                status: Status::Done,
                payload,
                elapsed_ns,
                fds,
            };
            self.deliver(t.session, outcome, &mut out);
        }
        self.dispatch(&mut out);
        out
    }

    /// A worker reported the outcome of the next `items` items of a task that goes on (see
    /// [`Status::Partial`]); it reaches the session at once. If the descriptors are not wanted
    /// (the session is closed), they are closed here.
    pub fn task_partial(
        &mut self,
        worker: WorkerId,
        task: TaskId,
        items: u64,
        payload: Vec<u8>,
        fds: Vec<OwnedFd>,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(t) = self.tasks.get_mut(&task) else {
            return out;
        };
        if t.worker != Some(worker) {
            return out;
        }
        t.reported += items;
        let (session, seq) = (t.session, t.seq);
        if let Some(sess) = self.sessions.get_mut(&session) {
            sess.ready.push_back(Outcome {
                seq,
                status: Status::Partial { items },
                payload,
                elapsed_ns: 0,
                fds,
            });
            out.push(Action::Wake { session });
        }
        out
    }

    /// A worker process is gone (it exited, crashed, was killed, or never started).
    ///
    /// If it held one task, that task was the one running and completes with
    /// [`Status::WorkerLost`]. If it held several (a pipeline), the culprit is uncertain: the
    /// worker may have finished some of them without its buffered results reaching us. All of
    /// them then go back to the front of the queue as *suspects*, each to be run alone on an
    /// idle worker, so a task that crashes again is blamed with certainty and the innocent ones
    /// complete. If the worker died before saying hello, that counts as a start failure; too many
    /// in a row fail the queued work with [`Status::StartFailed`] rather than restarting forever.
    pub fn worker_lost(&mut self, worker: WorkerId, exit: String) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(w) = self.workers.remove(&worker) else {
            return out;
        };
        if w.state == WorkerState::Starting {
            self.start_failures += 1;
        }
        // Tasks of sessions closed meanwhile are nobody's business any more: forget them.
        let (live, orphans): (Vec<TaskId>, Vec<TaskId>) = w.running.iter().partition(|t| {
            self.tasks
                .get(t)
                .is_some_and(|t| self.sessions.contains_key(&t.session))
        });
        for task in orphans {
            self.tasks.remove(&task);
        }
        let w = Worker { running: live, ..w };
        // A task that reported partial outcomes was the one running (a worker runs its
        // pipeline in order, and the results of the tasks before it arrived first): it is the
        // culprit, and the tasks queued behind it are innocent.
        let running_known = w
            .running
            .first()
            .and_then(|t| self.tasks.get(t))
            .is_some_and(|t| t.reported > 0);
        if running_known {
            for &task in w.running[1..].iter().rev() {
                if let Some(t) = self.tasks.get_mut(&task) {
                    t.worker = None;
                    t.est_ns = None;
                    self.queue.push_front(task);
                }
            }
        }
        if w.running.len() > 1 && !running_known {
            for &task in w.running.iter().rev() {
                if let Some(t) = self.tasks.get_mut(&task) {
                    t.worker = None;
                    t.est_ns = None;
                    t.exclusive = true;
                    self.queue.push_front(task);
                }
            }
        } else if let Some(&task) = w.running.first() {
            if let Some(t) = self.tasks.remove(&task) {
                let status = w.kill_reason.clone().unwrap_or(Status::WorkerLost {
                    pid: w.pid,
                    exit: exit.clone(),
                });
                let outcome = Outcome {
                    seq: t.seq,
                    status,
                    payload: Vec::new(),
                    elapsed_ns: 0,
                    fds: Vec::new(),
                };
                self.deliver(t.session, outcome, &mut out);
            }
        }
        if self.start_failures >= self.config.max_start_failures && !self.queue.is_empty() {
            let msg = format!(
                "{} worker processes in a row failed to start; last: {exit}",
                self.start_failures
            );
            for task in std::mem::take(&mut self.queue) {
                if let Some(t) = self.tasks.remove(&task) {
                    let outcome = Outcome {
                        seq: t.seq,
                        status: Status::StartFailed(msg.clone()),
                        payload: Vec::new(),
                        elapsed_ns: 0,
                        fds: Vec::new(),
                    };
                    self.deliver(t.session, outcome, &mut out);
                }
            }
            self.start_failures = 0;
        }
        self.dispatch(&mut out);
        out
    }

    /// Drops queued (not yet started) tasks of a session: all of them, or those whose sequence
    /// numbers are in `only`. Running tasks finish normally. An ordered session skips the
    /// dropped numbers, so later outcomes are not held back waiting for them.
    ///
    /// Returns the sequence numbers dropped: a task not among them had already been sent to a
    /// worker (or had finished), which is what `Future.cancel()` needs to know.
    pub fn cancel(&mut self, session: SessionId, only: Option<&[u64]>) -> Vec<u64> {
        let wanted: Option<HashSet<u64>> = only.map(|seqs| seqs.iter().copied().collect());
        let tasks = &mut self.tasks;
        let mut dropped = Vec::new();
        self.queue.retain(|id| {
            let t = &tasks[id];
            let drop = t.session == session && wanted.as_ref().is_none_or(|w| w.contains(&t.seq));
            if drop {
                dropped.push(t.seq);
                tasks.remove(id);
            }
            !drop
        });
        if let Some(sess) = self.sessions.get_mut(&session) {
            if sess.ordered && !dropped.is_empty() {
                sess.skipped.extend(dropped.iter().copied());
                Self::release_in_order(sess);
            }
        }
        dropped
    }

    /// Closes a session: queued tasks are dropped, later outcomes discarded, setups released.
    /// With `abort`, workers running its tasks are killed too.
    pub fn close_session(&mut self, session: SessionId, abort: bool) -> Vec<Action> {
        let mut out = Vec::new();
        let _dropped = self.cancel(session, None);
        let Some(sess) = self.sessions.remove(&session) else {
            return out;
        };
        if abort {
            let doomed: Vec<WorkerId> = self
                .workers
                .iter()
                .filter(|(_, w)| {
                    w.running
                        .iter()
                        .any(|t| self.tasks.get(t).is_some_and(|t| t.session == session))
                })
                .map(|(&id, _)| id)
                .collect();
            for id in doomed {
                self.doom(id);
                out.push(Action::Kill { worker: id });
            }
        }
        for setup in sess.setups {
            self.setups.remove(&setup);
            self.release_everywhere(setup, &mut out);
        }
        out
    }

    /// Takes the outcomes ready for a session, in the order the session promises.
    ///
    /// # Errors
    /// [`Error::Unknown`] if the session is closed.
    pub fn take_ready(&mut self, session: SessionId) -> Result<Vec<Outcome>> {
        let sess = self.sessions.get_mut(&session).ok_or(Error::Unknown {
            what: "session",
            id: session,
        })?;
        Ok(sess.ready.drain(..).collect())
    }

    /// Whether any open session limits dispatch by machine load or memory (the supervisor only
    /// measures the machine when one does).
    pub fn watches_machine(&self) -> bool {
        self.sessions
            .values()
            .any(|s| s.options.max_load.is_some() || s.options.max_used_memory.is_some())
    }

    /// The supervisor measured the machine: sessions over their limits hold their queued
    /// tasks; those back under them dispatch again.
    pub fn machine_state(&mut self, machine: Machine) -> Vec<Action> {
        self.machine = Some(machine);
        let mut out = Vec::new();
        self.dispatch(&mut out);
        out
    }

    fn throttled(&self, session: SessionId) -> bool {
        let Some(o) = self.sessions.get(&session).map(|s| &s.options) else {
            return false;
        };
        if o.max_load.is_none() && o.max_used_memory.is_none() {
            return false;
        }
        let Some(m) = self.machine else {
            return true; // not measured yet: hold back until we know
        };
        o.max_load.is_some_and(|l| m.load > l)
            || o.max_used_memory.is_some_and(|u| m.used_memory > u)
    }

    /// A worker we are about to kill gets no new task: the process may already be dead while
    /// its reader has not yet seen the end of its socket.
    fn doom(&mut self, worker: WorkerId) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.state = WorkerState::Retiring;
        }
    }

    /// Advances the clock: kills the workers of tasks that ran past their session's timeout.
    pub fn tick(&mut self, now_ns: u64) -> Vec<Action> {
        self.clock_ns = self.clock_ns.max(now_ns);
        let mut out = Vec::new();
        for (&id, w) in self.workers.iter_mut() {
            if w.kill_reason.is_some() {
                continue;
            }
            let Some(t) = w.running.first().and_then(|t| self.tasks.get(t)) else {
                continue;
            };
            let limit = self
                .sessions
                .get(&t.session)
                .and_then(|s| s.options.timeout_ns);
            if let Some(limit_ns) = limit {
                if now_ns.saturating_sub(t.started_ns) >= limit_ns {
                    w.kill_reason = Some(Status::TimedOut {
                        pid: w.pid,
                        limit_ns,
                    });
                    w.state = WorkerState::Retiring; // no new task for a doomed worker
                    out.push(Action::Kill { worker: id });
                }
            }
        }
        out
    }

    /// Workers whose memory must be watched now: those running a task of a session with a
    /// memory limit, with that limit.
    pub fn memory_watch(&self) -> Vec<(WorkerId, u64)> {
        let mut out = Vec::new();
        for (&id, w) in &self.workers {
            if w.kill_reason.is_some() {
                continue;
            }
            let limit = w
                .running
                .first()
                .and_then(|t| self.tasks.get(t))
                .and_then(|t| self.sessions.get(&t.session))
                .and_then(|s| s.options.max_rss_bytes);
            if let Some(limit) = limit {
                out.push((id, limit));
            }
        }
        out
    }

    /// The supervisor read a worker's resident memory (after [`Action::CheckMemory`], or
    /// while watching it). Over the limit, a busy worker is killed (its task fails with
    /// [`Status::MemoryExceeded`]) and an idle one is replaced.
    pub fn memory_report(&mut self, worker: WorkerId, rss: u64, limit: Option<u64>) -> Vec<Action> {
        let mut out = Vec::new();
        let watched = self
            .memory_watch()
            .into_iter()
            .find(|(w, _)| *w == worker)
            .map(|(_, l)| l);
        let Some(limit) = watched.or(limit) else {
            return out;
        };
        let Some(w) = self.workers.get_mut(&worker) else {
            return out;
        };
        if rss <= limit || w.kill_reason.is_some() {
            return out;
        }
        if w.running.is_empty() {
            if w.state == WorkerState::Ready {
                w.state = WorkerState::Retiring;
                out.push(Action::Retire { worker });
                self.dispatch(&mut out);
            }
        } else {
            w.kill_reason = Some(Status::MemoryExceeded {
                pid: w.pid,
                rss,
                limit,
            });
            w.state = WorkerState::Retiring; // no new task for a doomed worker
            out.push(Action::Kill { worker });
        }
        out
    }

    /// Retires workers idle for `idle_ns` or more while no work is queued.
    pub fn reap_idle(&mut self, now_ns: u64, idle_ns: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if !self.queue.is_empty() {
            return out;
        }
        for (&id, w) in self.workers.iter_mut() {
            if w.state == WorkerState::Ready
                && w.running.is_empty()
                && now_ns.saturating_sub(w.last_active_ns) >= idle_ns
            {
                w.state = WorkerState::Retiring;
                out.push(Action::Retire { worker: id });
            }
        }
        out
    }

    /// Number of workers by state: (starting, ready, retiring).
    pub fn worker_counts(&self) -> (usize, usize, usize) {
        let mut counts = (0, 0, 0);
        for w in self.workers.values() {
            match w.state {
                WorkerState::Starting => counts.0 += 1,
                WorkerState::Ready => counts.1 += 1,
                WorkerState::Retiring => counts.2 += 1,
            }
        }
        counts
    }

    /// Number of tasks queued and not yet given to a worker.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    fn deliver(&mut self, session: SessionId, outcome: Outcome, out: &mut Vec<Action>) {
        let Some(sess) = self.sessions.get_mut(&session) else {
            return; // closed: nobody wants it
        };
        let before = sess.ready.len();
        if sess.ordered {
            sess.parked.insert(outcome.seq, outcome);
            Self::release_in_order(sess);
        } else {
            sess.ready.push_back(outcome);
        }
        if sess.ready.len() > before {
            out.push(Action::Wake { session });
        }
    }

    fn release_in_order(sess: &mut Session) {
        loop {
            if let Some(o) = sess.parked.remove(&sess.next_out) {
                sess.ready.push_back(o);
            } else if !sess.skipped.remove(&sess.next_out) {
                break;
            }
            sess.next_out += 1;
        }
    }

    fn estimate(&self, task: &Task) -> Option<f64> {
        self.setups
            .get(&task.setup)
            .and_then(|s| s.timer.per_item_ns())
            .map(|per_item| per_item * task.weight as f64)
    }

    /// Picks the worker for a task: an idle one first, else the least loaded one whose pipeline
    /// stays under budget, if the task may be pipelined at all.
    ///
    /// Pipelining hides the round trip between tasks, which matters only for short tasks. It is
    /// also a bet that the estimate is right: a chunk of many items averages out the variance of
    /// single items, but a single heavy-tailed item may take fifty times the average, and
    /// anything queued behind it waits while other workers idle. So a task is pipelined only if
    /// it is cheap in absolute terms or holds many items.
    fn pick_worker(&self, est: Option<f64>, weight: u64, exclusive: bool) -> Option<WorkerId> {
        // Queue about two tasks' worth, and at least enough to cover a round trip. A deeper
        // pipeline buys nothing and makes every submit wake a writer thread; left in our queue,
        // tasks go out in batches as results come back.
        let budget = est.map_or(0.0, |cost| {
            (2.0 * cost).clamp(
                PIPELINE_MIN_BUDGET_NS,
                2.0 * self.config.policy.target_ns as f64,
            )
        });
        let mut best: Option<(WorkerId, f64)> = None;
        for (&id, w) in &self.workers {
            if w.state != WorkerState::Ready {
                continue;
            }
            if w.running.is_empty() {
                return Some(id);
            }
            if self.config.queue_any {
                if !exclusive
                    && !w.exclusive
                    && w.running.len() < self.config.max_tasks_per_worker
                    && best.is_none_or(|(_, held)| (w.running.len() as f64) < held)
                {
                    best = Some((id, w.running.len() as f64));
                }
                continue;
            }
            let Some(cost) = est else { continue };
            let pipelinable = cost <= PIPELINE_ANY_NS || weight >= PIPELINE_MIN_ITEMS;
            if !pipelinable
                || exclusive
                || w.exclusive
                || w.unknown_cost > 0
                || w.running.len() >= self.config.max_tasks_per_worker
            {
                continue;
            }
            if w.load_ns + cost <= budget && best.is_none_or(|(_, load)| w.load_ns < load) {
                best = Some((id, w.load_ns));
            }
        }
        best.map(|(id, _)| id)
    }

    fn dispatch(&mut self, out: &mut Vec<Action>) {
        // First in, first out, except that tasks of a session held back by machine limits wait
        // without blocking the tasks of other sessions behind them.
        let mut held: Vec<TaskId> = Vec::new();
        while let Some(&task_id) = self.queue.front() {
            // A task whose setup is gone (its session closed) can never run: drop it. The
            // engine's threads must not panic on a stale id.
            let Some(task) = self.tasks.get(&task_id) else {
                self.queue.pop_front();
                continue;
            };
            if self.throttled(task.session) {
                self.queue.pop_front();
                held.push(task_id);
                continue;
            }
            let Some(blob) = self.setups.get(&task.setup).map(|s| s.blob.clone()) else {
                self.queue.pop_front();
                self.tasks.remove(&task_id);
                continue;
            };
            let (est, weight, exclusive) = (self.estimate(task), task.weight, task.exclusive);
            let Some(worker) = self.pick_worker(est, weight, exclusive) else {
                break;
            };
            self.queue.pop_front();
            let task = self.tasks.get_mut(&task_id).expect("queued task exists");
            task.worker = Some(worker);
            task.est_ns = est;
            task.started_ns = self.clock_ns;
            let (setup, payload) = (task.setup, task.payload.clone());
            let w = self.workers.get_mut(&worker).expect("picked worker exists");
            if w.setups.insert(setup) {
                out.push(Action::SendSetup {
                    worker,
                    setup,
                    blob,
                });
            }
            w.running.push(task_id);
            w.exclusive = exclusive;
            match est {
                Some(cost) => w.load_ns += cost,
                None => w.unknown_cost += 1,
            }
            out.push(Action::SendTask {
                worker,
                task: task_id,
                setup,
                payload,
            });
        }
        for task_id in held.into_iter().rev() {
            self.queue.push_front(task_id);
        }
        // Grow the pool while work waits and slots are free; one start per waiting task.
        let starting = self.worker_counts().0;
        let mut wanted = self.queue.len().saturating_sub(starting);
        while wanted > 0 && self.live_workers() < self.config.max_workers {
            self.spawn(out);
            wanted -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(workers: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            max_workers: workers,
            ..SchedulerConfig::default()
        })
    }

    fn blob(s: &str) -> Arc<[u8]> {
        Arc::from(s.as_bytes())
    }

    fn spawned(actions: &[Action]) -> Vec<WorkerId> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Spawn { worker } => Some(*worker),
                _ => None,
            })
            .collect()
    }

    fn sent_tasks(actions: &[Action]) -> Vec<(WorkerId, TaskId)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::SendTask { worker, task, .. } => Some((*worker, *task)),
                _ => None,
            })
            .collect()
    }

    /// Submits `n` tasks, starts all requested workers, and returns (workers, task sends).
    fn start_with_tasks(
        s: &mut Scheduler,
        setup: SetupId,
        n: usize,
    ) -> (Vec<WorkerId>, Vec<(WorkerId, TaskId)>) {
        let mut actions = Vec::new();
        for i in 0..n {
            let (seq, acts) = s.submit(setup, 1, blob(&format!("t{i}"))).unwrap();
            assert_eq!(seq, i as u64);
            actions.extend(acts);
        }
        let workers = spawned(&actions);
        let mut sends = Vec::new();
        for (i, &w) in workers.iter().enumerate() {
            sends.extend(sent_tasks(&s.worker_started(w, 100 + i as u32, 0)));
        }
        (workers, sends)
    }

    #[test]
    fn spawns_on_demand_up_to_pool_size() {
        let mut s = sched(2);
        let sess = s.open_session(true);
        let setup = s.add_setup(sess, blob("f")).unwrap();
        let (workers, sends) = start_with_tasks(&mut s, setup, 5);
        assert_eq!(workers.len(), 2, "never more than the pool size");
        // Cost unknown: one task per worker.
        assert_eq!(sends.len(), 2);
        assert_eq!(s.queued(), 3);
    }

    #[test]
    fn setup_is_sent_once_per_worker_before_its_first_task() {
        let mut s = sched(1);
        let sess = s.open_session(false);
        let setup = s.add_setup(sess, blob("f")).unwrap();
        let (_, acts) = s.submit(setup, 1, blob("a")).unwrap();
        let w = spawned(&acts)[0];
        let acts = s.worker_started(w, 1, 0);
        assert!(
            matches!(acts[0], Action::SendSetup { worker, setup: st, .. } if worker == w && st == setup)
        );
        assert!(matches!(acts[1], Action::SendTask { .. }));
        let task = sent_tasks(&acts)[0].1;
        let (_, acts) = s.submit(setup, 1, blob("b")).unwrap();
        assert!(acts.is_empty(), "worker busy, cost unknown: wait");
        let acts = s.task_finished(w, task, 1000, b"r".to_vec(), 1);
        assert!(
            !acts.iter().any(|a| matches!(a, Action::SendSetup { .. })),
            "{acts:?}"
        );
        assert_eq!(sent_tasks(&acts).len(), 1);
    }

    #[test]
    fn ordered_session_releases_in_submission_order() {
        let mut s = sched(2);
        let sess = s.open_session(true);
        let setup = s.add_setup(sess, blob("f")).unwrap();
        let (_, sends) = start_with_tasks(&mut s, setup, 2);
        let (w0, t0) = sends[0];
        let (w1, t1) = sends[1];
        // Second task finishes first: nothing ready yet.
        s.task_finished(w1, t1, 10, b"second".to_vec(), 1);
        assert!(s.take_ready(sess).unwrap().is_empty());
        let acts = s.task_finished(w0, t0, 10, b"first".to_vec(), 2);
        assert!(acts.contains(&Action::Wake { session: sess }));
        let ready = s.take_ready(sess).unwrap();
        let payloads: Vec<_> = ready.iter().map(|o| o.payload.clone()).collect();
        assert_eq!(payloads, vec![b"first".to_vec(), b"second".to_vec()]);
        assert_eq!((ready[0].seq, ready[1].seq), (0, 1));
    }

    #[test]
    fn unordered_session_releases_in_completion_order() {
        let mut s = sched(2);
        let sess = s.open_session(false);
        let setup = s.add_setup(sess, blob("f")).unwrap();
        let (_, sends) = start_with_tasks(&mut s, setup, 2);
        s.task_finished(sends[1].0, sends[1].1, 10, b"b".to_vec(), 1);
        let ready = s.take_ready(sess).unwrap();
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].seq, 1);
    }

    #[test]
    fn known_short_tasks_are_pipelined_long_ones_are_not() {
        let mut s = sched(1);
        let sess = s.open_session(false);
        let setup = s.add_setup(sess, blob("f")).unwrap();
        let (workers, sends) = start_with_tasks(&mut s, setup, 1);
        let w = workers[0];
        // Teach it that an item costs 10 us.
        s.task_finished(w, sends[0].1, 10_000, Vec::new(), 1);
        let mut in_flight = 0;
        for _ in 0..10 {
            let (_, acts) = s.submit(setup, 1, blob("x")).unwrap();
            in_flight += sent_tasks(&acts).len();
        }
        assert_eq!(in_flight, 10, "short tasks all go to the worker at once");

        let mut s = sched(1);
        let sess = s.open_session(false);
        let setup = s.add_setup(sess, blob("f")).unwrap();
        let (workers, sends) = start_with_tasks(&mut s, setup, 1);
        s.task_finished(workers[0], sends[0].1, 50_000_000, Vec::new(), 1);
        let mut in_flight = 0;
        for _ in 0..3 {
            let (_, acts) = s.submit(setup, 1, blob("x")).unwrap();
            in_flight += sent_tasks(&acts).len();
        }
        assert_eq!(in_flight, 1, "a 50 ms task is not queued behind another");

        // A 3 ms single item fits the budget but is not pipelined: one heavy-tailed item could
        // hold up whatever queues behind it. A chunk of 10 such-sized items is.
        let mut s = sched(1);
        let sess = s.open_session(false);
        let setup = s.add_setup(sess, blob("f")).unwrap();
        let (workers, sends) = start_with_tasks(&mut s, setup, 1);
        s.task_finished(workers[0], sends[0].1, 300_000, Vec::new(), 1);
        let (_, acts) = s.submit(setup, 1, blob("x")).unwrap();
        assert_eq!(sent_tasks(&acts).len(), 1, "idle worker takes it");
        let (_, acts) = s.submit(setup, 10, blob("y")).unwrap();
        assert_eq!(
            sent_tasks(&acts).len(),
            1,
            "3 ms chunk of 10 items: pipelined"
        );
        let mut s2 = sched(1);
        let sess2 = s2.open_session(false);
        let setup2 = s2.add_setup(sess2, blob("f")).unwrap();
        let (w2, sends2) = start_with_tasks(&mut s2, setup2, 1);
        s2.task_finished(w2[0], sends2[0].1, 3_000_000, Vec::new(), 1);
        s2.submit(setup2, 1, blob("x")).unwrap();
        let (_, acts) = s2.submit(setup2, 1, blob("y")).unwrap();
        assert!(
            sent_tasks(&acts).is_empty(),
            "3 ms single item: not pipelined"
        );
    }

    #[test]
    fn lost_worker_fails_its_tasks_and_is_replaced() {
        let mut s = sched(1);
        let sess = s.open_session(false);
        let setup = s.add_setup(sess, blob("f")).unwrap();
        let (workers, sends) = start_with_tasks(&mut s, setup, 2);
        let acts = s.worker_lost(workers[0], "killed by signal 9 (SIGKILL)".into());
        let ready = s.take_ready(sess).unwrap();
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].seq, 0);
        assert_eq!(
            ready[0].status,
            Status::WorkerLost {
                pid: Some(100),
                exit: "killed by signal 9 (SIGKILL)".into()
            }
        );
        assert_eq!(sends.len(), 1);
        // The queued task needs a worker: a replacement is requested, and gets the setup again.
        let new = spawned(&acts);
        assert_eq!(new.len(), 1);
        let acts = s.worker_started(new[0], 200, 5);
        assert!(matches!(acts[0], Action::SendSetup { .. }));
        assert_eq!(sent_tasks(&acts).len(), 1);
    }

    #[test]
    fn partial_reports_reach_the_session_and_pin_the_blame_on_their_task() {
        let mut s = sched(1);
        let sess = s.open_session(false);
        let setup = s.add_setup(sess, blob("f")).unwrap();
        let (workers, sends) = start_with_tasks(&mut s, setup, 1);
        s.task_finished(workers[0], sends[0].1, 1_000, Vec::new(), 1);
        assert_eq!(s.take_ready(sess).unwrap().len(), 1);
        let mut piped = Vec::new();
        for _ in 0..3 {
            piped.extend(sent_tasks(&s.submit(setup, 10, blob("x")).unwrap().1));
        }
        assert_eq!(piped.len(), 3, "pipelined on the one worker");
        // The first task reports 4 finished items and goes on.
        let acts = s.task_partial(workers[0], piped[0].1, 4, b"p".to_vec(), Vec::new());
        assert!(acts.iter().any(|a| matches!(a, Action::Wake { .. })));
        // A report from a worker that does not hold the task is ignored.
        assert!(s
            .task_partial(workers[0] + 99, piped[0].1, 1, Vec::new(), Vec::new())
            .is_empty());
        let ready = s.take_ready(sess).unwrap();
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].status, Status::Partial { items: 4 });
        assert_eq!(ready[0].payload, b"p");
        // The worker dies: the reporting task was the one running, so it alone is blamed and
        // not run again; the two behind it are queued again as ordinary tasks.
        s.worker_lost(workers[0], "killed by signal 11 (SIGSEGV)".into());
        let ready = s.take_ready(sess).unwrap();
        assert_eq!(ready.len(), 1);
        assert!(matches!(ready[0].status, Status::WorkerLost { .. }));
        assert_eq!(s.queued(), 2);
    }

    #[test]
    fn a_crash_with_a_pipeline_reruns_each_task_alone() {
        let mut s = sched(1);
        let sess = s.open_session(true);
        let setup = s.add_setup(sess, blob("f")).unwrap();
        let (workers, sends) = start_with_tasks(&mut s, setup, 1);
        s.task_finished(workers[0], sends[0].1, 1_000, Vec::new(), 1);
        assert_eq!(s.take_ready(sess).unwrap().len(), 1);
        let mut piped = Vec::new();
        for _ in 0..3 {
            piped.extend(sent_tasks(&s.submit(setup, 1, blob("x")).unwrap().1));
        }
        assert_eq!(piped.len(), 3, "pipelined on the one worker");
        let acts = s.worker_lost(workers[0], "killed by signal 11 (SIGSEGV)".into());
        assert!(
            s.take_ready(sess).unwrap().is_empty(),
            "nobody is blamed yet"
        );
        assert_eq!(s.queued(), 3);
        // The replacement gets the suspects one at a time, in order.
        let w = spawned(&acts)[0];
        let acts = s.worker_started(w, 9, 2);
        let first = sent_tasks(&acts);
        assert_eq!(first, vec![(w, piped[0].1)]);
        let acts = s.task_finished(w, piped[0].1, 1_000, Vec::new(), 3);
        assert_eq!(
            sent_tasks(&acts),
            vec![(w, piped[1].1)],
            "still one at a time"
        );
        // The second one crashes again, alone: it is the culprit.
        let acts = s.worker_lost(w, "killed by signal 11 (SIGSEGV)".into());
        let ready = s.take_ready(sess).unwrap();
        assert_eq!(ready.len(), 2);
        assert_eq!(ready[0].status, Status::Done);
        assert!(matches!(
            ready[1].status,
            Status::WorkerLost { pid: Some(9), .. }
        ));
        let w = spawned(&acts)[0];
        assert_eq!(
            sent_tasks(&s.worker_started(w, 10, 4)),
            vec![(w, piped[2].1)]
        );
    }

    #[test]
    fn repeated_start_failures_fail_the_queue_instead_of_looping() {
        let mut s = sched(1);
        let sess = s.open_session(true);
        let setup = s.add_setup(sess, blob("f")).unwrap();
        let (_, acts) = s.submit(setup, 1, blob("a")).unwrap();
        let mut worker = spawned(&acts)[0];
        for round in 0..3 {
            let acts = s.worker_lost(worker, "exit code 1".into());
            if round < 2 {
                worker = spawned(&acts)[0];
            } else {
                assert!(spawned(&acts).is_empty());
            }
        }
        let ready = s.take_ready(sess).unwrap();
        assert_eq!(ready.len(), 1);
        assert!(matches!(&ready[0].status, Status::StartFailed(m) if m.contains("exit code 1")));
    }

    #[test]
    fn cancel_drops_chosen_queued_tasks_and_ordering_skips_them() {
        let mut s = sched(1);
        let sess = s.open_session(true);
        let setup = s.add_setup(sess, blob("f")).unwrap();
        let (workers, sends) = start_with_tasks(&mut s, setup, 5);
        assert_eq!(s.queued(), 4);
        assert_eq!(
            s.cancel(sess, Some(&[0, 1, 3])),
            vec![1, 3],
            "seq 0 was already sent to a worker: it is not dropped"
        );
        assert_eq!(s.queued(), 2, "seq 2 and 4 stay");
        let acts = s.task_finished(workers[0], sends[0].1, 5, Vec::new(), 1);
        let next: Vec<TaskId> = sent_tasks(&acts).into_iter().map(|(_, t)| t).collect();
        assert_eq!(next.len(), 2, "cheap known tasks are pipelined");
        for t in next {
            s.task_finished(workers[0], t, 5, Vec::new(), 2);
        }
        let seqs: Vec<u64> = s.take_ready(sess).unwrap().iter().map(|o| o.seq).collect();
        assert_eq!(
            seqs,
            vec![0, 2, 4],
            "the cancelled 1 and 3 do not hold back 2 and 4"
        );
        assert!(s.cancel(sess, None).is_empty());
        assert_eq!(s.queued(), 0);
    }

    #[test]
    fn close_session_releases_setups_and_discards_late_results() {
        let mut s = sched(1);
        let sess = s.open_session(false);
        let setup = s.add_setup(sess, blob("f")).unwrap();
        let (workers, sends) = start_with_tasks(&mut s, setup, 3);
        let acts = s.close_session(sess, false);
        assert!(acts.contains(&Action::SendRelease {
            worker: workers[0],
            setup
        }));
        assert_eq!(s.queued(), 0);
        let acts = s.task_finished(workers[0], sends[0].1, 5, Vec::new(), 1);
        assert!(!acts.iter().any(|a| matches!(a, Action::Wake { .. })));
        assert!(s.take_ready(sess).is_err());
        assert!(s.submit(setup, 1, blob("x")).is_err());
    }

    #[test]
    fn abort_kills_workers_running_the_session() {
        let mut s = sched(2);
        let a = s.open_session(false);
        let b = s.open_session(false);
        let sa = s.add_setup(a, blob("f")).unwrap();
        let sb = s.add_setup(b, blob("g")).unwrap();
        let (_, acts_a) = s.submit(sa, 1, blob("x")).unwrap();
        let (_, acts_b) = s.submit(sb, 1, blob("y")).unwrap();
        let wa = spawned(&acts_a)[0];
        let wb = spawned(&acts_b)[0];
        s.worker_started(wa, 1, 0);
        s.worker_started(wb, 2, 0);
        let acts = s.close_session(a, true);
        assert!(acts.contains(&Action::Kill { worker: wa }));
        assert!(!acts.contains(&Action::Kill { worker: wb }));
        // Until its death is noticed, the killed worker gets nothing new, even once idle.
        let c = s.open_session(false);
        let sc = s.add_setup(c, blob("h")).unwrap();
        let (_, acts) = s.submit(sc, 1, blob("z")).unwrap();
        assert!(!sent_tasks(&acts).iter().any(|(w, _)| *w == wa), "{acts:?}");
    }

    #[test]
    fn idle_workers_retire_after_timeout() {
        let mut s = sched(1);
        let sess = s.open_session(false);
        let setup = s.add_setup(sess, blob("f")).unwrap();
        let (workers, sends) = start_with_tasks(&mut s, setup, 1);
        s.task_finished(workers[0], sends[0].1, 5, Vec::new(), 1_000);
        assert!(s.reap_idle(1_500, 1_000).is_empty());
        assert_eq!(
            s.reap_idle(2_000, 1_000),
            vec![Action::Retire { worker: workers[0] }]
        );
        assert_eq!(s.worker_counts(), (0, 0, 1));
        // New work starts a fresh worker rather than waiting for the retiring one.
        let (_, acts) = s.submit(setup, 1, blob("x")).unwrap();
        assert_eq!(spawned(&acts).len(), 1);
    }

    #[test]
    fn chunk_size_learns_from_results() {
        let mut s = sched(2);
        let sess = s.open_session(true);
        let setup = s.add_setup(sess, blob("f")).unwrap();
        assert_eq!(s.chunk_size(setup, Some(100_000)), 1);
        let (workers, sends) = start_with_tasks(&mut s, setup, 1);
        s.task_finished(workers[0], sends[0].1, 200, Vec::new(), 1);
        assert!(s.chunk_size(setup, None) > 1000);
        assert_eq!(
            s.chunk_size(setup, Some(8)),
            8,
            "tiny items: the tail is not split"
        );
    }

    #[test]
    fn a_hint_skips_the_probe_but_stays_conservative_until_a_chunk_reports() {
        let mut s = sched(2);
        let sess = s.open_session(true);
        let setup = s.add_setup(sess, blob("f")).unwrap();
        assert_eq!(s.item_ns(setup), None);
        s.hint_setup(setup, 100.0); // an earlier call measured 100 ns per item
        let hinted = s.chunk_size(setup, None);
        assert!(hinted > 1, "no single-item probe with a hint");
        // HINT_SHARE: the first chunks are sized as if items cost 8x the hint.
        assert_eq!(hinted, (4_000_000.0 / (100.0 * HINT_SHARE)) as usize);
        assert_eq!(s.item_ns(setup), None, "a hint is not a measurement");
        let (workers, sends) = start_with_tasks(&mut s, setup, 1);
        s.task_finished(workers[0], sends[0].1, 2_000_000, Vec::new(), 1);
        assert_eq!(
            s.item_ns(setup),
            Some(2_000_000.0),
            "the measurement replaces the hint"
        );
        assert_eq!(s.chunk_size(setup, None), 2, "4 ms target / 2 ms per item");
        // A hint after a measurement changes nothing.
        s.hint_setup(setup, 1.0);
        assert_eq!(s.chunk_size(setup, None), 2);
    }

    fn limited(options: SessionOptions) -> (Scheduler, SessionId, SetupId) {
        let mut s = sched(1);
        let sess = s.open_session_with(options);
        let setup = s.add_setup(sess, blob("f")).unwrap();
        (s, sess, setup)
    }

    #[test]
    fn a_task_past_its_timeout_is_killed_and_reported() {
        let (mut s, sess, setup) = limited(SessionOptions {
            timeout_ns: Some(1_000),
            ..SessionOptions::default()
        });
        assert_eq!(s.chunk_size(setup, Some(1_000)), 1, "timeouts are per item");
        let (workers, sends) = start_with_tasks(&mut s, setup, 1);
        // Known-cheap tasks of a timed session are still not pipelined.
        s.task_finished(workers[0], sends[0].1, 10, Vec::new(), 100);
        let (_, acts) = s.submit(setup, 1, blob("a")).unwrap();
        assert_eq!(sent_tasks(&acts).len(), 1);
        let (_, acts) = s.submit(setup, 1, blob("b")).unwrap();
        assert!(sent_tasks(&acts).is_empty());
        assert!(s.tick(600).is_empty(), "within the limit");
        assert_eq!(s.tick(1_200), vec![Action::Kill { worker: workers[0] }]);
        assert!(s.tick(5_000).is_empty(), "killed once");
        s.worker_lost(workers[0], "killed by signal 9 (SIGKILL)".into());
        let ready = s.take_ready(sess).unwrap();
        assert_eq!(
            ready.last().unwrap().status,
            Status::TimedOut {
                pid: Some(100),
                limit_ns: 1_000
            }
        );
        assert_eq!(s.queued(), 1, "the next task waits for a fresh worker");
    }

    #[test]
    fn workers_are_recycled_after_n_items() {
        let (mut s, _sess, setup) = limited(SessionOptions {
            max_items_per_worker: Some(3),
            ..SessionOptions::default()
        });
        assert_eq!(s.chunk_size(setup, None), 1);
        let (workers, sends) = start_with_tasks(&mut s, setup, 1);
        let w = workers[0];
        let acts = s.task_finished(w, sends[0].1, 10, Vec::new(), 1);
        assert_eq!(
            s.chunk_size(setup, None),
            1,
            "one at a time: no worker runs more than n"
        );
        assert!(!acts.contains(&Action::Retire { worker: w }));
        let (_, acts) = s.submit(setup, 2, blob("x")).unwrap();
        let t = sent_tasks(&acts)[0].1;
        let acts = s.task_finished(w, t, 10, Vec::new(), 2);
        assert!(
            acts.contains(&Action::Retire { worker: w }),
            "3 items done: recycle"
        );
        let (_, acts) = s.submit(setup, 1, blob("y")).unwrap();
        assert_eq!(spawned(&acts).len(), 1, "a replacement starts for new work");
        assert!(
            sent_tasks(&acts).is_empty(),
            "nothing goes to the retiring worker"
        );
    }

    #[test]
    fn memory_limits_kill_busy_workers_and_replace_idle_ones() {
        let (mut s, sess, setup) = limited(SessionOptions {
            max_rss_bytes: Some(1_000),
            ..SessionOptions::default()
        });
        let (workers, sends) = start_with_tasks(&mut s, setup, 1);
        let w = workers[0];
        assert_eq!(s.memory_watch(), vec![(w, 1_000)]);
        assert!(s.memory_report(w, 900, None).is_empty());
        assert_eq!(
            s.memory_report(w, 5_000, None),
            vec![Action::Kill { worker: w }]
        );
        s.worker_lost(w, "killed by signal 9 (SIGKILL)".into());
        let ready = s.take_ready(sess).unwrap();
        assert_eq!(
            ready[0].status,
            Status::MemoryExceeded {
                pid: Some(100),
                rss: 5_000,
                limit: 1_000
            }
        );
        let _ = sends;
        // After a task, an over-limit idle worker is replaced rather than killed.
        let (_, acts) = s.submit(setup, 1, blob("x")).unwrap();
        let w2 = spawned(&acts)[0];
        let t = sent_tasks(&s.worker_started(w2, 7, 10))[0].1;
        let acts = s.task_finished(w2, t, 10, Vec::new(), 11);
        assert!(acts.contains(&Action::CheckMemory {
            worker: w2,
            limit: 1_000
        }));
        assert_eq!(
            s.memory_report(w2, 2_000, Some(1_000)),
            vec![Action::Retire { worker: w2 }]
        );
    }

    #[test]
    fn a_pipeline_of_a_closed_session_is_dropped_when_its_worker_dies() {
        let mut s = sched(1);
        let a = s.open_session(false);
        let sa = s.add_setup(a, blob("f")).unwrap();
        let (workers, sends) = start_with_tasks(&mut s, sa, 1);
        s.task_finished(workers[0], sends[0].1, 10, Vec::new(), 1);
        for _ in 0..3 {
            s.submit(sa, 1, blob("x")).unwrap();
        }
        s.close_session(a, true);
        let b = s.open_session(false);
        let sb = s.add_setup(b, blob("g")).unwrap();
        // The doomed worker no longer counts: a replacement is asked for at once.
        let (_, acts) = s.submit(sb, 1, blob("y")).unwrap();
        let w = spawned(&acts)[0];
        // The worker dies with three tasks of the closed session in its pipeline.
        s.worker_lost(workers[0], "killed by signal 9 (SIGKILL)".into());
        assert_eq!(s.queued(), 1, "only the live session's task remains");
        let acts = s.worker_started(w, 2, 3);
        assert_eq!(sent_tasks(&acts).len(), 1);
        assert!(acts
            .iter()
            .all(|a| !matches!(a, Action::SendSetup { setup, .. } if *setup == sa)));
    }

    #[test]
    fn machine_limits_hold_back_only_their_session() {
        let mut s = sched(2);
        let limited = s.open_session_with(SessionOptions {
            max_load: Some(0.5),
            max_used_memory: Some(1_000),
            ..SessionOptions::default()
        });
        let free = s.open_session(false);
        assert!(s.watches_machine());
        assert!(s.throttled(limited), "unmeasured: wait");
        assert!(!s.throttled(free));
        let sl = s.add_setup(limited, blob("f")).unwrap();
        let sf = s.add_setup(free, blob("g")).unwrap();
        s.machine_state(Machine {
            load: 0.9,
            used_memory: 10,
        });
        let (_, a1) = s.submit(sl, 1, blob("a")).unwrap();
        let (_, a2) = s.submit(sf, 1, blob("b")).unwrap();
        let mut acts = a1;
        acts.extend(a2);
        let workers = spawned(&acts);
        let mut sent = Vec::new();
        for (i, w) in workers.iter().enumerate() {
            sent.extend(sent_tasks(&s.worker_started(*w, i as u32, 0)));
        }
        assert_eq!(sent.len(), 1, "the free session runs; the loaded one waits");
        assert_eq!(s.queued(), 1);
        // Memory over its limit also holds it.
        let acts = s.machine_state(Machine {
            load: 0.1,
            used_memory: 5_000,
        });
        assert!(sent_tasks(&acts).is_empty());
        let acts = s.machine_state(Machine {
            load: 0.1,
            used_memory: 10,
        });
        assert_eq!(
            sent_tasks(&acts).len(),
            1,
            "back under both limits: dispatched"
        );
    }

    #[test]
    fn queue_any_queues_long_and_unknown_tasks_on_the_least_busy_worker() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_workers: 2,
            queue_any: true,
            ..SchedulerConfig::default()
        });
        let sess = s.open_session(false);
        let setup = s.add_setup(sess, blob("f")).unwrap();
        // Two tasks of unknown cost, one per worker; then three more queue behind them.
        let (workers, sends) = start_with_tasks(&mut s, setup, 2);
        assert_eq!(sends.len(), 2);
        let mut queued = Vec::new();
        for i in 0..3 {
            let (_, acts) = s.submit(setup, 1, blob(&format!("q{i}"))).unwrap();
            queued.extend(sent_tasks(&acts));
        }
        assert_eq!(
            queued.len(),
            3,
            "unknown-cost tasks are queued on busy workers"
        );
        let on = |w| queued.iter().filter(|(x, _)| *x == w).count();
        assert_eq!(on(workers[0]) + on(workers[1]), 3);
        assert!(
            on(workers[0]).abs_diff(on(workers[1])) <= 1,
            "the least busy takes it"
        );
        // A known 50 ms task also queues (the plain rule would keep it back).
        s.task_finished(workers[0], sends[0].1, 50_000_000, Vec::new(), 1);
        let (_, acts) = s.submit(setup, 1, blob("long")).unwrap();
        assert_eq!(sent_tasks(&acts).len(), 1, "a long task queues too");
        // Exclusive tasks still never share a worker.
        let (_, acts) = s.submit_with(setup, 1, blob("ex"), true).unwrap();
        assert!(
            sent_tasks(&acts).is_empty(),
            "an exclusive task waits for an idle worker"
        );
    }

    #[test]
    fn exclusive_tasks_are_never_pipelined() {
        let mut s = sched(1);
        let sess = s.open_session(false);
        let setup = s.add_setup(sess, blob("f")).unwrap();
        let (workers, sends) = start_with_tasks(&mut s, setup, 1);
        s.task_finished(workers[0], sends[0].1, 10, Vec::new(), 1);
        let (_, acts) = s.submit_with(setup, 1, blob("a"), true).unwrap();
        assert_eq!(sent_tasks(&acts).len(), 1);
        let (_, acts) = s.submit(setup, 1, blob("b")).unwrap();
        assert!(
            sent_tasks(&acts).is_empty(),
            "nothing queues behind an exclusive task"
        );
    }
}
