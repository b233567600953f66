//! Board profiles: one TOML per board naming its GPIO chip and lines, camera and memory budget.
//!
//! ```toml
//! name = "rpi4"
//! description = "Raspberry Pi 4 Model B, 40-pin header I/O, USB camera"
//! memory_budget_mb = 1024
//!
//! [gpio]
//! chip = "pinctrl-bcm2711"      # a label, a name (gpiochip0) or a path (/dev/gpiochip0)
//!
//! [gpio.trigger]
//! line = 17
//! edge = "rising"               # rising | falling | both (of the logical level)
//! active_low = true             # default false
//! bias = "pull-up"              # pull-up | pull-down | disabled | as-is (default)
//! debounce_ms = 10              # default 0
//!
//! [gpio.outputs]
//! ok = 22
//! ng = 27
//! error = 23                    # optional
//! busy = 24                     # optional
//! active_low = false            # default false
//!
//! [camera]
//! device = "/dev/video0"
//! width = 1280
//! height = 720
//! format = "MJPG"               # MJPG | YUYV
//! fps = 30                      # optional: the driver's default otherwise
//! ```
//!
//! The profiles shipped in `boards/profiles/` are built in ([`BoardProfile::builtin`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgevlm_board::{Edge, PixelFormat, TriggerConfig};
use serde::{Deserialize, Serialize};

/// The built-in profiles, by name: the files of `boards/profiles/`.
const BUILTIN: &[(&str, &str)] = &[
    ("rpi4", include_str!("../../profiles/rpi4.toml")),
    ("rpi5", include_str!("../../profiles/rpi5.toml")),
    (
        "jetson-orin-nano",
        include_str!("../../profiles/jetson-orin-nano.toml"),
    ),
];

/// Largest accepted debounce: longer than any contact bounce, shorter than a part's passage.
const MAX_DEBOUNCE_MS: u32 = 1000;
/// Largest accepted frame side (V4L2 drivers top out well below this).
const MAX_SIDE: u32 = 16384;

/// A parsed and validated board profile.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BoardProfile {
    /// Profile name: letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// GPIO chip and lines.
    pub gpio: GpioProfile,
    /// The camera.
    pub camera: CameraProfile,
    /// Memory edgevlm may use for models and buffers, in MiB.
    pub memory_budget_mb: u32,
}

/// `[gpio]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GpioProfile {
    /// The chip: a label (`pinctrl-rp1`), a device name (`gpiochip0`) or a path.
    pub chip: String,
    /// The part-present input.
    pub trigger: TriggerLine,
    /// The result outputs.
    pub outputs: OutputLines,
}

/// `[gpio.trigger]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerLine {
    /// Line offset on the chip.
    pub line: u32,
    /// The edge that fires, of the logical level (after `active_low`).
    #[serde(default = "rising")]
    pub edge: TriggerEdge,
    /// The input is active at 0 V.
    #[serde(default)]
    pub active_low: bool,
    /// Pull resistor.
    #[serde(default)]
    pub bias: Bias,
    /// How long a new level must hold to count, in ms.
    #[serde(default)]
    pub debounce_ms: u32,
}

/// `[gpio.outputs]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputLines {
    /// Part is good.
    pub ok: u32,
    /// Part is rejected.
    pub ng: u32,
    /// The station could not judge the part (errors go to NG without it).
    #[serde(default)]
    pub error: Option<u32>,
    /// High while a part is being judged.
    #[serde(default)]
    pub busy: Option<u32>,
    /// The outputs are active at 0 V (inverting drivers, many relay modules).
    #[serde(default)]
    pub active_low: bool,
}

/// Trigger edge as written in a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TriggerEdge {
    /// Inactive to active.
    Rising,
    /// Active to inactive.
    Falling,
    /// Either.
    Both,
}

fn rising() -> TriggerEdge {
    TriggerEdge::Rising
}

impl From<TriggerEdge> for Edge {
    fn from(e: TriggerEdge) -> Edge {
        match e {
            TriggerEdge::Rising => Edge::Rising,
            TriggerEdge::Falling => Edge::Falling,
            TriggerEdge::Both => Edge::Both,
        }
    }
}

/// Pull resistor of an input line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bias {
    /// Pull towards the supply.
    PullUp,
    /// Pull towards ground.
    PullDown,
    /// No pull.
    Disabled,
    /// Leave whatever the firmware or device tree set.
    #[default]
    AsIs,
}

/// `[camera]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CameraProfile {
    /// V4L2 device node.
    pub device: PathBuf,
    /// Frame width in pixels.
    pub width: u32,
    /// Frame height in pixels.
    pub height: u32,
    /// Pixel format requested from the driver.
    pub format: CameraFormat,
    /// Frame rate; the driver's default when absent.
    #[serde(default)]
    pub fps: Option<u32>,
}

/// Pixel format requested from a V4L2 camera.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum CameraFormat {
    /// Motion JPEG: one JPEG per frame (USB cameras at 720p and above).
    #[serde(rename = "MJPG")]
    Mjpg,
    /// Packed 4:2:2 YUYV, uncompressed.
    #[serde(rename = "YUYV")]
    Yuyv,
}

impl CameraFormat {
    /// The V4L2 four-character code.
    pub fn fourcc(self) -> [u8; 4] {
        match self {
            CameraFormat::Mjpg => *b"MJPG",
            CameraFormat::Yuyv => *b"YUYV",
        }
    }

    /// The format for a V4L2 four-character code, if it is one edgevlm captures.
    pub fn from_fourcc(code: [u8; 4]) -> Option<CameraFormat> {
        match &code {
            b"MJPG" => Some(CameraFormat::Mjpg),
            b"YUYV" => Some(CameraFormat::Yuyv),
            _ => None,
        }
    }

    /// The pixel format of frames captured in this format.
    pub fn pixel_format(self) -> PixelFormat {
        match self {
            CameraFormat::Mjpg => PixelFormat::Mjpeg,
            CameraFormat::Yuyv => PixelFormat::Yuyv,
        }
    }
}

/// A field of a profile that parses but makes no sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct InvalidField {
    /// Dotted path of the field, e.g. `gpio.outputs.ng`.
    pub field: String,
    /// What is wrong and what was expected.
    pub message: String,
}

/// Errors of loading a profile.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The file could not be read.
    #[error("reading board profile {path}: {source}")]
    Io {
        /// The profile file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A field is missing, unknown, mistyped or has an invalid value.
    #[error("{path}: field `{field}`: {message}")]
    Field {
        /// The profile file.
        path: PathBuf,
        /// Dotted path of the field (`.` for the whole file).
        field: String,
        /// What was expected.
        message: String,
    },
    /// [`BoardProfile::builtin`] does not know the name.
    #[error("no built-in board profile `{name}`; built-in: {}", BoardProfile::builtin_names().join(", "))]
    UnknownBuiltin {
        /// The name asked for.
        name: String,
    },
}

impl BoardProfile {
    /// Reads and validates the profile at `path`.
    pub fn load(path: &Path) -> Result<BoardProfile, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Io {
            path: path.to_owned(),
            source,
        })?;
        BoardProfile::parse(&text, path)
    }

    /// The built-in profile `name` (see [`BoardProfile::builtin_names`]).
    pub fn builtin(name: &str) -> Result<BoardProfile, ProfileError> {
        let (file, text) = BUILTIN
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| ProfileError::UnknownBuiltin { name: name.into() })?;
        BoardProfile::parse(
            text,
            &Path::new("boards/profiles").join(format!("{file}.toml")),
        )
    }

    /// A built-in profile by name (`rpi5`), or a profile file by path (anything with a `/` or
    /// ending in `.toml`), as a command line or config file would name a board.
    pub fn resolve(spec: &str) -> Result<BoardProfile, ProfileError> {
        if spec.contains('/') || spec.ends_with(".toml") {
            BoardProfile::load(Path::new(spec))
        } else {
            BoardProfile::builtin(spec)
        }
    }

    /// Names of the built-in profiles.
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(n, _)| *n).collect()
    }

    /// Parses and validates profile text; `path` is used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<BoardProfile, ProfileError> {
        let field_error = |field: String, message: String| ProfileError::Field {
            path: path.to_owned(),
            field,
            message,
        };
        let profile: BoardProfile =
            edgevlm_config::parse_toml(text).map_err(|e| field_error(e.field, e.message))?;
        profile
            .validate()
            .map_err(|e| field_error(e.field, e.message))?;
        Ok(profile)
    }

    /// Checks what the types cannot: names, distinct lines, non-zero sizes, sane ranges.
    pub fn validate(&self) -> Result<(), InvalidField> {
        let bad = |field: &str, message: String| {
            Err(InvalidField {
                field: field.into(),
                message,
            })
        };
        let name_ok = !self.name.is_empty()
            && !self.name.starts_with('.')
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !name_ok {
            return bad(
                "name",
                format!(
                    "{:?}: expected letters, digits, `.`, `_` or `-`, not starting with `.`",
                    self.name
                ),
            );
        }
        if self.gpio.chip.trim().is_empty() {
            return bad(
                "gpio.chip",
                "empty: expected a chip label, name (gpiochip0) or path".into(),
            );
        }
        let out = &self.gpio.outputs;
        let lines = [
            ("gpio.trigger.line", Some(self.gpio.trigger.line)),
            ("gpio.outputs.ok", Some(out.ok)),
            ("gpio.outputs.ng", Some(out.ng)),
            ("gpio.outputs.error", out.error),
            ("gpio.outputs.busy", out.busy),
        ];
        for (i, (field, line)) in lines.iter().enumerate() {
            let Some(line) = line else { continue };
            if let Some((first, _)) = lines[..i].iter().find(|(_, l)| *l == Some(*line)) {
                return bad(
                    field,
                    format!("line {line} is already used by `{first}`: expected distinct lines"),
                );
            }
        }
        if self.gpio.trigger.debounce_ms > MAX_DEBOUNCE_MS {
            return bad(
                "gpio.trigger.debounce_ms",
                format!(
                    "{} ms: expected at most {MAX_DEBOUNCE_MS} ms",
                    self.gpio.trigger.debounce_ms
                ),
            );
        }
        let cam = &self.camera;
        if !cam.device.is_absolute() {
            return bad(
                "camera.device",
                format!(
                    "{:?}: expected an absolute path such as /dev/video0",
                    cam.device
                ),
            );
        }
        for (field, side) in [("camera.width", cam.width), ("camera.height", cam.height)] {
            if side == 0 || side > MAX_SIDE {
                return bad(field, format!("{side}: expected 1 to {MAX_SIDE} pixels"));
            }
        }
        if cam.format == CameraFormat::Yuyv && !cam.width.is_multiple_of(2) {
            return bad(
                "camera.width",
                format!(
                    "{}: YUYV packs two pixels per 4 bytes, expected an even width",
                    cam.width
                ),
            );
        }
        if cam.fps == Some(0) {
            return bad(
                "camera.fps",
                "0: expected at least 1, or no fps for the driver's default".into(),
            );
        }
        if self.memory_budget_mb == 0 {
            return bad("memory_budget_mb", "0: expected at least 1 MiB".into());
        }
        Ok(())
    }

    /// The trigger settings of this profile.
    pub fn trigger_config(&self) -> TriggerConfig {
        TriggerConfig {
            edge: self.gpio.trigger.edge.into(),
            debounce: Duration::from_millis(self.gpio.trigger.debounce_ms.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "test-board"
memory_budget_mb = 512

[gpio]
chip = "gpiochip0"

[gpio.trigger]
line = 17
edge = "falling"
bias = "pull-down"
debounce_ms = 5

[gpio.outputs]
ok = 22
ng = 27
busy = 24

[camera]
device = "/dev/video0"
width = 640
height = 480
format = "YUYV"
"#;

    fn err(text: &str) -> String {
        BoardProfile::parse(text, Path::new("site/board.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parses_a_profile_with_defaults() {
        let p = BoardProfile::parse(GOOD, Path::new("board.toml")).unwrap();
        assert_eq!(p.description, "");
        assert_eq!(p.gpio.trigger.edge, TriggerEdge::Falling);
        assert_eq!(p.gpio.trigger.bias, Bias::PullDown);
        assert!(!p.gpio.trigger.active_low);
        assert_eq!(
            (p.gpio.outputs.error, p.gpio.outputs.busy),
            (None, Some(24))
        );
        assert_eq!(p.camera.format, CameraFormat::Yuyv);
        assert_eq!(p.camera.fps, None);
        assert_eq!(
            p.trigger_config(),
            TriggerConfig {
                edge: Edge::Falling,
                debounce: Duration::from_millis(5)
            }
        );
        let minimal = GOOD
            .replace("edge = \"falling\"\n", "")
            .replace("bias = \"pull-down\"\n", "")
            .replace("debounce_ms = 5\n", "");
        let p = BoardProfile::parse(&minimal, Path::new("board.toml")).unwrap();
        assert_eq!(p.gpio.trigger.edge, TriggerEdge::Rising);
        assert_eq!(p.gpio.trigger.bias, Bias::AsIs);
        assert_eq!(p.trigger_config().debounce, Duration::ZERO);
    }

    #[test]
    fn builtin_profiles_parse_and_validate() {
        for name in BoardProfile::builtin_names() {
            let p = BoardProfile::builtin(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(p.name, name);
            assert!(!p.description.is_empty(), "{name}");
            assert!(p.gpio.outputs.error.is_some() && p.gpio.outputs.busy.is_some());
        }
        let pi5 = BoardProfile::builtin("rpi5").unwrap();
        assert_eq!(pi5.gpio.chip, "pinctrl-rp1");
        assert_eq!(pi5.gpio.trigger.line, 17);
        assert_eq!(pi5.camera.format, CameraFormat::Mjpg);
        let e = BoardProfile::builtin("rpi3").unwrap_err().to_string();
        assert_eq!(
            e,
            "no built-in board profile `rpi3`; built-in: rpi4, rpi5, jetson-orin-nano"
        );
    }

    #[test]
    fn profile_files_on_disk_match_the_builtins() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles");
        for name in BoardProfile::builtin_names() {
            let p = BoardProfile::load(&dir.join(format!("{name}.toml"))).unwrap();
            assert_eq!(p, BoardProfile::builtin(name).unwrap());
        }
        let path = dir.join("rpi4.toml");
        assert_eq!(
            BoardProfile::resolve(path.to_str().unwrap()).unwrap(),
            BoardProfile::resolve("rpi4").unwrap()
        );
        assert!(matches!(
            BoardProfile::resolve("rpi9"),
            Err(ProfileError::UnknownBuiltin { .. })
        ));
        assert!(matches!(
            BoardProfile::resolve("site.toml"),
            Err(ProfileError::Io { .. })
        ));
        let e = BoardProfile::load(&dir.join("nope.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("reading board profile ") && e.contains("nope.toml"),
            "{e}"
        );
    }

    #[test]
    fn names_file_and_field_of_every_error() {
        let cases = [
            (
                GOOD.replace("ng = 27\n", ""),
                "site/board.toml: field `gpio.outputs.ng`: required field is missing",
            ),
            (
                GOOD.replace("memory_budget_mb = 512\n", ""),
                "site/board.toml: field `memory_budget_mb`: required field is missing",
            ),
            (
                GOOD.replace("line = 17", "line = 17\npin = 11"),
                "site/board.toml: field `gpio.trigger.pin`: unknown field (line ",
            ),
            (
                GOOD.replace("name = ", "colour = \"red\"\nname = "),
                "field `colour`: unknown field (line 2); expected one of `name`",
            ),
            (
                GOOD.replace("edge = \"falling\"", "edge = \"down\""),
                "field `gpio.trigger.edge`: unknown variant `down`, expected one of `rising`, `falling`, `both`",
            ),
            (
                GOOD.replace("bias = \"pull-down\"", "bias = \"pullup\""),
                "field `gpio.trigger.bias`: unknown variant `pullup`, expected one of `pull-up`, `pull-down`, `disabled`, `as-is`",
            ),
            (
                GOOD.replace("format = \"YUYV\"", "format = \"H264\""),
                "field `camera.format`: unknown variant `H264`, expected `MJPG` or `YUYV`",
            ),
            (
                GOOD.replace("width = 640", "width = \"640\""),
                "field `camera.width`: invalid type: string \"640\", expected u32",
            ),
            (
                GOOD.replace("line = 17", "line = -1"),
                "field `gpio.trigger.line`: invalid value: integer `-1`, expected u32",
            ),
            (
                GOOD.replace("ng = 27", "ng = 22"),
                "field `gpio.outputs.ng`: line 22 is already used by `gpio.outputs.ok`",
            ),
            (
                GOOD.replace("busy = 24", "busy = 17"),
                "field `gpio.outputs.busy`: line 17 is already used by `gpio.trigger.line`",
            ),
            (
                GOOD.replace("busy = 24", "error = 24\nbusy = 24"),
                "field `gpio.outputs.busy`: line 24 is already used by `gpio.outputs.error`",
            ),
            (
                GOOD.replace("width = 640", "width = 0"),
                "field `camera.width`: 0: expected 1 to 16384 pixels",
            ),
            (
                GOOD.replace("height = 480", "height = 0"),
                "field `camera.height`: 0: expected 1 to 16384 pixels",
            ),
            (
                GOOD.replace("width = 640", "width = 641"),
                "field `camera.width`: 641: YUYV packs two pixels",
            ),
            (
                GOOD.replace("format = \"YUYV\"", "format = \"YUYV\"\nfps = 0"),
                "field `camera.fps`: 0: expected at least 1",
            ),
            (
                GOOD.replace("memory_budget_mb = 512", "memory_budget_mb = 0"),
                "field `memory_budget_mb`: 0: expected at least 1 MiB",
            ),
            (
                GOOD.replace("debounce_ms = 5", "debounce_ms = 5000"),
                "field `gpio.trigger.debounce_ms`: 5000 ms: expected at most 1000 ms",
            ),
            (
                GOOD.replace("\"/dev/video0\"", "\"video0\""),
                "field `camera.device`: \"video0\": expected an absolute path",
            ),
            (
                GOOD.replace("\"gpiochip0\"", "\" \""),
                "field `gpio.chip`: empty",
            ),
            (
                GOOD.replace("\"test-board\"", "\"../x\""),
                "field `name`: \"../x\": expected letters",
            ),
            (
                GOOD.replace("[camera]", "[camera\n"),
                "site/board.toml: field `.`",
            ),
        ];
        for (text, expected) in cases {
            let e = err(&text);
            assert!(e.contains(expected), "expected {expected:?} in {e:?}");
        }
    }

    #[test]
    fn camera_formats_map_to_fourcc_and_pixel_format() {
        for f in [CameraFormat::Mjpg, CameraFormat::Yuyv] {
            assert_eq!(CameraFormat::from_fourcc(f.fourcc()), Some(f));
        }
        assert_eq!(CameraFormat::Mjpg.pixel_format(), PixelFormat::Mjpeg);
        assert_eq!(CameraFormat::Yuyv.pixel_format(), PixelFormat::Yuyv);
        assert_eq!(CameraFormat::from_fourcc(*b"NV12"), None);
    }
}
