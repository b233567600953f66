//! A station on the simulated board, built from an agent config: the embedded default.

use std::time::Duration;

use edgevlm_board::{Camera, Frame, PinMode, Trigger, TriggerEvent, VerdictOutputs};
use edgevlm_board_sim::{
    parse_script, FolderCamera, LineTrigger, PatternCamera, PinRecorder, RecordedPin,
    ScheduleTrigger, SimError, ThreadDelay,
};
use edgevlm_runtime::Inspector;

use crate::config::{AgentConfig, BoardKind, OnError, OutputMode};
use crate::ngstore::NgStore;
use crate::station::{Station, StationSettings};

/// Errors while setting up a station.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The model package could not be loaded.
    #[error("loading model package {package}")]
    Model {
        /// The package directory.
        package: std::path::PathBuf,
        /// Why.
        #[source]
        source: edgevlm_runtime::Error,
    },
    /// A device could not be opened.
    #[error("{0}")]
    Device(String),
}

/// The simulated station, its trigger and the recorder of its pins.
pub type SimStation = (
    Station<SimCamera, RecordedPin, ThreadDelay>,
    SimTrigger,
    PinRecorder,
);

/// The simulator's cameras.
#[derive(Debug)]
pub enum SimCamera {
    /// Images from a folder.
    Folder(FolderCamera),
    /// Generated colour bars.
    Pattern(PatternCamera),
}

impl Camera for SimCamera {
    type Error = SimError;

    fn capture(&mut self) -> Result<Frame, SimError> {
        match self {
            SimCamera::Folder(c) => c.capture(),
            SimCamera::Pattern(c) => c.capture(),
        }
    }
}

/// The simulator's trigger sources.
#[derive(Debug)]
pub enum SimTrigger {
    /// A schedule or a script of offsets.
    Schedule(ScheduleTrigger),
    /// One trigger per input line.
    Lines(LineTrigger),
}

impl Trigger for SimTrigger {
    type Error = std::convert::Infallible;

    fn wait(&mut self, timeout: Duration) -> Result<Option<TriggerEvent>, Self::Error> {
        match self {
            SimTrigger::Schedule(t) => t.wait(timeout),
            SimTrigger::Lines(t) => t.wait(timeout),
        }
    }

    fn is_exhausted(&self) -> bool {
        match self {
            SimTrigger::Schedule(t) => t.is_exhausted(),
            SimTrigger::Lines(t) => t.is_exhausted(),
        }
    }
}

/// Loop settings from a config.
pub fn settings(config: &AgentConfig) -> StationSettings {
    StationSettings {
        queue_capacity: config.queue.capacity,
        when_full: config.queue.when_full,
        camera_retries: config.camera.retries,
        backoff: Duration::from_millis(config.camera.backoff_ms),
        ..StationSettings::default()
    }
}

/// Pin mode from a config.
pub fn pin_mode(config: &AgentConfig) -> PinMode {
    match config.outputs.mode {
        OutputMode::Pulse => PinMode::Pulse {
            width: Duration::from_millis(config.outputs.pulse_ms),
            gap: Duration::from_millis(config.outputs.gap_ms()),
        },
        OutputMode::Level => PinMode::Level,
    }
}

/// Loads the config's model package (a classifier, or a vision-language model with an
/// `[inspection]` section).
pub fn load_inspector(config: &AgentConfig) -> Result<Inspector, SetupError> {
    let options = config.model.load_options();
    Inspector::load(&config.model.package, &options).map_err(|source| SetupError::Model {
        package: config.model.package.clone(),
        source,
    })
}

/// Adds the config's NG image folder, if any, to a station.
pub fn with_ng_store<C, P, D>(
    station: Station<C, P, D>,
    config: &AgentConfig,
) -> Result<Station<C, P, D>, SetupError>
where
    C: edgevlm_board::Camera,
    P: edgevlm_board::OutputPin + Send + 'static,
    D: edgevlm_board::DelayNs + Send + 'static,
{
    match &config.ng_images {
        Some(ng) => NgStore::open(&ng.dir, ng.keep)
            .map(|store| station.with_ng_store(store))
            .map_err(|e| SetupError::Device(format!("NG image folder {}: {e}", ng.dir.display()))),
        None => Ok(station),
    }
}

/// Builds the simulated station a config describes (`board.kind = "sim"`). Pins are named
/// `ok`, `ng`, `error` (with `on_error = "error-pin"`) and `busy`.
pub fn build(config: &AgentConfig) -> Result<SimStation, SetupError> {
    let sim = match (config.board.kind, &config.sim) {
        (BoardKind::Sim, Some(sim)) => sim,
        _ => {
            return Err(SetupError::Device(
                "the simulated board needs board.kind = \"sim\" and a [sim] section".into(),
            ))
        }
    };
    let inspector = load_inspector(config)?;
    let camera = if sim.is_test_pattern() {
        SimCamera::Pattern(PatternCamera::new(640, 480))
    } else {
        SimCamera::Folder(
            FolderCamera::open(&sim.images).map_err(|e| SetupError::Device(e.to_string()))?,
        )
    };
    let recorder = PinRecorder::default();
    let error_pin = (config.outputs.on_error == OnError::ErrorPin).then(|| recorder.pin("error"));
    let outputs = VerdictOutputs::new(
        recorder.pin("ok"),
        recorder.pin("ng"),
        error_pin,
        pin_mode(config),
        ThreadDelay,
    )
    .and_then(|o| o.with_busy(recorder.pin("busy")))
    .unwrap_or_else(|never| match never {});
    let station = with_ng_store(
        Station::new(camera, outputs, inspector, settings(config)),
        config,
    )?;
    let trigger = if sim.stdin {
        SimTrigger::Lines(LineTrigger::new(std::io::BufReader::new(std::io::stdin())))
    } else if let Some(script) = &sim.script {
        let text = std::fs::read_to_string(script)
            .map_err(|e| SetupError::Device(format!("trigger script {}: {e}", script.display())))?;
        let offsets = parse_script(&text)
            .map_err(|e| SetupError::Device(format!("trigger script {}: {e}", script.display())))?;
        SimTrigger::Schedule(ScheduleTrigger::new(offsets))
    } else {
        SimTrigger::Schedule(ScheduleTrigger::periodic(
            sim.triggers,
            Duration::from_millis(sim.period_ms),
        ))
    };
    Ok((station, trigger, recorder))
}
