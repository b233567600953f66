//! `edgevlm models import`: a downloaded Hugging Face snapshot folder to a model package.
//!
//! The snapshot layouts handled are the public ONNX exports: SmolVLM / SmolVLM2
//! (`onnx/vision_encoder{suffix}.onnx`, `onnx/embed_tokens{suffix}.onnx`,
//! `onnx/decoder_model_merged{suffix}.onnx`) and optimum / transformers.js text decoders
//! (`model{suffix}.onnx` or `decoder_model_merged{suffix}.onnx`, at the top or under `onnx/`).
//! The variant is the suffix: `fp32` is none, every other is `_{variant}` (`_int8`, `_q4`, ...).
//!
//! Nothing is written until every graph has loaded through tract and fits the configuration
//! (operators, layers, heads, vocabulary): a variant the runtime cannot run is refused here,
//! not at its first inference. The package is assembled in a temporary folder beside `out` and
//! renamed into place.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::generate::{roles, Generator, GraphPaths};
use crate::hf::{files, Architecture, ModelConfig};
use crate::manifest::{GenerationSpec, GraphFile, Manifest, ModelInfo, PackageFile, Task};
use crate::onnx::LoadOptions;
use crate::package::{sha256_file, MANIFEST};

/// What to import.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Export variant (`fp32`, `fp16`, `int8`, `uint8`, `q4`, `q4f16`, `bnb4`, `quantized`);
    /// `None` takes fp32 when the snapshot has it.
    pub variant: Option<String>,
    /// Package name; default: the snapshot folder's name.
    pub name: Option<String>,
    /// Package version; default `1.0.0`.
    pub version: Option<String>,
    /// How graphs are loaded for the check.
    pub load: LoadOptions,
}

/// A written package.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The package directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// What the loader changed or noticed, per graph.
    pub notes: Vec<String>,
    /// Bytes of all files.
    pub bytes: u64,
}

/// Files copied into the package when the snapshot has them.
const SIDE_FILES: &[&str] = &[
    files::CONFIG,
    files::GENERATION_CONFIG,
    files::PREPROCESSOR_CONFIG,
    files::PROCESSOR_CONFIG,
    files::TOKENIZER,
    files::TOKENIZER_CONFIG,
    files::CHAT_TEMPLATE_JSON,
    files::CHAT_TEMPLATE_JINJA,
    files::SPECIAL_TOKENS_MAP,
];

fn suffix(variant: &str) -> String {
    if variant == "fp32" {
        String::new()
    } else {
        format!("_{variant}")
    }
}

/// Graph file stems per role, in the order they are looked for.
fn stems(architecture: Architecture) -> Vec<(&'static str, &'static [&'static str])> {
    if architecture.has_vision() {
        vec![
            (roles::VISION_ENCODER, &["vision_encoder"][..]),
            (roles::EMBED_TOKENS, &["embed_tokens"][..]),
            (roles::DECODER, &["decoder_model_merged"][..]),
        ]
    } else {
        vec![(roles::DECODER, &["model", "decoder_model_merged"][..])]
    }
}

/// Variants present in `snapshot` for the decoder (sorted).
pub fn variants(snapshot: &Path, architecture: Architecture) -> Vec<String> {
    let decoder_stems = stems(architecture)
        .into_iter()
        .find(|(role, _)| *role == roles::DECODER)
        .map(|(_, s)| s)
        .unwrap_or(&[]);
    let mut found = std::collections::BTreeSet::new();
    for dir in [snapshot.join("onnx"), snapshot.to_owned()] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(base) = name.strip_suffix(".onnx") else {
                continue;
            };
            for stem in decoder_stems {
                if base == *stem {
                    found.insert("fp32".to_string());
                } else if let Some(v) = base.strip_prefix(&format!("{stem}_")) {
                    found.insert(v.to_string());
                }
            }
        }
    }
    found.into_iter().collect()
}

fn find_graph(snapshot: &Path, stems: &[&str], variant: &str) -> Option<PathBuf> {
    for dir in [snapshot.join("onnx"), snapshot.to_owned()] {
        for stem in stems {
            let p = dir.join(format!("{stem}{}.onnx", suffix(variant)));
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// A package name from a folder name: letters, digits, `.`, `_`, `-` kept, others become `-`.
fn package_name(snapshot: &Path) -> String {
    let raw = snapshot
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    let name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    name.trim_start_matches('.').to_string()
}

/// Imports `snapshot` as a package at `out` (which must not exist yet).
pub fn import(snapshot: &Path, out: &Path, options: &ImportOptions) -> Result<Imported> {
    let refuse = |path: &Path, message: String| Error::Import {
        path: path.to_owned(),
        message,
    };
    if !snapshot.is_dir() {
        return Err(refuse(
            snapshot,
            "not a folder (expected a downloaded snapshot with config.json)".into(),
        ));
    }
    if out.exists() {
        return Err(refuse(
            out,
            "already exists (remove it or choose another --out)".into(),
        ));
    }
    let config = ModelConfig::load(snapshot)?;
    let architecture = config.architecture;
    let available = variants(snapshot, architecture);
    let variant = match &options.variant {
        Some(v) => v.clone(),
        None if available.iter().any(|v| v == "fp32") => "fp32".into(),
        None => {
            return Err(refuse(
                snapshot,
                format!("no fp32 export; choose --variant from {available:?}"),
            ))
        }
    };
    if variant.is_empty()
        || !variant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(refuse(
            snapshot,
            format!("variant {variant:?}: expected letters, digits or '_', e.g. int8 or q4"),
        ));
    }
    let mut graphs = vec![];
    for (role, role_stems) in stems(architecture) {
        let path = find_graph(snapshot, role_stems, &variant).ok_or_else(|| {
            let names: Vec<_> = role_stems
                .iter()
                .map(|s| format!("{s}{}.onnx", suffix(&variant)))
                .collect();
            refuse(
                snapshot,
                format!(
                    "no {} (role {role}) for variant {variant}; variants here: {available:?}",
                    names.join(" or ")
                ),
            )
        })?;
        graphs.push((role, path));
    }
    let path_of = |role: &str| {
        graphs
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, p)| p.clone())
    };
    let paths = GraphPaths {
        decoder: path_of(roles::DECODER).expect("every architecture has a decoder"),
        embed_tokens: path_of(roles::EMBED_TOKENS),
        vision_encoder: path_of(roles::VISION_ENCODER),
    };
    // The check: everything the package will load, loaded now.
    let generator = Generator::load(snapshot, &paths, &options.load)?;
    let notes = generator.notes();
    drop(generator);

    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io("creating", &parent, e))?;
    let staging = tempfile::Builder::new()
        .prefix(".edgevlm-import-")
        .tempdir_in(&parent)
        .map_err(|e| Error::io("creating a staging folder in", &parent, e))?;
    let mut bytes = 0u64;
    let mut copy = |from: &Path, rel: &str| -> Result<String> {
        let to = staging.path().join(rel);
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
        }
        bytes += std::fs::copy(from, &to).map_err(|e| Error::io("copying", from, e))?;
        sha256_file(&to)
    };
    let mut graph_entries = vec![];
    let mut file_entries = vec![];
    for (role, path) in &graphs {
        let name = path
            .file_name()
            .expect("found by name")
            .to_string_lossy()
            .into_owned();
        let rel = format!("onnx/{name}");
        graph_entries.push(GraphFile {
            role: role.to_string(),
            sha256: copy(path, &rel)?,
            file: rel,
        });
        // External weights (`x.onnx_data`, `x.onnx.data`, `x.onnx_data_1`) sit beside the graph
        // and are referenced by their file name.
        let dir = path.parent().expect("a file has a parent");
        let mut extra: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| Error::io("listing", dir, e))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != &name && n.starts_with(&name) && !n.ends_with(".onnx"))
            .collect();
        extra.sort();
        for n in extra {
            let rel = format!("onnx/{n}");
            file_entries.push(PackageFile {
                sha256: copy(&dir.join(&n), &rel)?,
                path: rel,
            });
        }
    }
    for name in SIDE_FILES {
        let from = snapshot.join(name);
        if from.is_file() {
            file_entries.push(PackageFile {
                sha256: copy(&from, name)?,
                path: name.to_string(),
            });
        }
    }
    let task = if architecture.has_vision() {
        Task::VisionLanguage
    } else {
        Task::TextGeneration
    };
    let manifest = Manifest {
        model: ModelInfo {
            name: options
                .name
                .clone()
                .unwrap_or_else(|| package_name(snapshot)),
            version: options.version.clone().unwrap_or_else(|| "1.0.0".into()),
            task,
            variant: variant.clone(),
            description: format!(
                "{} ({}) imported from {}",
                config.model_type,
                variant,
                snapshot.display()
            ),
        },
        graph: graph_entries,
        input: None,
        output: None,
        verdict: None,
        file: file_entries,
        generation: Some(GenerationSpec {
            architecture: architecture.name().into(),
            max_new_tokens: config.generation.max_new_tokens.unwrap_or(64).min(4096),
            stop: vec![],
        }),
        inspection: None,
    };
    let text = toml::to_string(&manifest).map_err(|e| {
        Error::manifest(
            out.join(MANIFEST),
            ".",
            format!("cannot write manifest: {e}"),
        )
    })?;
    let manifest_path = staging.path().join(MANIFEST);
    std::fs::write(&manifest_path, &text).map_err(|e| Error::io("writing", &manifest_path, e))?;
    // What is written must read back as a valid package.
    Manifest::parse(&text, &out.join(MANIFEST))?;
    let staged = staging.keep();
    if let Err(e) = std::fs::rename(&staged, out) {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(Error::io("moving the package into", out, e));
    }
    Ok(Imported {
        dir: out.to_owned(),
        manifest,
        notes,
        bytes,
    })
}
