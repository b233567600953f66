//! A station on a Linux board (GPIO character device + V4L2), built from an agent config and
//! a board profile.

use edgevlm_board::{ThreadDelay, VerdictOutputs};
use edgevlm_board_linux::{BoardProfile, CdevOutput, CdevTrigger, OutputPins, V4l2Camera};

use crate::config::{AgentConfig, BoardKind, OnError};
use crate::sim::{load_inspector, pin_mode, settings, with_ng_store, SetupError};
use crate::station::Station;

/// The Linux station, its GPIO trigger and the profile it was built from.
pub type LinuxStation = (
    Station<V4l2Camera, CdevOutput, ThreadDelay>,
    CdevTrigger,
    BoardProfile,
);

/// Builds the station a config describes (`board.kind = "linux"`): opens the profile's GPIO
/// lines and camera and loads the model. Every failure names the device, line or file.
pub fn build(config: &AgentConfig) -> Result<LinuxStation, SetupError> {
    let spec = match (config.board.kind, &config.board.profile) {
        (BoardKind::Linux, Some(spec)) => spec,
        _ => {
            return Err(SetupError::Device(
                "a Linux board needs board.kind = \"linux\" and board.profile".into(),
            ))
        }
    };
    let device = |e: &dyn std::fmt::Display| SetupError::Device(e.to_string());
    let profile = BoardProfile::resolve(spec).map_err(|e| device(&e))?;
    // The model first: a bad package should not leave GPIO lines requested.
    let inspector = load_inspector(config)?;
    let pins = OutputPins::from_profile(&profile.gpio).map_err(|e| device(&e))?;
    let error_pin = if config.outputs.on_error == OnError::ErrorPin {
        pins.error
    } else {
        None
    };
    let mut outputs =
        VerdictOutputs::new(pins.ok, pins.ng, error_pin, pin_mode(config), ThreadDelay)
            .map_err(|e| device(&e))?;
    if let Some(busy) = pins.busy {
        outputs = outputs.with_busy(busy).map_err(|e| device(&e))?;
    }
    let trigger = CdevTrigger::from_profile(&profile.gpio).map_err(|e| device(&e))?;
    let camera = V4l2Camera::from_profile(&profile.camera).map_err(|e| device(&e))?;
    let station = with_ng_store(
        Station::new(camera, outputs, inspector, settings(config)),
        config,
    )?;
    Ok((station, trigger, profile))
}
