//! An `edgevlm agent --serial` process on one end of a serial line, killed when dropped.

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The running agent process.
#[derive(Debug)]
pub struct SerialAgent(Child);

impl SerialAgent {
    /// Starts `exe agent --serial DEVICE --baud BAUD --store STORE` with its output discarded.
    pub fn start(exe: &str, device: &Path, baud: u32, store: &Path) -> SerialAgent {
        let child = Command::new(exe)
            .args(["agent", "--serial"])
            .arg(device)
            .args(["--baud", &baud.to_string(), "--store"])
            .arg(store)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("agent starts");
        SerialAgent(child)
    }
}

impl Drop for SerialAgent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
