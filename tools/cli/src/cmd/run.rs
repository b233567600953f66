//! `edgevlm run`: run any ONNX graph on given or seeded inputs, write outputs as .npy.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use edgevlm_runtime::onnx::dtype_name;
use edgevlm_runtime::synth::{random_input, SplitMix64};
use edgevlm_runtime::trace::NodeProfile;
use edgevlm_runtime::{npy, LoadOptions, Memory, OnnxModel, Tensor};
use serde_json::json;

/// Run an ONNX graph and print a JSON summary (shapes, dtypes, load and run times) on stdout.
///
/// Inputs not given with --input are filled deterministically from --seed (symbolic dims = 1).
#[derive(Debug, clap::Args)]
pub struct Cmd {
    /// The ONNX file.
    #[arg(long, value_name = "FILE")]
    onnx: PathBuf,
    /// An input tensor from a .npy file; repeat for several inputs.
    #[arg(long = "input", value_name = "NAME=FILE.npy")]
    inputs: Vec<String>,
    /// Write every output to `DIR/<output name>.npy` (names sanitised to `[A-Za-z0-9._-]`).
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// Threads for matrix products.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    #[command(flatten)]
    cache: super::CacheArgs,
    /// Seed for synthesized inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// After the first run, time N more runs and report min / median / max.
    #[arg(long, default_value_t = 0, value_name = "N")]
    repeat: usize,
    /// Load the graph with the shapes of the --input tensors fixed (symbolic dims become
    /// those sizes), as the runtime loads a vision encoder for its tile size. Without it,
    /// shapes are fixed only when the graph does not load with symbolic ones.
    #[arg(long)]
    fixed_shapes: bool,
    /// After the timed runs, profile one more run per node and report the N slowest nodes
    /// (`profile` in the JSON: node name, operator, milliseconds, share of the run).
    #[arg(long, default_value_t = 0, value_name = "N")]
    profile: usize,
    /// Keep QDQ Softmax as tract 0.23.9 folds it (wrong results; for reproducing the tract bug).
    #[arg(long)]
    keep_qdq_softmax: bool,
    /// Let tract fold reshapes into 4-bit block-quantized products as 0.23.9 does (wrong
    /// results; for reproducing the tract bug).
    #[arg(long)]
    keep_bq_reshape_fold: bool,
    /// Do not compile 4-bit products a second time for prompts (prefill): less memory
    /// (the weights of those products are held once), slower prefill.
    #[arg(long)]
    no_prefill_plans: bool,
    /// Leave products and attention to tract's kernels instead of edgevlm's x86 ones (AVX-512:
    /// 8-bit, f32 and 4-bit products and attention; AVX2: 8-bit and f32 products), for
    /// comparing the two. Other CPUs always run tract's.
    #[arg(long)]
    no_avx512_kernels: bool,
    /// Run float16 graphs in float16 on tract's kernels instead of in float32 (slow on
    /// CPUs without float16 arithmetic; for comparing the two).
    #[arg(long)]
    keep_f16: bool,
    /// Leave static-QDQ products to tract (float32 products on dequantized weights) instead
    /// of running them as integer products (for comparing the two).
    #[arg(long)]
    keep_qdq_products: bool,
    /// Compute this output (e.g. a decoder's `logits`) for the last position of its axis 1
    /// only, as generation does: the product behind it then multiplies one row (repeatable).
    #[arg(long = "last-position", value_name = "OUTPUT")]
    last_position: Vec<String>,
}

impl Cmd {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        // Memory before the model exists, so benchmarks can report what the model costs.
        let base = Memory::sample();
        let options = LoadOptions {
            threads: self.threads as usize,
            fix_qdq_softmax: !self.keep_qdq_softmax,
            fix_block_quant_reshape: !self.keep_bq_reshape_fold,
            prefill_plans: !self.no_prefill_plans,
            avx512_kernels: !self.no_avx512_kernels,
            f16_as_f32: !self.keep_f16,
            qdq_integer_products: !self.keep_qdq_products,
            cache_dir: self.cache.dir(),
            last_position_outputs: self.last_position.clone(),
        };
        let mut files = vec![];
        for arg in &self.inputs {
            let (name, file) = arg
                .split_once('=')
                .with_context(|| format!("--input {arg:?}: expected NAME=FILE.npy"))?;
            files.push((name, file, None));
        }
        let model = if self.fixed_shapes && !files.is_empty() {
            load_fixed(&self.onnx, &options, &mut files).context("loading the model")?
        } else {
            match OnnxModel::load(&self.onnx, &options) {
                Ok(m) => m,
                // Some graphs only type-check with concrete input sizes (reshapes by
                // expressions of symbolic sides): the given inputs provide them.
                Err(first) if !files.is_empty() => load_fixed(&self.onnx, &options, &mut files)
                    .map_err(|_| first)
                    .context("loading the model")?,
                Err(e) => return Err(anyhow::Error::new(e).context("loading the model")),
            }
        };
        let mut given: Vec<Option<Tensor>> = vec![None; model.inputs().len()];
        let mut sources = vec!["seed".to_string(); model.inputs().len()];
        for (name, file, tensor) in files {
            let Some(i) = model.input_index(name) else {
                let names: Vec<_> = model.inputs().iter().map(|s| s.name.as_str()).collect();
                bail!(
                    "--input {name}: the model has no input {name:?} (inputs: {})",
                    names.join(", ")
                );
            };
            let tensor = match tensor {
                Some(t) => t,
                None => npy::read(Path::new(file))?,
            };
            model.inputs()[i].check(&tensor)?;
            given[i] = Some(tensor);
            sources[i] = file.to_string();
        }
        let mut rng = SplitMix64::new(self.seed);
        let inputs = model
            .inputs()
            .iter()
            .zip(given)
            .map(|(spec, t)| t.map(Ok).unwrap_or_else(|| random_input(spec, &mut rng)))
            .collect::<Result<Vec<_>, _>>()?;

        let start = Instant::now();
        let outputs = model.run(inputs.clone())?;
        let first_ms = ms(start);
        let mut times = Vec::with_capacity(self.repeat);
        for _ in 0..self.repeat {
            let start = Instant::now();
            model.run(inputs.clone())?;
            times.push(ms(start));
        }
        let memory = Memory::sample();
        let profile = if self.profile > 0 {
            let mut p = NodeProfile::new();
            model.run_profiled(inputs.clone(), &mut p)?;
            let total = p.total().as_secs_f64().max(f64::MIN_POSITIVE);
            let top: Vec<_> = p
                .ranked()
                .into_iter()
                .take(self.profile)
                .map(|n| {
                    json!({
                        "name": n.name, "op": n.op, "ms": round(n.total.as_secs_f64() * 1e3),
                        "share": round(n.total.as_secs_f64() / total), "calls": n.calls,
                    })
                })
                .collect();
            json!({ "total_ms": round(total * 1e3), "nodes": top, "by_op": by_op(&p, total) })
        } else {
            serde_json::Value::Null
        };

        let files = match &self.output_dir {
            Some(dir) => write_outputs(dir, &model, &outputs)?,
            None => vec![None; outputs.len()],
        };
        let summary = json!({
            "model": self.onnx,
            "tract": edgevlm_runtime::TRACT_VERSION,
            "threads": self.threads,
            "load_ms": round(model.load_ms()),
            "load_stages_ms": model.load_stages().iter().map(|(stage, ms)| json!({ "stage": stage, "ms": round(*ms) })).collect::<Vec<_>>(),
            "notes": model.notes(),
            "inputs": model.inputs().iter().zip(&inputs).zip(&sources).map(|((spec, t), src)| json!({
                "name": spec.name, "dtype": dtype_name(t.datum_type()), "shape": t.shape(),
                "declared": spec.shape_string(), "source": src,
            })).collect::<Vec<_>>(),
            "outputs": model.outputs().iter().zip(&outputs).zip(&files).map(|((spec, t), file)| json!({
                "name": spec.name, "dtype": dtype_name(t.datum_type()), "shape": t.shape(), "file": file,
            })).collect::<Vec<_>>(),
            "first_run_ms": round(first_ms),
            "repeat": stats(&times),
            "base_rss_kb": base.rss_kb,
            "rss_kb": memory.rss_kb,
            "peak_rss_kb": memory.peak_rss_kb,
            "profile": profile,
        });
        let mut out = std::io::stdout().lock();
        writeln!(out, "{summary}")?;
        Ok(ExitCode::SUCCESS)
    }
}

/// Loads `onnx` with the shapes of the given input files fixed, reading each file once (the
/// tensors are kept in `files` for the run).
fn load_fixed(
    onnx: &Path,
    options: &LoadOptions,
    files: &mut [(&str, &str, Option<Tensor>)],
) -> anyhow::Result<OnnxModel> {
    let mut shapes: Vec<(&str, Vec<Option<usize>>)> = vec![];
    for (name, file, tensor) in files.iter_mut() {
        let t = npy::read(Path::new(file))?;
        shapes.push((*name, t.shape().iter().map(|d| Some(*d)).collect()));
        *tensor = Some(t);
    }
    let fixed: Vec<(&str, &[Option<usize>])> =
        shapes.iter().map(|(n, d)| (*n, d.as_slice())).collect();
    Ok(OnnxModel::load_with_dims(onnx, options, &fixed)?)
}

/// Node time summed per operator name, largest first: which kind of node a graph spends in.
fn by_op(profile: &NodeProfile, total: f64) -> Vec<serde_json::Value> {
    let mut ops: Vec<(String, f64, u64)> = vec![];
    for n in profile.ranked() {
        match ops.iter_mut().find(|(op, _, _)| *op == n.op) {
            Some((_, t, c)) => {
                *t += n.total.as_secs_f64();
                *c += 1;
            }
            None => ops.push((n.op.clone(), n.total.as_secs_f64(), 1)),
        }
    }
    ops.sort_by(|a, b| b.1.total_cmp(&a.1));
    ops.into_iter()
        .map(|(op, t, nodes)| {
            json!({ "op": op, "ms": round(t * 1e3), "share": round(t / total), "nodes": nodes })
        })
        .collect()
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn stats(times: &[f64]) -> serde_json::Value {
    if times.is_empty() {
        return serde_json::Value::Null;
    }
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0
    };
    json!({ "runs": sorted.len(), "min_ms": round(sorted[0]), "median_ms": round(median), "max_ms": round(sorted[sorted.len() - 1]) })
}

/// A file name for an output: `[A-Za-z0-9._-]` kept, anything else `_`, no leading dot,
/// made unique with a numeric suffix.
fn sanitize(name: &str, taken: &mut HashSet<String>) -> String {
    let mut base: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if base.is_empty() || base.starts_with('.') {
        base.insert(0, '_');
    }
    let mut candidate = base.clone();
    let mut n = 1;
    while !taken.insert(candidate.clone()) {
        candidate = format!("{base}_{n}");
        n += 1;
    }
    candidate
}

fn write_outputs(
    dir: &Path,
    model: &OnnxModel,
    outputs: &[Tensor],
) -> anyhow::Result<Vec<Option<String>>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut taken = HashSet::new();
    model
        .outputs()
        .iter()
        .zip(outputs)
        .map(|(spec, t)| {
            let path = dir.join(format!("{}.npy", sanitize(&spec.name, &mut taken)));
            npy::write(&path, t)?;
            Ok(Some(path.display().to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitizes_output_names() {
        let mut taken = HashSet::new();
        assert_eq!(sanitize("present.0.key", &mut taken), "present.0.key");
        assert_eq!(sanitize("a/b:0", &mut taken), "a_b_0");
        assert_eq!(sanitize("a?b:0", &mut taken), "a_b_0_1");
        assert_eq!(sanitize("../etc", &mut taken), "_.._etc");
        assert_eq!(sanitize("", &mut taken), "_");
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(stats(&[3.0, 1.0, 2.0])["median_ms"], 2.0);
        assert_eq!(stats(&[4.0, 1.0, 2.0, 3.0])["median_ms"], 2.5);
        assert!(stats(&[]).is_null());
    }
}
