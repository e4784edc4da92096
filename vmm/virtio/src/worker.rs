//! The per-device worker thread.
//!
//! A [`Worker`] owns one thread that waits in `epoll` on the file
//! descriptors a device registers (queue notify eventfds, backend fds such as
//! a TAP) plus a kill eventfd. Each ready descriptor is handed to the
//! device's [`EventHandler`] by its token. The queue logic itself lives in
//! the device's handler and never sees epoll.
//!
//! Before waiting, the thread runs the optional [`ThreadInit`] hook (the VMM
//! installs its seccomp filter there); if the hook fails the thread exits and
//! [`Worker::spawn`] reports the error.

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::chain::QueueError;
use crate::ratelimit::LogRateLimiter;
use crate::{ActivatedQueue, GuestMemoryMmap, InterruptKind, VirtioInterrupt};

/// Hook run first on every device thread (for example to install seccomp).
pub type ThreadInit = Arc<dyn Fn() -> io::Result<()> + Send + Sync>;

/// Token reserved for the kill eventfd.
const KILL_TOKEN: u64 = u64::MAX;
/// Events fetched per `epoll_wait`.
const EVENT_BATCH: usize = 16;

/// Errors starting a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Creating the epoll instance or the kill eventfd failed.
    #[error("cannot create epoll or kill eventfd")]
    Setup(#[source] io::Error),
    /// Registering a file descriptor with epoll failed.
    #[error("cannot register fd {fd} with epoll")]
    Register {
        /// The file descriptor.
        fd: RawFd,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The OS refused to create the thread.
    #[error("cannot spawn thread")]
    Spawn(#[source] io::Error),
    /// The thread-init hook failed.
    #[error("thread init hook failed")]
    Init(#[source] io::Error),
    /// The thread died before reporting whether its init hook succeeded.
    #[error("worker thread exited during init")]
    InitLost,
}

impl From<WorkerError> for io::Error {
    fn from(e: WorkerError) -> Self {
        match e {
            WorkerError::Setup(e) | WorkerError::Spawn(e) | WorkerError::Init(e) => e,
            WorkerError::Register { source, .. } => source,
            WorkerError::InitLost => io::Error::other("worker thread exited during init"),
        }
    }
}

/// Options given to a device at construction that shape its worker thread.
#[derive(Clone, Default)]
pub struct WorkerOptions {
    /// Run first on the worker thread; an error aborts activation.
    pub thread_init: Option<ThreadInit>,
}

impl WorkerOptions {
    /// Options with a thread-init hook.
    pub fn with_thread_init(thread_init: ThreadInit) -> Self {
        WorkerOptions {
            thread_init: Some(thread_init),
        }
    }
}

impl fmt::Debug for WorkerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerOptions")
            .field("thread_init", &self.thread_init.is_some())
            .finish()
    }
}

/// A file descriptor the worker waits on, and the token its events carry.
#[derive(Clone, Copy, Debug)]
pub struct Source {
    /// The file descriptor; must stay open while the worker runs.
    pub fd: RawFd,
    /// Passed back to [`EventHandler::handle_event`]; `u64::MAX` is reserved.
    pub token: u64,
    /// Events to wait for (for example `EventSet::IN`).
    pub events: EventSet,
}

/// The device side of a worker: reacts to ready file descriptors.
pub trait EventHandler: Send + 'static {
    /// Called once on the worker thread before the first wait, so a device
    /// picks up buffers the driver made available before activation.
    fn on_start(&mut self) {}
    /// Called for each ready source, with its token and the ready events.
    fn handle_event(&mut self, token: u64, events: EventSet);
}

/// A running worker thread; [`Worker::stop`] (or drop) ends it and joins.
pub struct Worker<H: EventHandler> {
    kill: EventFd,
    thread: Option<JoinHandle<H>>,
}

impl<H: EventHandler> fmt::Debug for Worker<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl<H: EventHandler> Worker<H> {
    /// Starts a thread named `name` that runs `options.thread_init`, then
    /// dispatches events of `sources` to `handler` until stopped.
    pub fn spawn(
        name: &str,
        handler: H,
        sources: &[Source],
        options: &WorkerOptions,
    ) -> Result<Self, WorkerError> {
        let kill = EventFd::new(EFD_NONBLOCK).map_err(WorkerError::Setup)?;
        let epoll = build_epoll(&kill, sources)?;
        let init = options.thread_init.clone();
        let (init_tx, init_rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run(epoll, handler, init, init_tx))
            .map_err(WorkerError::Spawn)?;
        let mut worker = Worker {
            kill,
            thread: Some(thread),
        };
        match init_rx.recv() {
            Ok(Ok(())) => Ok(worker),
            Ok(Err(e)) => {
                worker.join();
                Err(WorkerError::Init(e))
            }
            Err(_) => {
                worker.join();
                Err(WorkerError::InitLost)
            }
        }
    }

    /// Signals the thread to exit, joins it and returns the handler (None if
    /// the thread had panicked or was already stopped).
    pub fn stop(mut self) -> Option<H> {
        self.join()
    }

    fn join(&mut self) -> Option<H> {
        let thread = self.thread.take()?;
        if let Err(e) = self.kill.write(1) {
            tracing::error!(error = %e, "cannot signal worker kill eventfd");
        }
        match thread.join() {
            Ok(handler) => Some(handler),
            Err(_) => {
                tracing::error!("device worker thread panicked");
                None
            }
        }
    }
}

impl<H: EventHandler> Drop for Worker<H> {
    fn drop(&mut self) {
        self.join();
    }
}

fn build_epoll(kill: &EventFd, sources: &[Source]) -> Result<Epoll, WorkerError> {
    let epoll = Epoll::new().map_err(WorkerError::Setup)?;
    let kill_source = Source {
        fd: std::os::fd::AsRawFd::as_raw_fd(kill),
        token: KILL_TOKEN,
        events: EventSet::IN,
    };
    for source in sources.iter().chain(std::iter::once(&kill_source)) {
        epoll
            .ctl(
                ControlOperation::Add,
                source.fd,
                EpollEvent::new(source.events, source.token),
            )
            .map_err(|e| WorkerError::Register {
                fd: source.fd,
                source: e,
            })?;
    }
    Ok(epoll)
}

fn run<H: EventHandler>(
    epoll: Epoll,
    mut handler: H,
    init: Option<ThreadInit>,
    init_tx: mpsc::SyncSender<io::Result<()>>,
) -> H {
    let init_result = init.map_or(Ok(()), |hook| hook());
    let failed = init_result.is_err();
    // The spawner is blocked on this channel; it cannot be gone yet.
    let _ = init_tx.send(init_result);
    if failed {
        return handler;
    }
    handler.on_start();
    let mut events = [EpollEvent::default(); EVENT_BATCH];
    loop {
        let count = match epoll.wait(-1, &mut events) {
            Ok(count) => count,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "epoll_wait failed, device worker exits");
                return handler;
            }
        };
        for event in &events[..count] {
            if event.data() == KILL_TOKEN {
                return handler;
            }
            handler.handle_event(event.data(), event.event_set());
        }
    }
}

/// Clears an eventfd that signalled readiness; errors (nothing pending) are
/// ignored because the caller processes its queue either way.
pub fn drain_eventfd(fd: &EventFd) {
    let _ = fd.read();
}

/// The queue logic of a single-queue device (block, rng).
pub trait QueueProcessor: Send + 'static {
    /// Processes the available chains of `queue`; returns whether the driver
    /// must be interrupted.
    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, QueueError>;
}

/// Epoll glue for a single-queue device: on each notification it runs the
/// processor and raises the queue interrupt when asked to.
pub struct QueueWorker<P: QueueProcessor> {
    mem: GuestMemoryMmap,
    queue: ActivatedQueue,
    interrupt: Arc<dyn VirtioInterrupt>,
    processor: P,
    limiter: LogRateLimiter,
}

/// The worker slot every device keeps: empty until activation, running
/// after, emptied again by reset. Thread naming and error mapping live here
/// once instead of in each device.
pub struct DeviceWorker<H: EventHandler> {
    worker: Option<Worker<H>>,
}

impl<H: EventHandler> Default for DeviceWorker<H> {
    fn default() -> Self {
        DeviceWorker { worker: None }
    }
}

impl<H: EventHandler> DeviceWorker<H> {
    /// Start (or restart) the worker thread `name` over `sources`.
    pub fn start(
        &mut self,
        name: &str,
        handler: H,
        sources: &[Source],
        options: &WorkerOptions,
    ) -> Result<(), crate::ActivateError> {
        self.stop();
        let worker = Worker::spawn(name, handler, sources, options)
            .map_err(|e| crate::ActivateError::Worker(e.into()))?;
        self.worker = Some(worker);
        Ok(())
    }

    /// Stop and join the worker, if one runs.
    pub fn stop(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
    }

    /// Whether a worker thread runs.
    pub fn is_running(&self) -> bool {
        self.worker.is_some()
    }
}

impl<P: QueueProcessor> DeviceWorker<QueueWorker<P>> {
    /// Start the worker of a single-queue device running `processor`.
    pub fn start_queue(
        &mut self,
        name: &str,
        mem: GuestMemoryMmap,
        queue: ActivatedQueue,
        interrupt: Arc<dyn VirtioInterrupt>,
        processor: P,
        options: &WorkerOptions,
    ) -> Result<(), crate::ActivateError> {
        let glue = QueueWorker::new(mem, queue, interrupt, processor);
        let source = glue.source();
        self.start(name, glue, &[source], options)
    }
}

impl<P: QueueProcessor> QueueWorker<P> {
    /// Glue `processor` to `queue`.
    pub fn new(
        mem: GuestMemoryMmap,
        queue: ActivatedQueue,
        interrupt: Arc<dyn VirtioInterrupt>,
        processor: P,
    ) -> Self {
        QueueWorker {
            mem,
            queue,
            interrupt,
            processor,
            limiter: LogRateLimiter::default(),
        }
    }

    /// The source to register for this queue's notifications (token 0).
    pub fn source(&self) -> Source {
        Source {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.queue.notify),
            token: 0,
            events: EventSet::IN,
        }
    }

    fn run(&mut self) {
        match self
            .processor
            .process_queue(&self.mem, &mut self.queue.queue)
        {
            Ok(true) => signal(&*self.interrupt, self.queue.index, &self.limiter),
            Ok(false) => {}
            Err(e) => crate::warn_ratelimited!(self.limiter, error = %e, "queue processing failed"),
        }
    }
}

impl<P: QueueProcessor> EventHandler for QueueWorker<P> {
    fn on_start(&mut self) {
        self.run();
    }

    fn handle_event(&mut self, _token: u64, _events: EventSet) {
        drain_eventfd(&self.queue.notify);
        self.run();
    }
}

/// Raises the used-buffer interrupt of queue `index`, logging failures.
pub fn signal(interrupt: &dyn VirtioInterrupt, index: u16, limiter: &LogRateLimiter) {
    if let Err(e) = interrupt.trigger(InterruptKind::Queue(index)) {
        crate::warn_ratelimited!(limiter, queue = index, error = %e, "cannot signal queue interrupt");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    struct Counter {
        fd: EventFd,
        seen: Arc<AtomicU64>,
        started: Arc<AtomicU64>,
    }

    impl EventHandler for Counter {
        fn on_start(&mut self) {
            self.started.fetch_add(1, Ordering::SeqCst);
        }
        fn handle_event(&mut self, token: u64, _events: EventSet) {
            drain_eventfd(&self.fd);
            self.seen.fetch_add(token, Ordering::SeqCst);
        }
    }

    fn counter() -> (Counter, Source, Arc<AtomicU64>, Arc<AtomicU64>) {
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let source = Source {
            fd: fd.as_raw_fd(),
            token: 7,
            events: EventSet::IN,
        };
        let seen = Arc::new(AtomicU64::new(0));
        let started = Arc::new(AtomicU64::new(0));
        let handler = Counter {
            fd,
            seen: seen.clone(),
            started: started.clone(),
        };
        (handler, source, seen, started)
    }

    fn wait_for(value: &AtomicU64, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while value.load(Ordering::SeqCst) != want {
            assert!(Instant::now() < deadline, "timed out waiting for {want}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn dispatches_events_and_stops() {
        let (handler, source, seen, started) = counter();
        let notify = handler.fd.try_clone().unwrap();
        let worker = Worker::spawn("test", handler, &[source], &WorkerOptions::default()).unwrap();
        wait_for(&started, 1);
        notify.write(1).unwrap();
        wait_for(&seen, 7);
        let handler = worker.stop().expect("handler returned");
        assert_eq!(handler.seen.load(Ordering::SeqCst), 7);
    }

    #[test]
    fn runs_thread_init_first() {
        let (handler, source, _seen, started) = counter();
        let ran = Arc::new(AtomicU64::new(0));
        let ran_in_hook = ran.clone();
        let started_in_hook = started.clone();
        let hook: ThreadInit = Arc::new(move || {
            assert_eq!(started_in_hook.load(Ordering::SeqCst), 0);
            ran_in_hook.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        let options = WorkerOptions::with_thread_init(hook);
        let worker = Worker::spawn("test", handler, &[source], &options).unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        wait_for(&started, 1);
        drop(worker);
    }

    #[test]
    fn failing_thread_init_is_reported() {
        let (handler, source, _seen, started) = counter();
        let hook: ThreadInit = Arc::new(|| Err(io::Error::other("no seccomp")));
        let options = WorkerOptions::with_thread_init(hook);
        let err = Worker::spawn("test", handler, &[source], &options).unwrap_err();
        assert!(matches!(err, WorkerError::Init(_)));
        assert_eq!(started.load(Ordering::SeqCst), 0);
    }
}
