//! systemd integration (`Type=notify`): READY / STATUS / STOPPING and watchdog keep-alives.
//! Without `NOTIFY_SOCKET` (not under systemd) every call is a no-op.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Sends sd_notify messages; pings the watchdog at half its interval.
#[derive(Debug)]
pub struct Notifier {
    watchdog: Option<Duration>,
    last_ping: Instant,
}

impl Notifier {
    /// Reads `WATCHDOG_USEC` / `WATCHDOG_PID` from the environment.
    pub fn from_env() -> Notifier {
        Notifier {
            watchdog: sd_notify::watchdog_enabled().map(|d| d / 2),
            last_ping: Instant::now(),
        }
    }

    /// How often the loop must wake up to keep the watchdog happy.
    pub fn ping_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// `STATUS=...`.
    pub fn status(&self, status: &str) {
        let _ = sd_notify::notify(&[NotifyState::Status(status)]);
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        let _ = sd_notify::notify(&[NotifyState::Stopping]);
    }

    /// `WATCHDOG=1` when half the watchdog interval has passed. Called from the inspection
    /// loop itself, so a hung loop (not just a live process) gets the service restarted.
    pub fn ping_if_due(&mut self) {
        if let Some(every) = self.watchdog {
            if self.last_ping.elapsed() >= every {
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
                self.last_ping = Instant::now();
            }
        }
    }
}
