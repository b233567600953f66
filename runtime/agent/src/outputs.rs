//! The result pins on a thread of their own: pulses end and queued pulses start on time
//! while the worker is busy judging the next part (an inference can take longer than a pulse).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;
use edgevlm_board::{monotonic_now, DelayNs, OutputPin, Signal, VerdictOutputs};

/// The longest the pin thread sleeps with nothing scheduled (a stop is also a wake-up).
const IDLE_WAKE: Duration = Duration::from_secs(1);

/// Outputs shared by the worker (results, BUSY) and the pin thread (pulse timing).
pub(crate) struct SharedOutputs<P: OutputPin, D: DelayNs> {
    outputs: Mutex<VerdictOutputs<P, D>>,
    /// Signalled when a result is queued (the pin thread has a new deadline) and when the
    /// pin thread has run the queue (the worker may have room again).
    changed: Condvar,
    closing: AtomicBool,
}

impl<P, D> SharedOutputs<P, D>
where
    P: OutputPin + Send + 'static,
    D: DelayNs + Send + 'static,
{
    pub(crate) fn new(outputs: VerdictOutputs<P, D>) -> Arc<Self> {
        Arc::new(SharedOutputs {
            outputs: Mutex::new(outputs),
            changed: Condvar::new(),
            closing: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, VerdictOutputs<P, D>> {
        // A panic elsewhere must not leave the pins undriven: the state is still consistent.
        self.outputs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Signals one result (queued as a pulse in pulse mode).
    pub(crate) fn set(&self, signal: Signal) -> Result<(), String> {
        let mut outputs = self.lock();
        // Read the clock under the lock so the pin thread never polls with a later time first.
        let result = outputs.set(signal, monotonic_now());
        drop(outputs);
        self.changed.notify_all();
        result.map_err(|e| format!("{e:?}"))
    }

    /// Drives BUSY.
    pub(crate) fn set_busy(&self, busy: bool) -> Result<(), String> {
        self.lock().set_busy(busy).map_err(|e| format!("{e:?}"))
    }

    /// True when the pulse queue is full: the worker waits before judging another part, so
    /// no result is ever dropped or merged; the trigger queue (bounded, drops counted) takes
    /// the overload.
    pub(crate) fn is_full(&self) -> bool {
        self.lock().is_full()
    }

    /// Waits up to `timeout` for room in the pulse queue; true when there is room.
    pub(crate) fn wait_for_room(&self, timeout: Duration) -> bool {
        let outputs = self.lock();
        let (outputs, _) = self
            .changed
            .wait_timeout_while(outputs, timeout, |o| o.is_full())
            .unwrap_or_else(|e| e.into_inner());
        !outputs.is_full()
    }

    /// Starts the pin thread; pin errors go to `errors`. It runs until [`Self::finish`].
    pub(crate) fn spawn(self: &Arc<Self>, errors: Sender<String>) -> JoinHandle<()> {
        let shared = self.clone();
        std::thread::Builder::new()
            .name("edgevlm-pins".into())
            .spawn(move || shared.drive(errors))
            .expect("spawning the output pin thread")
    }

    fn drive(&self, errors: Sender<String>) {
        let mut outputs = self.lock();
        loop {
            let now = monotonic_now();
            let next = match outputs.poll(now) {
                Ok(next) => next,
                Err(e) => {
                    let _ = errors.send(format!("{e:?}"));
                    // The failed edge is behind us; carry on with the rest of the queue.
                    outputs.next_deadline()
                }
            };
            self.changed.notify_all();
            if self.closing.load(Ordering::SeqCst) && outputs.is_idle() {
                return;
            }
            let wait = next.map_or(IDLE_WAKE, |at| at.saturating_sub(now));
            if wait.is_zero() {
                continue;
            }
            outputs = self
                .changed
                .wait_timeout(outputs, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Lets the pin thread run every queued pulse to its end, then stop; joins it.
    pub(crate) fn finish(&self, thread: JoinHandle<()>) {
        // Under the lock, so the flag cannot slip in between the thread's check and its wait.
        let outputs = self.lock();
        self.closing.store(true, Ordering::SeqCst);
        drop(outputs);
        self.changed.notify_all();
        let _ = thread.join();
    }
}
