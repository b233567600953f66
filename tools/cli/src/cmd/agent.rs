//! `edgevlm agent`: the board daemon, in one of three modes.
//!
//! - `--config FILE` (the default): runs the inspection loop a config describes until
//!   SIGTERM / SIGINT, then finishes the queued parts and exits 0.
//! - `--stdio`: serves the host protocol on stdin/stdout until stdin ends; this is what the host
//!   tool runs through ssh. Frames only on stdout, logs on stderr.
//! - `--serial DEV --baud N`: serves the host protocol on a serial port, reopening it whenever a
//!   link ends, until SIGTERM / SIGINT.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use edgevlm_agent::config::BoardKind;
use edgevlm_agent::server::Level;
use edgevlm_agent::{linux, sim, AgentConfig, Event, Report, Server, ServerConfig};
use edgevlm_board::Signal;

/// Where the inspection loop's config is read from when no mode is given.
const DEFAULT_CONFIG: &str = "/etc/edgevlm/agent.toml";

/// Run the board agent: the inspection loop (trigger -> fresh frame -> verdict -> output pins),
/// or the protocol server the host tool talks to (`--stdio`, `--serial`).
///
/// Logs on stderr (logfmt; journald priorities under systemd): one line per part and per
/// incident in the inspection loop, one line per request with its outcome in the server modes.
/// See runtime/agent/dist/ for the systemd unit.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("link").args(["stdio", "serial"])))]
pub struct Cmd {
    /// The agent config for the inspection loop [default: /etc/edgevlm/agent.toml].
    #[arg(long, value_name = "FILE", conflicts_with = "link")]
    config: Option<PathBuf>,
    /// Serve the host protocol on stdin/stdout until stdin ends (the host tool runs this
    /// through ssh).
    #[arg(long)]
    stdio: bool,
    /// Serve the host protocol on this serial port (reopened whenever a link ends) until
    /// SIGTERM / SIGINT.
    #[arg(long, value_name = "DEV", requires = "baud")]
    serial: Option<PathBuf>,
    /// Baud rate of the serial port (raw 8N1, e.g. 921600).
    #[arg(long, value_name = "N", requires = "serial")]
    baud: Option<u32>,
    /// Model store of the protocol server [default: /var/lib/edgevlm/store].
    #[arg(long, value_name = "DIR", requires = "link")]
    store: Option<PathBuf>,
    /// Board profile name the server reports to the host (`rpi5`, `sim`) [default: unknown].
    #[arg(long, value_name = "NAME", requires = "link")]
    board: Option<String>,
    /// The load cache benchmarks load through, as the station does: a benchmark's timed load
    /// reads the package's graphs from it (a first, untimed load writes it) [default: `cache`
    /// beside the store, /var/lib/edgevlm/cache for the default store, the station's default]
    #[arg(
        long,
        value_name = "DIR",
        requires = "link",
        conflicts_with = "no_cache"
    )]
    cache_dir: Option<PathBuf>,
    /// Benchmarks load from the ONNX files every time.
    #[arg(long, requires = "link")]
    no_cache: bool,
}

impl Cmd {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        if self.stdio || self.serial.is_some() {
            return self.serve();
        }
        let config_path = self.config.unwrap_or_else(|| DEFAULT_CONFIG.into());
        let config = AgentConfig::load(&config_path)?;
        let log = Logger::new();
        let report = match config.board.kind {
            BoardKind::Sim => {
                let (station, trigger, _pins) =
                    sim::build(&config).context("setting up the simulated board")?;
                handle_signals(&station.handle(), &config_path, &log)?;
                log.info(&format!(
                    "event=start board=sim model={}",
                    config.model.package.display()
                ));
                station.run(trigger, |e| log.event(e))
            }
            BoardKind::Linux => {
                let (station, trigger, profile) =
                    linux::build(&config).context("setting up the board")?;
                handle_signals(&station.handle(), &config_path, &log)?;
                log.info(&format!(
                    "event=start board={} model={}",
                    profile.name,
                    config.model.package.display()
                ));
                station.run(trigger, |e| log.event(e))
            }
        };
        log.info(&summary(&report));
        Ok(ExitCode::SUCCESS)
    }

    /// The protocol server modes.
    fn serve(self) -> anyhow::Result<ExitCode> {
        let store = self
            .store
            .unwrap_or_else(|| "/var/lib/edgevlm/store".into());
        let board = self.board.unwrap_or_else(|| "unknown".into());
        let cache_dir = match (self.no_cache, self.cache_dir) {
            (true, _) => None,
            (false, Some(dir)) => Some(dir),
            (false, None) => Some(
                store
                    .parent()
                    .map_or_else(|| "cache".into(), |p| p.join("cache")),
            ),
        };
        let log = Logger::new();
        let server = Server::new(ServerConfig {
            store: store.clone(),
            board: board.clone(),
            cache_dir,
        })
        .with_context(|| format!("opening the model store {}", store.display()))?
        .with_log(move |level: Level, line: &str| log.line(level as u8, line));
        let start = |link: &str| {
            Logger::new().info(&format!(
                "event=start mode=server link={link} board={board:?} store={:?} version={}",
                store.display().to_string(),
                env!("CARGO_PKG_VERSION")
            ))
        };
        match (self.serial, self.baud) {
            (Some(device), Some(baud)) => {
                start(&format!("{:?}", device.display().to_string()));
                let stop = Arc::new(AtomicBool::new(false));
                for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                    signal_hook::flag::register(signal, stop.clone())
                        .context("installing signal handlers")?;
                }
                server.serve_serial(&device, baud, stop)?;
            }
            _ => {
                start("stdio");
                // Own descriptors, unbuffered: each frame leaves in one write, and std's
                // line-buffered stdout never splits one at a 0x0A byte.
                let input = dup(std::io::stdin().as_fd()).context("duplicating stdin")?;
                let output = dup(std::io::stdout().as_fd()).context("duplicating stdout")?;
                server
                    .serve(input, output)
                    .context("serving stdin/stdout")?;
            }
        }
        Logger::new().info("event=stop mode=server");
        Ok(ExitCode::SUCCESS)
    }
}

fn dup(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<File> {
    Ok(File::from(fd.try_clone_to_owned()?))
}

/// SIGTERM / SIGINT drain and stop; SIGHUP re-reads the config and loads the model package it
/// names beside the running one (the swap happens between two parts; a package that fails to
/// load is logged and the running model stays).
fn handle_signals(
    handle: &edgevlm_agent::StationHandle,
    config: &std::path::Path,
    log: &Logger,
) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, handle.stop_flag())
            .context("installing signal handlers")?;
    }
    let hup = std::sync::Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())
        .context("installing signal handlers")?;
    let (handle, config, log) = (
        handle.clone(),
        config.to_owned(),
        Logger {
            journald: log.journald,
        },
    );
    std::thread::spawn(move || {
        let stop = handle.stop_flag();
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(100));
            if !hup.swap(false, Ordering::SeqCst) {
                continue;
            }
            match AgentConfig::load(&config) {
                Ok(c) => {
                    log.info(&format!(
                        "event=reload model={:?}",
                        c.model.package.display().to_string()
                    ));
                    let options = c.model.load_options();
                    handle.load_model(c.model.package, options);
                }
                Err(e) => {
                    let error = format!("{:#}", anyhow::Error::from(e));
                    log.line(3, &format!("event=reload_failed error={error:?}"));
                }
            }
        }
    });
    Ok(())
}

/// The end-of-run line shared with `inspect --board sim`.
pub fn summary(r: &Report) -> String {
    format!(
        "event=summary triggers={} judged={} ok={} ng={} error={} dropped={} pulse_waits={} capture_retries={} model_switches={} latency_p50_ms={:.2} latency_p99_ms={:.2}",
        r.triggers,
        r.processed,
        r.ok,
        r.ng,
        r.errors,
        r.dropped,
        r.pulse_waits,
        r.capture_retries,
        r.model_switches,
        r.latency_ms(50.0),
        r.latency_ms(99.0)
    )
}

/// logfmt lines on stderr; under systemd (JOURNAL_STREAM set) each line starts with a
/// `<N>` syslog priority, which journald turns into the entry's level.
struct Logger {
    journald: bool,
}

impl Logger {
    fn new() -> Logger {
        Logger {
            journald: std::env::var_os("JOURNAL_STREAM").is_some(),
        }
    }

    fn line(&self, priority: u8, text: &str) {
        let prefix = if self.journald {
            format!("<{priority}>")
        } else {
            String::new()
        };
        let _ = writeln!(std::io::stderr().lock(), "{prefix}{text}");
    }

    fn info(&self, text: &str) {
        self.line(6, text);
    }

    fn event(&self, e: &Event) {
        match e {
            Event::Part(p) => {
                let signal = match p.signal {
                    Signal::Ok => "OK",
                    Signal::Ng => "NG",
                    Signal::Error => "ERROR",
                };
                let mut text = format!(
                    "event=part seq={} verdict={signal} latency_ms={:.2} queue_ms={:.2} attempts={} source={:?}",
                    p.sequence,
                    p.latency_us as f64 / 1000.0,
                    p.queue_us as f64 / 1000.0,
                    p.capture_attempts,
                    p.source
                );
                if let (Some(label), Some(prob)) = (&p.label, p.probability) {
                    text.push_str(&format!(" label={label} p={prob:.3}"));
                }
                if let Some(reason) = &p.reason {
                    text.push_str(&format!(" reason={reason:?}"));
                }
                if let Some(error) = &p.error {
                    text.push_str(&format!(" error={error:?}"));
                }
                if let Some(saved) = &p.saved {
                    text.push_str(&format!(" saved={:?}", saved.display().to_string()));
                }
                if let Some(e) = &p.save_error {
                    text.push_str(&format!(" save_error={e:?}"));
                }
                self.line(if p.signal == Signal::Error { 3 } else { 6 }, &text);
            }
            Event::Dropped { new, total } => self.line(
                4,
                &format!("event=dropped new={new} total={total} reason=\"queue full\""),
            ),
            Event::TriggerFailed(e) => self.line(3, &format!("event=trigger_failed error={e:?}")),
            Event::ModelSwitched { name, version } => self.line(
                5,
                &format!("event=model_switched name={name} version={version}"),
            ),
            Event::ModelRejected { package, error } => self.line(
                3,
                &format!(
                    "event=model_rejected package={:?} error={error:?}",
                    package.display().to_string()
                ),
            ),
            Event::Draining { queued } => self.line(5, &format!("event=draining queued={queued}")),
            Event::OutputFailed(e) => self.line(3, &format!("event=output_failed error={e:?}")),
        }
    }
}
