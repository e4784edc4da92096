//! The connection thread of one vhost-user-blk device.
//!
//! It is started with the device (at VM build, so it inherits no vCPU
//! filter and installs its own through the thread-init hook) and owns the
//! [`Session`]. It waits in epoll on:
//!
//! - the command eventfd: activation and reset, sent from the vCPU thread
//!   that wrote `device_status`;
//! - each queue's call eventfd: the backend completed requests, so the
//!   thread raises the queue's interrupt (MSI-X through `KVM_SIGNAL_MSI`);
//! - the socket: the backend never speaks first, so any event there means
//!   it went away.
//!
//! Kicks never pass through here: the guest's doorbell ioeventfd is the
//! ring's kick eventfd. When the backend goes away the guest's I/O stalls
//! (nothing completes) and the thread retries the socket every
//! [`RECONNECT_INTERVAL`]; once back, the session is started again from the
//! guest's ring indices and the I/O resumes.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::session::Session;
use crate::ratelimit::LogRateLimiter;
use crate::worker::ThreadInit;
use crate::{ActivatedQueue, GuestMemoryMmap, InterruptKind, VirtioInterrupt};

/// How often a lost backend is retried.
pub const RECONNECT_INTERVAL: Duration = Duration::from_millis(100);
/// How long a reset waits for the thread to stop the rings.
const RESET_TIMEOUT: Duration = Duration::from_secs(2);

const COMMAND_TOKEN: u64 = 0;
const SOCKET_TOKEN: u64 = 1;
const CALL_TOKEN_BASE: u64 = 2;

/// What the driver set up at `DRIVER_OK`.
pub struct Activation {
    /// Guest RAM (memfd-backed).
    pub mem: GuestMemoryMmap,
    /// How the thread signals completions.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The queues, sorted by index, with their doorbell eventfds.
    pub queues: Vec<ActivatedQueue>,
    /// The features the driver accepted.
    pub features: u64,
}

enum Command {
    Activate(Activation),
    Reset(mpsc::SyncSender<()>),
    Exit,
}

/// The device's handle on its connection thread.
pub struct Link {
    commands: mpsc::Sender<Command>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Link {
    /// Starts thread `name` owning `session`; it runs `init` first and
    /// reconnects to `socket` when the backend goes away.
    pub fn spawn(
        name: &str,
        socket: PathBuf,
        session: Session,
        num_queues: usize,
        init: Option<ThreadInit>,
    ) -> std::io::Result<Self> {
        let wake = EventFd::new(EFD_NONBLOCK)?;
        let (tx, rx) = mpsc::channel();
        let mut conn = Connection {
            socket,
            num_queues,
            session: None,
            active: None,
            calls: Vec::new(),
            epoll: Epoll::new()?,
            wake: wake.try_clone()?,
            commands: rx,
            limiter: LogRateLimiter::default(),
        };
        conn.watch(conn.wake.as_raw_fd(), COMMAND_TOKEN, EventSet::IN)?;
        conn.attach(session)?;
        let (init_tx, init_rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let result = init.map_or(Ok(()), |hook| hook());
                let ok = result.is_ok();
                let _ = init_tx.send(result);
                if ok {
                    conn.run();
                }
            })?;
        init_rx
            .recv()
            .map_err(|_| std::io::Error::other("connection thread exited during init"))??;
        Ok(Link {
            commands: tx,
            wake,
            thread: Some(thread),
        })
    }

    fn send(&self, command: Command) {
        if self.commands.send(command).is_ok() {
            let _ = self.wake.write(1);
        }
    }

    /// Hands the thread the driver's queues; the rings start as soon as a
    /// backend is connected.
    pub fn activate(&self, activation: Activation) {
        self.send(Command::Activate(activation));
    }

    /// Stops the rings and forgets the queues; waits a bounded time.
    pub fn reset(&self) -> bool {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Command::Reset(tx));
        rx.recv_timeout(RESET_TIMEOUT).is_ok()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.send(Command::Exit);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Connection {
    socket: PathBuf,
    num_queues: usize,
    session: Option<Session>,
    active: Option<Activation>,
    calls: Vec<EventFd>,
    epoll: Epoll,
    wake: EventFd,
    commands: mpsc::Receiver<Command>,
    limiter: LogRateLimiter,
}

impl Connection {
    fn watch(&self, fd: i32, token: u64, events: EventSet) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    fn unwatch(&self, fd: i32) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    /// Adopts a connected session: watch its socket, start the rings.
    fn attach(&mut self, mut session: Session) -> std::io::Result<()> {
        if let Some(a) = &self.active {
            if let Err(e) = session.start(a.features, &a.mem, &a.queues, &self.calls) {
                return Err(std::io::Error::other(e));
            }
        }
        let events = EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP;
        self.watch(session.as_raw_fd(), SOCKET_TOKEN, events)?;
        self.session = Some(session);
        Ok(())
    }

    fn lost(&mut self, why: &dyn std::fmt::Display) {
        if let Some(s) = self.session.take() {
            self.unwatch(s.as_raw_fd());
            tracing::warn!(socket = %self.socket.display(), error = %why,
                "vhost-user backend lost; guest I/O stalls until it is back");
        }
    }

    fn reconnect(&mut self) {
        let session = match Session::connect(&self.socket, self.num_queues) {
            Ok(s) => s,
            Err(e) => {
                crate::warn_ratelimited!(self.limiter, socket = %self.socket.display(),
                    error = %e, "vhost-user backend still unreachable");
                return;
            }
        };
        match self.attach(session) {
            Ok(()) => {
                tracing::info!(socket = %self.socket.display(), "vhost-user backend reconnected");
                // The lost backend may have put completions on a used ring
                // and gone before it signalled them: one interrupt per
                // queue lets the guest see them (a spurious one is
                // harmless; the driver looks at the ring).
                let queues: Vec<u16> = self
                    .active
                    .iter()
                    .flat_map(|a| &a.queues)
                    .map(|q| q.index)
                    .collect();
                for q in queues {
                    self.interrupt(q);
                }
            }
            Err(e) => {
                crate::warn_ratelimited!(self.limiter, error = %e, "cannot restart the rings")
            }
        }
    }

    fn run(&mut self) {
        let mut events = [EpollEvent::default(); 8];
        loop {
            let timeout = if self.session.is_some() {
                -1
            } else {
                RECONNECT_INTERVAL.as_millis() as i32
            };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "epoll_wait failed, vhost-user thread exits");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    COMMAND_TOKEN => {
                        if !self.commands() {
                            return;
                        }
                    }
                    SOCKET_TOKEN => self.lost(&"socket closed"),
                    token => self.call(token - CALL_TOKEN_BASE),
                }
            }
            if self.session.is_none() {
                self.reconnect();
            }
        }
    }

    /// Runs pending commands; false when the thread must exit.
    fn commands(&mut self) -> bool {
        let _ = self.wake.read();
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Activate(a) => self.activate(a),
                Command::Reset(ack) => {
                    self.deactivate();
                    let _ = ack.send(());
                }
                Command::Exit => return false,
            }
        }
        true
    }

    fn activate(&mut self, a: Activation) {
        self.deactivate();
        self.calls = Vec::new();
        for q in &a.queues {
            let call = match EventFd::new(EFD_NONBLOCK) {
                Ok(fd) => fd,
                Err(e) => return tracing::error!(error = %e, "cannot create a call eventfd"),
            };
            let token = CALL_TOKEN_BASE + u64::from(q.index);
            if let Err(e) = self.watch(call.as_raw_fd(), token, EventSet::IN) {
                return tracing::error!(error = %e, "cannot watch a call eventfd");
            }
            self.calls.push(call);
        }
        let started = match self.session.as_mut() {
            Some(s) => s.start(a.features, &a.mem, &a.queues, &self.calls),
            None => Ok(()),
        };
        self.active = Some(a);
        if let Err(e) = started {
            self.lost(&e);
        }
    }

    fn deactivate(&mut self) {
        if self.active.take().is_some() {
            if let Some(Err(e)) = self.session.as_mut().map(|s| s.stop(self.num_queues)) {
                self.lost(&e);
            }
        }
        for call in std::mem::take(&mut self.calls) {
            self.unwatch(call.as_raw_fd());
        }
    }

    fn call(&mut self, index: u64) {
        let Some(call) = self.calls.get(index as usize) else {
            return;
        };
        let _ = call.read();
        self.interrupt(index as u16);
    }

    /// Raises queue `index`'s interrupt in the guest (when activated).
    fn interrupt(&mut self, index: u16) {
        let Some(a) = &self.active else { return };
        if let Err(e) = a.interrupt.trigger(InterruptKind::Queue(index)) {
            crate::warn_ratelimited!(self.limiter, error = %e, "cannot signal queue interrupt");
        }
    }
}
