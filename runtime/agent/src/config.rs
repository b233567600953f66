//! `/etc/edgevlm/agent.toml`: what the agent runs, on which board, and how it signals.
//!
//! ```toml
//! [board]
//! kind = "sim"                    # sim | linux
//! # profile = "rpi5"              # linux: built-in profile name or path to a profile TOML
//!
//! [model]
//! package = "/var/lib/edgevlm/models/active"   # a model package directory
//! threads = 1
//! # cache_dir = "/var/cache/edgevlm"   # keep decluttered graphs here: later starts skip the ONNX parse
//!
//! [sim]                           # kind = "sim": image-folder camera and scripted triggers
//! images = "/usr/share/edgevlm/samples"
//! triggers = 100                  # how many triggers, one every period_ms
//! period_ms = 200
//!
//! [outputs]
//! mode = "pulse"                  # pulse | level
//! pulse_ms = 50
//! # gap_ms = 50                  # least low time between two pulses on one pin (default pulse_ms)
//! on_error = "error-pin"          # error-pin | ng: where a part that could not be judged goes
//!
//! [queue]
//! capacity = 8                    # triggers waiting while a part is being judged
//! when_full = "drop-newest"       # drop-newest | drop-oldest (each drop is counted and logged)
//!
//! [camera]
//! retries = 3                     # capture attempts after the first, per trigger
//! backoff_ms = 20                 # doubled per retry, at most 1000
//!
//! [ng_images]                     # optional: keep the frames of NG and ERROR parts
//! dir = "/var/lib/edgevlm/ng"
//! keep = 500                      # newest files kept, older ones deleted
//! ```
//! Relative paths are relative to the config file's folder.

use std::path::{Path, PathBuf};

use edgevlm_runtime::{parse_toml, Error, Result};
use serde::Deserialize;

/// The whole agent config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Which board.
    pub board: BoardSection,
    /// Which model.
    pub model: ModelSection,
    /// Simulator settings (`board.kind = "sim"`).
    pub sim: Option<SimSection>,
    /// Output pins.
    #[serde(default)]
    pub outputs: OutputsSection,
    /// Trigger queue.
    #[serde(default)]
    pub queue: QueueSection,
    /// Camera retries.
    #[serde(default)]
    pub camera: CameraSection,
    /// Where NG frames are kept.
    pub ng_images: Option<NgImagesSection>,
}

/// Board kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BoardKind {
    /// Image folder camera, scripted triggers, recorded pins.
    Sim,
    /// GPIO character device and V4L2 camera, from a board profile.
    Linux,
}

/// `[board]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardSection {
    /// Board kind.
    pub kind: BoardKind,
    /// Board profile name or file (`kind = "linux"`).
    pub profile: Option<String>,
}

/// `[model]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Model package directory.
    pub package: PathBuf,
    /// Inference threads.
    #[serde(default = "one")]
    pub threads: usize,
    /// The load cache's directory (see `edgevlm_runtime::cache`): the first start writes
    /// each graph's decluttered model there, later starts and reloads read it. None: load
    /// from the ONNX files every time.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
}

impl ModelSection {
    /// The load options this section asks for.
    pub fn load_options(&self) -> edgevlm_runtime::LoadOptions {
        edgevlm_runtime::LoadOptions {
            threads: self.threads,
            cache_dir: self.cache_dir.clone(),
            ..Default::default()
        }
    }
}

/// `[sim]`: the camera and where triggers come from (exactly one of `triggers` +
/// `period_ms`, `script`, `stdin`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimSection {
    /// Image folder the camera reads, or `"test-pattern"` for generated colour bars.
    pub images: PathBuf,
    /// Number of scheduled triggers, one every `period_ms`.
    #[serde(default)]
    pub triggers: usize,
    /// Milliseconds between scheduled triggers.
    #[serde(default)]
    pub period_ms: u64,
    /// A file with one trigger per line, at that many milliseconds after start.
    pub script: Option<PathBuf>,
    /// One trigger per line read on standard input (ends at end of input).
    #[serde(default)]
    pub stdin: bool,
}

impl SimSection {
    /// The `images` value that selects the generated test pattern.
    pub const TEST_PATTERN: &'static str = "test-pattern";

    /// True when the camera is the generated test pattern.
    pub fn is_test_pattern(&self) -> bool {
        self.images.as_os_str() == Self::TEST_PATTERN
    }
}

/// Pulse or level outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OutputMode {
    /// A pulse of `pulse_ms` per part.
    #[default]
    Pulse,
    /// The pin holds until the next part.
    Level,
}

/// Where failures are signalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// On the ERROR pin.
    #[default]
    ErrorPin,
    /// On the NG pin (stations without an ERROR input on the PLC).
    Ng,
}

/// `[outputs]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputsSection {
    /// Pulse or level.
    #[serde(default)]
    pub mode: OutputMode,
    /// Pulse width in milliseconds.
    #[serde(default = "default_pulse_ms")]
    pub pulse_ms: u64,
    /// Least low time between two pulses on one pin, in milliseconds; `None` means `pulse_ms`.
    /// Results that come faster wait for their pulse (in order), so a PLC counter sees one
    /// pulse per part, never two merged into one.
    #[serde(default)]
    pub gap_ms: Option<u64>,
    /// Where failures go.
    #[serde(default)]
    pub on_error: OnError,
}

impl OutputsSection {
    /// The low gap between two pulses on one pin: `gap_ms`, or the pulse width.
    pub fn gap_ms(&self) -> u64 {
        self.gap_ms.unwrap_or(self.pulse_ms)
    }
}

impl Default for OutputsSection {
    fn default() -> Self {
        OutputsSection {
            mode: OutputMode::Pulse,
            pulse_ms: default_pulse_ms(),
            gap_ms: None,
            on_error: OnError::ErrorPin,
        }
    }
}

/// What to drop when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// Keep the queued triggers, drop the new one.
    #[default]
    DropNewest,
    /// Drop the oldest queued trigger, queue the new one.
    DropOldest,
}

/// `[queue]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSection {
    /// Queue capacity.
    #[serde(default = "default_capacity")]
    pub capacity: usize,
    /// Drop policy.
    #[serde(default)]
    pub when_full: WhenFull,
}

impl Default for QueueSection {
    fn default() -> Self {
        QueueSection {
            capacity: default_capacity(),
            when_full: WhenFull::DropNewest,
        }
    }
}

/// `[camera]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraSection {
    /// Retries per trigger.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// First backoff in milliseconds.
    #[serde(default = "default_backoff")]
    pub backoff_ms: u64,
}

impl Default for CameraSection {
    fn default() -> Self {
        CameraSection {
            retries: default_retries(),
            backoff_ms: default_backoff(),
        }
    }
}

/// `[ng_images]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NgImagesSection {
    /// Folder.
    pub dir: PathBuf,
    /// Newest files kept.
    #[serde(default = "default_keep")]
    pub keep: usize,
}

fn one() -> usize {
    1
}
fn default_pulse_ms() -> u64 {
    50
}
fn default_capacity() -> usize {
    8
}
fn default_retries() -> u32 {
    3
}
fn default_backoff() -> u64 {
    20
}
fn default_keep() -> usize {
    500
}

impl AgentConfig {
    /// Reads and validates the config at `path`; relative paths become relative to its folder.
    pub fn load(path: &Path) -> Result<AgentConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            action: "reading",
            path: path.into(),
            source: e,
        })?;
        let mut config: AgentConfig = parse_toml(&text, path)?;
        config.validate(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut config.model.package);
        if let Some(sim) = config.sim.as_mut() {
            if !sim.is_test_pattern() {
                resolve(&mut sim.images);
            }
            if let Some(script) = sim.script.as_mut() {
                resolve(script);
            }
        }
        if let Some(ng) = config.ng_images.as_mut() {
            resolve(&mut ng.dir);
        }
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, message: &str| Err(Error::manifest(path, field, message));
        match self.board.kind {
            BoardKind::Sim if self.sim.is_none() => {
                return bad("sim", "required when board.kind = \"sim\"")
            }
            BoardKind::Linux if self.board.profile.is_none() => {
                return bad(
                    "board.profile",
                    "required when board.kind = \"linux\" (a profile name like \"rpi5\" or a file)",
                )
            }
            _ => {}
        }
        if self.model.threads == 0 || self.model.threads > 64 {
            return bad("model.threads", "expected 1..=64");
        }
        if self.queue.capacity == 0 || self.queue.capacity > 10_000 {
            return bad("queue.capacity", "expected 1..=10000");
        }
        if self.outputs.mode == OutputMode::Pulse && !(1..=10_000).contains(&self.outputs.pulse_ms)
        {
            return bad(
                "outputs.pulse_ms",
                "expected 1..=10000 milliseconds for mode = \"pulse\"",
            );
        }
        if self.outputs.mode == OutputMode::Pulse && !(1..=10_000).contains(&self.outputs.gap_ms())
        {
            return bad(
                "outputs.gap_ms",
                "expected 1..=10000 milliseconds for mode = \"pulse\" (a PLC cannot count pulses without low time between them)",
            );
        }
        if self.camera.retries > 100 || self.camera.backoff_ms > 10_000 {
            return bad("camera", "expected retries <= 100 and backoff_ms <= 10000");
        }
        if let Some(sim) = &self.sim {
            let sources = (sim.triggers > 0) as u8 + sim.script.is_some() as u8 + sim.stdin as u8;
            if sources != 1 {
                return bad("sim", "expected exactly one trigger source: triggers + period_ms, script, or stdin = true");
            }
            if sim.triggers > 0 && sim.period_ms == 0 {
                return bad("sim.period_ms", "expected at least 1");
            }
        }
        if self.ng_images.as_ref().is_some_and(|n| n.keep == 0) {
            return bad(
                "ng_images.keep",
                "expected at least 1 (omit [ng_images] to keep none)",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[board]
kind = "sim"

[model]
package = "pkg"

[sim]
images = "imgs"
triggers = 5
period_ms = 10

[queue]
capacity = 4
when_full = "drop-oldest"

[ng_images]
dir = "/tmp/ng"
"#;

    fn load(text: &str) -> Result<AgentConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        AgentConfig::load(&path).map(|mut c| {
            // Make resolved paths comparable across temp dirs.
            c.model.package = c
                .model
                .package
                .strip_prefix(dir.path())
                .unwrap_or(&c.model.package)
                .to_owned();
            c
        })
    }

    #[test]
    fn defaults_and_relative_paths() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.model.package, PathBuf::from("pkg"));
        assert_eq!(c.outputs.mode, OutputMode::Pulse);
        assert_eq!(c.outputs.pulse_ms, 50);
        assert_eq!((c.outputs.gap_ms, c.outputs.gap_ms()), (None, 50));
        let c = load(&format!("{GOOD}\n[outputs]\npulse_ms = 200\ngap_ms = 80\n")).unwrap();
        assert_eq!((c.outputs.pulse_ms, c.outputs.gap_ms()), (200, 80));
        assert_eq!(c.queue.when_full, WhenFull::DropOldest);
        assert_eq!(c.ng_images.unwrap().dir, PathBuf::from("/tmp/ng"));
    }

    #[test]
    fn errors_name_the_key_and_the_expected_value() {
        let cases = [
            (GOOD.replace("kind = \"sim\"", "kind = \"pi\""), "field `board.kind`: unknown variant `pi`, expected `sim` or `linux`"),
            (GOOD.replace("capacity = 4", "capacity = 0"), "field `queue.capacity`: expected 1..=10000"),
            (GOOD.replace("capacity = 4", "capacity = \"4\""), "field `queue.capacity`: invalid type: string \"4\", expected usize"),
            (GOOD.replace("when_full = \"drop-oldest\"", "when_full = \"block\""), "field `queue.when_full`: unknown variant `block`, expected `drop-newest` or `drop-oldest`"),
            (GOOD.replace("triggers = 5", "trigers = 5"), "field `sim.trigers`: unknown field"),
            (GOOD.replace("package = \"pkg\"", ""), "field `model.package`: required field is missing"),
            (GOOD.replace("kind = \"sim\"", "kind = \"linux\""), "field `board.profile`: required when board.kind = \"linux\""),
            (GOOD.replace("[ng_images]\ndir = \"/tmp/ng\"", "[ng_images]\ndir = \"/tmp/ng\"\nkeep = 0"), "field `ng_images.keep`"),
            (format!("{GOOD}\n[outputs]\ngap_ms = 0\n"), "field `outputs.gap_ms`: expected 1..=10000 milliseconds"),
            (format!("{GOOD}\n[outputs]\npulse_ms = 20000\n"), "field `outputs.pulse_ms`: expected 1..=10000"),
            (format!("{GOOD}\n[outputs]\ngap_ms = -1\n"), "field `outputs.gap_ms`: invalid value"),
        ];
        for (text, expected) in cases {
            let e = load(&text).unwrap_err().to_string();
            assert!(
                e.contains("agent.toml: ") && e.contains(expected),
                "expected {expected:?} in {e:?}"
            );
        }
    }
}
