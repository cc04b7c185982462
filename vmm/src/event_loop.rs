//! The main thread's event loop, on rust-vmm's `event-manager`.
//!
//! Two subscribers: [`MachineEvents`] watches a VM's device eventfds that end it (the power-off
//! and i8042 reset devices, a vCPU that stopped) and records why; [`ControlEvents`] watches the
//! controller's wake-up eventfd (API requests that end or change the VMM: `vmm.shutdown`, a
//! completed outgoing migration) and the received-VM eventfd (a completed incoming migration).
//! The loop that owns them ([`crate::control::Controller::run`], or [`wait_machine_exit`] for a
//! VMM without an API) runs the manager until a subscriber has something, then acts on it.
//!
//! The VM a [`MachineEvents`] watches changes while the VMM runs (a VM arrives by migration, or
//! leaves by one), so the loop removes and re-adds that subscriber; event-manager takes the
//! subscriber's fds out of its epoll set when it is removed.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;

use event_manager::{
    EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberId, SubscriberOps,
};
use vmm_sys_util::eventfd::EventFd;

use crate::machine::{Machine, MachineExit};

/// A subscriber as the manager holds it: the main thread's loop is single-threaded.
pub type Subscriber = Rc<RefCell<dyn MutEventSubscriber>>;

/// The main thread's event manager.
pub type MainEventManager = EventManager<Subscriber>;

/// The event loop could not be set up or run.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("event loop: cannot create the event manager")]
    Create(#[source] event_manager::Error),
    #[error("event loop: cannot watch the {what} eventfd")]
    Watch {
        what: &'static str,
        #[source]
        source: event_manager::Error,
    },
    #[error("event loop: waiting for events failed")]
    Run(#[source] event_manager::Error),
}

impl From<EventLoopError> for std::io::Error {
    fn from(e: EventLoopError) -> Self {
        std::io::Error::other(e)
    }
}

/// A new main-thread event manager.
pub fn new_manager() -> Result<MainEventManager, EventLoopError> {
    EventManager::new().map_err(EventLoopError::Create)
}

/// Waits for at least one event and dispatches it (a signal ends the wait early, harmlessly).
pub fn run_once(manager: &mut MainEventManager) -> Result<(), EventLoopError> {
    manager.run().map(|_| ()).map_err(EventLoopError::Run)
}

/// Adds `sub` to `manager` and reports whether it could watch every fd it asked for.
fn add<S: MutEventSubscriber + Watcher + 'static>(
    manager: &mut MainEventManager,
    sub: &Rc<RefCell<S>>,
) -> Result<SubscriberId, EventLoopError> {
    let id = manager.add_subscriber(sub.clone() as Subscriber);
    if let Some(e) = sub.borrow_mut().take_watch_error() {
        // Best effort: the manager drops whatever it did watch.
        let _ = manager.remove_subscriber(id);
        return Err(e);
    }
    Ok(id)
}

/// A subscriber's `init` cannot return an error; it keeps the first one here.
trait Watcher {
    fn take_watch_error(&mut self) -> Option<EventLoopError>;
}

fn watch(ops: &mut EventOps, fd: RawFd, what: &'static str) -> Result<(), EventLoopError> {
    ops.add(Events::new_raw(fd, EventSet::IN))
        .map_err(|source| EventLoopError::Watch { what, source })
}

/// Watches one VM's exit eventfds and records the first exit.
#[derive(Debug)]
pub struct MachineEvents {
    machine: Arc<Machine>,
    exit: Option<MachineExit>,
    watch_error: Option<EventLoopError>,
}

impl MachineEvents {
    fn new(machine: Arc<Machine>) -> Self {
        MachineEvents {
            machine,
            exit: None,
            watch_error: None,
        }
    }

    /// The exit seen, once (later calls return `None`).
    pub fn take_exit(&mut self) -> Option<MachineExit> {
        self.exit.take()
    }
}

impl Watcher for MachineEvents {
    fn take_watch_error(&mut self) -> Option<EventLoopError> {
        self.watch_error.take()
    }
}

impl MutEventSubscriber for MachineEvents {
    fn init(&mut self, ops: &mut EventOps) {
        const WHAT: [&str; 3] = ["power-off", "reset", "vCPU stop"];
        for (fd, what) in self.machine.exit_fds().into_iter().zip(WHAT) {
            if let Err(e) = watch(ops, fd, what) {
                self.watch_error.get_or_insert(e);
            }
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Reads (and so clears) the pending exit events; one that fired later than the one
        // returned keeps its fd readable and comes back on the next run.
        if let Some(exit) = self.machine.check_exit() {
            self.exit.get_or_insert(exit);
        }
    }
}

/// The [`MachineEvents`] subscriber of the VM the loop currently watches.
#[derive(Debug)]
pub struct WatchedMachine {
    id: SubscriberId,
    machine: Arc<Machine>,
    events: Rc<RefCell<MachineEvents>>,
}

impl WatchedMachine {
    /// Starts watching `machine`.
    pub fn add(
        manager: &mut MainEventManager,
        machine: Arc<Machine>,
    ) -> Result<Self, EventLoopError> {
        let events = Rc::new(RefCell::new(MachineEvents::new(machine.clone())));
        let id = add(manager, &events)?;
        Ok(WatchedMachine {
            id,
            machine,
            events,
        })
    }

    /// Is this the subscriber of `machine`?
    pub fn watches(&self, machine: &Arc<Machine>) -> bool {
        Arc::ptr_eq(&self.machine, machine)
    }

    /// The VM's exit, once it happened.
    pub fn take_exit(&self) -> Option<MachineExit> {
        self.events.borrow_mut().take_exit()
    }

    /// Stops watching (and lets go of the VM).
    pub fn remove(self, manager: &mut MainEventManager) {
        // The id is the one `add` returned, so removal cannot fail.
        let _ = manager.remove_subscriber(self.id);
    }
}

/// Watches the controller's wake-up eventfd (drained here: a wake-up only says "look again")
/// and the received-VM eventfd (left for the loop, whose `take` drains it with the VM).
#[derive(Debug)]
pub struct ControlEvents {
    /// The controller's wake-up eventfd.
    wake: Arc<EventFd>,
    received: RawFd,
    watch_error: Option<EventLoopError>,
}

impl ControlEvents {
    /// Subscriber over the controller's `wake` and `received` eventfds.
    pub fn add(
        manager: &mut MainEventManager,
        wake: Arc<EventFd>,
        received: &EventFd,
    ) -> Result<Rc<RefCell<Self>>, EventLoopError> {
        let sub = Rc::new(RefCell::new(ControlEvents {
            wake,
            received: received.as_raw_fd(),
            watch_error: None,
        }));
        add(manager, &sub)?;
        Ok(sub)
    }
}

impl Watcher for ControlEvents {
    fn take_watch_error(&mut self) -> Option<EventLoopError> {
        self.watch_error.take()
    }
}

impl MutEventSubscriber for ControlEvents {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, what) in [
            (self.wake.as_raw_fd(), "wake-up"),
            (self.received, "received-VM"),
        ] {
            if let Err(e) = watch(ops, fd, what) {
                self.watch_error.get_or_insert(e);
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.wake.as_raw_fd() {
            let _ = self.wake.read();
        }
    }
}

/// A VMM without an API: runs the loop over `machine` alone until the guest ends.
pub fn wait_machine_exit(machine: Arc<Machine>) -> Result<MachineExit, EventLoopError> {
    let mut manager = new_manager()?;
    let watched = WatchedMachine::add(&mut manager, machine)?;
    loop {
        if let Some(exit) = watched.take_exit() {
            return Ok(exit);
        }
        run_once(&mut manager)?;
    }
}
