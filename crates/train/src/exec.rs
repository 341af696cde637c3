//! Where the loops of a run execute: the store's, the fabric root's and the
//! workers'. They are written as futures that await their channels and
//! links, so the same code runs in two ways:
//!
//! - **threads**: each loop on a thread of its own, blocked on its future
//!   (`pollster`); the driver blocks on its replies. Every run does this.
//! - **simulated**: every loop, every node of the tree and every simulated
//!   link on the driver's thread, in one `LocalSet` on a current-thread
//!   tokio runtime whose clock is paused. Nothing runs except while the
//!   driver waits for a reply; time moves only when every task waits, and
//!   then straight to the next timer (a link's seeded delay). A run is then
//!   a function of its seeds (DESIGN.md, "The fabric"; STYLE.md on
//!   deterministic simulation).

use crate::TrainError;
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

/// The simulator's thread: its runtime and the set its loops run in.
pub(crate) struct Sim {
    /// First field: its tasks are dropped before the runtime they ran on.
    local: tokio::task::LocalSet,
    rt: tokio::runtime::Runtime,
    /// The virtual clock's reading at the start.
    start: tokio::time::Instant,
}

/// Where the loops of a run execute.
#[derive(Clone)]
pub(crate) enum Exec {
    /// Each loop on a thread of its own.
    Threads,
    /// All on the driver's thread, under a paused clock.
    Sim(Rc<Sim>),
}

/// A loop started by [`Exec::spawn`].
pub(crate) enum Task<T> {
    Thread(std::thread::JoinHandle<T>),
    /// A task of the simulator, which runs it while anyone waits.
    Local(tokio::task::JoinHandle<T>, Rc<Sim>),
}

impl Sim {
    /// Runs the simulation until `fut` completes.
    fn block_on<F: Future>(&self, fut: F) -> F::Output {
        self.local.block_on(&self.rt, fut)
    }

    /// Runs the simulation until `fut` completes or `limit` of simulated
    /// time has passed (`None`).
    fn block_on_within<F: Future>(&self, limit: Duration, fut: F) -> Option<F::Output> {
        self.block_on(async { tokio::time::timeout(limit, fut).await.ok() })
    }
}

impl Exec {
    /// A fresh simulator: a current-thread runtime, its clock paused.
    pub fn simulated() -> Result<Exec, TrainError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .map_err(|e| TrainError::Config(format!("cannot start the simulator: {e}")))?;
        let start = {
            let _clock = rt.enter();
            tokio::time::Instant::now()
        };
        Ok(Exec::Sim(Rc::new(Sim { local: tokio::task::LocalSet::new(), rt, start })))
    }

    /// The simulated time since the simulator started (`None`: threads).
    pub fn elapsed(&self) -> Option<Duration> {
        match self {
            Exec::Threads => None,
            Exec::Sim(s) => {
                let _clock = s.rt.enter();
                Some(s.start.elapsed())
            }
        }
    }

    /// The simulator's runtime (where the tree's nodes and links run).
    pub fn sim_runtime(&self) -> Option<&tokio::runtime::Runtime> {
        match self {
            Exec::Threads => None,
            Exec::Sim(s) => Some(&s.rt),
        }
    }

    /// The next message on `rx`, waiting at most `limit` (`None`: no
    /// limit): blocked (threads), or running the simulation, whose clock is
    /// virtual and passes only while every loop waits.
    pub fn recv<T>(&self, rx: &flume::Receiver<T>, limit: Option<Duration>) -> Result<T, flume::RecvTimeoutError> {
        use flume::RecvTimeoutError::{Disconnected, Timeout};
        match (self, limit) {
            (Exec::Threads, None) => rx.recv().map_err(|_| Disconnected),
            (Exec::Threads, Some(limit)) => rx.recv_timeout(limit),
            (Exec::Sim(s), None) => s.block_on(rx.recv_async()).map_err(|_| Disconnected),
            (Exec::Sim(s), Some(limit)) => match s.block_on_within(limit, rx.recv_async()) {
                Some(r) => r.map_err(|_| Disconnected),
                None => Err(Timeout),
            },
        }
    }

    /// Starts the loop `make` builds: on a new thread named `name`, or as a
    /// task of the simulator.
    pub fn spawn<T, F, Fut>(&self, name: String, make: F) -> Result<Task<T>, TrainError>
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        match self {
            Exec::Threads => std::thread::Builder::new()
                .name(name)
                .spawn(move || pollster::block_on(make()))
                .map(Task::Thread)
                .map_err(|e| TrainError::Config(format!("cannot start a thread: {e}"))),
            Exec::Sim(s) => Ok(Task::Local(s.local.spawn_local(make()), s.clone())),
        }
    }

    /// Waits up to `limit` for every loop of `tasks` to end (running the
    /// simulation meanwhile); whether they all did. Loops still running
    /// then are left to end on their own.
    pub fn join_all<T>(&self, tasks: Vec<Task<T>>, limit: Duration) -> bool {
        match self {
            Exec::Threads => {
                let deadline = std::time::Instant::now() + limit;
                while tasks.iter().any(|t| !t.is_finished()) {
                    if std::time::Instant::now() > deadline {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                for t in tasks {
                    let _ = t.join();
                }
                true
            }
            Exec::Sim(s) => {
                let all = async {
                    for t in tasks {
                        if let Task::Local(h, _) = t {
                            let _ = h.await;
                        }
                    }
                };
                s.block_on_within(limit, all).is_some()
            }
        }
    }
}

impl<T> Task<T> {
    pub fn is_finished(&self) -> bool {
        match self {
            Task::Thread(h) => h.is_finished(),
            Task::Local(h, _) => h.is_finished(),
        }
    }

    /// Waits for the loop's end (running the simulation meanwhile); `None`
    /// if it panicked.
    pub fn join(self) -> Option<T> {
        match self {
            Task::Thread(h) => h.join().ok(),
            Task::Local(h, sim) => sim.block_on(h).ok(),
        }
    }
}
