//! Helpers for the agent tests: configs over the demo package and samples.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use edgevlm_agent::{AgentConfig, Event, PartRecord};

/// The repository's `models/` folder.
pub fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

/// Writes an agent.toml into `dir` (demo model, `images` folder) with extra TOML appended
/// under the given sections, and loads it.
pub fn config(
    dir: &Path,
    images: &Path,
    triggers: usize,
    period_ms: u64,
    extra: &str,
) -> AgentConfig {
    let text = format!(
        "[board]\nkind = \"sim\"\n\n[model]\npackage = {:?}\n\n[sim]\nimages = {:?}\ntriggers = {triggers}\nperiod_ms = {period_ms}\n\n{extra}\n",
        models().join("demo").display().to_string(),
        images.display().to_string(),
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    AgentConfig::load(&path).unwrap()
}

/// Copies the demo samples into `dir/name`.
pub fn samples_copy(dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(models().join("demo/samples")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to
}

/// Collects the part records of a run.
pub fn parts(events: &[Event]) -> Vec<PartRecord> {
    events
        .iter()
        .filter_map(|e| {
            if let Event::Part(p) = e {
                Some(p.clone())
            } else {
                None
            }
        })
        .collect()
}
