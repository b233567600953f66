//! edgevlm runtime: load quantized ONNX models through tract, turn camera frames into tensors,
//! run them and return results with per-stage traces.
//!
//! ```no_run
//! use edgevlm_runtime::{Classifier, LoadOptions};
//! let mut c = Classifier::load("models/demo".as_ref(), &LoadOptions::default())?;
//! let r = c.inspect_file("models/demo/samples/ok_01.png".as_ref())?;
//! println!("{} {:?} infer {} us", r.verdict, r.classes[0], r.trace.stage_us(edgevlm_runtime::Stage::Infer));
//! # Ok::<(), edgevlm_runtime::Error>(())
//! ```
#![warn(missing_docs)]

#[allow(unsafe_code)]
pub mod alloc;
#[allow(unsafe_code)]
pub mod attention;
pub mod cache;
pub mod classify;
#[allow(unsafe_code)]
pub mod conv;
pub mod error;
pub mod generate;
pub mod hf;
pub mod idefics3;
pub mod import;
// The modules with `unsafe` (SIMD intrinsics and raw tile pointers, each block with its
// SAFETY argument): attention, int8mm and q4mm; and mapped (file mappings).
#[allow(unsafe_code)]
pub mod int8mm;
pub mod manifest;
#[allow(unsafe_code)]
mod mapped;
pub mod nbits;
pub mod nnef_text;
pub mod npy;
pub mod onnx;
pub mod package;
mod par;
pub mod patches;
pub mod pipeline;
pub mod preprocess;
#[allow(unsafe_code)]
pub mod q4mm;
pub mod qdq;
pub mod quant;
pub mod resample;
pub mod sampling;
pub mod synth;
#[allow(unsafe_code)]
mod team;
pub mod text;
pub mod trace;
pub mod upcast;

pub use classify::{ClassScore, Verdict};
pub use error::{error_chain, Error, Result};
pub use generate::{
    FirstPrompt, GenerateOptions, Generation, GenerationStats, Generator, PreparedPrompt,
    StopReason,
};
pub use manifest::{parse_toml, Manifest};
pub use onnx::{Dim, LoadOptions, OnnxModel, TensorSpec, TRACT_VERSION};
pub use package::ModelPackage;
pub use pipeline::{Classifier, Inspection, Inspector, VlmInspector};
pub use preprocess::{Frame, FrameFormat, RgbImage};
pub use sampling::Sampling;
pub use trace::{Memory, Stage, Trace};

/// A tensor's elements as `T`, cast if needed (e.g. f16 outputs read as f32).
pub fn values<T: tract_onnx::prelude::Datum + Copy>(t: &Tensor) -> Result<Vec<T>> {
    let cast = t.cast_to::<T>().map_err(|e| Error::Inference(e.into()))?;
    let view = cast
        .to_plain_array_view::<T>()
        .map_err(|e| Error::Inference(e.into()))?;
    Ok(view.iter().copied().collect())
}

/// Re-exported so users can build input tensors without naming tract themselves.
pub use tract_onnx::prelude::{DatumType, Tensor};
