//! Loading ONNX graphs through tract: operator check, load-time rewrites, optimized plans, runs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tract_linalg::multithread::Executor;
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::RunOptions;

use crate::error::{Error, Result};
use crate::trace::NodeProfile;

/// The tract version this runtime is built against (one pin for the workspace).
pub const TRACT_VERSION: &str = "0.23.9";

/// How to load a graph.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Threads for matrix products (tract-linalg's executor); 1 runs everything on the caller's thread.
    pub threads: usize,
    /// Apply the QDQ Softmax rewrite (see [`rewrite_qdq_softmax`]). Only tests turn this off,
    /// to show the tract bug it works around is still there.
    pub fix_qdq_softmax: bool,
    /// Keep tract from folding reshapes into 4-bit block-quantized products (see
    /// [`crate::patches::protect_block_quant_products`]). Only tests turn this off, to show
    /// the tract bug it works around is still there.
    pub fix_block_quant_reshape: bool,
    /// Compile 4-bit products whose row count is only known at run time (a decoder's) a
    /// second time for many rows (see [`crate::patches::switch_products_on_rows`]): faster
    /// prefill, and those weights are held twice.
    pub prefill_plans: bool,
    /// Where the CPU has AVX-512, run 8-bit products with a constant weight (`MatMulInteger`,
    /// see [`crate::int8mm`]), f32 and 4-bit products and ViT attention (see
    /// [`crate::attention`]) on edgevlm's own kernels instead of tract's; where it has AVX2
    /// only, the 8-bit, f32 and 4-bit products and the attention (on the AVX2 int8 kernel and
    /// [`crate::q4mm`]'s AVX2 FMA tiles).
    pub avx512_kernels: bool,
    /// Run float16 graphs in float32 (see [`crate::upcast`]): tract has no fast float16
    /// path on most CPUs. The graph's float16 inputs and outputs stay float16.
    pub f16_as_f32: bool,
    /// Run static-QDQ `MatMul`s with a constant 8-bit weight as integer products (see
    /// [`crate::qdq`]) instead of tract's float32 product between quantize/dequantize passes.
    pub qdq_integer_products: bool,
    /// Keep each graph's decluttered model in this directory in tract's NNEF form and load it
    /// from there next time, skipping the ONNX protobuf, parsing, typing and decluttering
    /// (see [`crate::cache`]). A stale or unreadable entry is rebuilt; the notes say so.
    pub cache_dir: Option<PathBuf>,
    /// Outputs of which only the last position (axis 1) is ever read, such as a decoder's
    /// `logits` when generating: the product behind each is computed for that position only
    /// (see [`crate::patches::last_position_only`]), and the output has one position.
    pub last_position_outputs: Vec<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            threads: 1,
            fix_qdq_softmax: true,
            fix_block_quant_reshape: true,
            prefill_plans: true,
            avx512_kernels: true,
            f16_as_f32: true,
            qdq_integer_products: true,
            cache_dir: None,
            last_position_outputs: vec![],
        }
    }
}

/// One dimension of a model input or output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Dim {
    /// A fixed size.
    Fixed(usize),
    /// A symbol (ONNX `dim_param`) or an expression of symbols, e.g. `batch`.
    Symbol(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbol(s) => f.write_str(s),
        }
    }
}

/// Name, element type and shape of a model input or output.
#[derive(Debug, Clone, Serialize)]
pub struct TensorSpec {
    /// Tensor name in the graph.
    pub name: String,
    /// Element type, as tract names it (`F32`, `I64`, ...).
    #[serde(serialize_with = "serialize_dt")]
    pub datum_type: DatumType,
    /// Shape; symbolic dims accept any size.
    pub shape: Vec<Dim>,
}

fn serialize_dt<S: serde::Serializer>(
    dt: &DatumType,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&dtype_name(*dt))
}

/// A short lowercase dtype name (`f32`, `i64`, `u8`, `bool`).
pub fn dtype_name(dt: DatumType) -> String {
    format!("{dt:?}").to_lowercase()
}

impl TensorSpec {
    fn from_fact(name: String, fact: &TypedFact) -> TensorSpec {
        let shape = fact
            .shape
            .iter()
            .map(|d| match d.to_i64() {
                Ok(n) => Dim::Fixed(n as usize),
                Err(_) => Dim::Symbol(d.to_string()),
            })
            .collect();
        TensorSpec {
            name,
            datum_type: fact.datum_type,
            shape,
        }
    }

    /// Shape as text, e.g. `[batch,3,32,32]`.
    pub fn shape_string(&self) -> String {
        format!(
            "[{}]",
            self.shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(",")
        )
    }

    /// Checks a tensor against this spec: same dtype, rank and fixed dims.
    pub fn check(&self, t: &Tensor) -> Result<()> {
        let fits = t.datum_type() == self.datum_type
            && t.rank() == self.shape.len()
            && self.shape.iter().zip(t.shape()).all(|(d, n)| match d {
                Dim::Fixed(f) => f == n,
                Dim::Symbol(_) => true,
            });
        if fits {
            return Ok(());
        }
        Err(Error::Input {
            name: self.name.clone(),
            message: format!(
                "expected {} {}, got {} {:?}",
                dtype_name(self.datum_type),
                self.shape_string(),
                dtype_name(t.datum_type()),
                t.shape()
            ),
        })
    }

    /// A concrete shape for synthetic inputs: symbolic dims become 1.
    pub fn concrete_shape(&self) -> Vec<usize> {
        self.shape
            .iter()
            .map(|d| if let Dim::Fixed(n) = d { *n } else { 1 })
            .collect()
    }
}

/// A graph loaded into an optimized tract plan.
pub struct OnnxModel {
    path: PathBuf,
    plan: Arc<TypedRunnableModel>,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    notes: Vec<String>,
    load_ms: f64,
    load_stages: Vec<(&'static str, f64)>,
}

impl std::fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxModel")
            .field("path", &self.path)
            .field("inputs", &self.inputs)
            .finish()
    }
}

impl OnnxModel {
    /// Loads, checks, rewrites and optimizes an ONNX file.
    pub fn load(path: &Path, options: &LoadOptions) -> Result<OnnxModel> {
        OnnxModel::load_with_dims(path, options, &[])
    }

    /// Like [`OnnxModel::load`], with some symbolic input dims fixed first: `(input name,
    /// per-axis size or None to keep)`. Graphs that reshape by expressions of their input
    /// sizes (a vision encoder's `height / patch`) often only type-check once those are known.
    pub fn load_with_dims(
        path: &Path,
        options: &LoadOptions,
        fixed: &[(&str, &[Option<usize>])],
    ) -> Result<OnnxModel> {
        // What the load frees (the protobuf, weights before packing) goes back to the system
        // instead of staying in this thread's heap; inference splits leave this thread's core.
        crate::alloc::while_loading(|| OnnxModel::build(path, options, fixed))
    }

    fn build(
        path: &Path,
        options: &LoadOptions,
        fixed: &[(&str, &[Option<usize>])],
    ) -> Result<OnnxModel> {
        let start = Instant::now();
        std::fs::metadata(path).map_err(|e| Error::io("opening", path, e))?;
        let mut notes = vec![];
        let mut load_stages = vec![];
        let slot = match options.cache_dir.as_deref() {
            Some(dir) => match crate::cache::Slot::new(dir, path, options, fixed) {
                Ok(slot) => Some(slot),
                Err(e) => {
                    notes.push(format!("cache: not used ({e})"));
                    None
                }
            },
            None => None,
        };
        // A cached model that reads back but then fails to build is a broken entry like any
        // other: the load goes on from the ONNX file and rewrites it.
        let cached = slot.as_ref().map(|slot| {
            slot.read().and_then(|(model, cached_notes, mapped)| {
                from_cache(slot, model, mapped, options, start).map(|b| (b, cached_notes))
            })
        });
        let typed = match cached {
            Some(Ok((built, cached_notes))) => {
                notes.extend(cached_notes);
                notes.extend(built.notes);
                load_stages.extend(built.stages);
                built.model
            }
            miss => {
                let keep = slot.is_some();
                let (decluttered, built) =
                    from_onnx(path, options, fixed, keep, &mut notes, &mut load_stages)?;
                if let (Some(slot), Some(decluttered), Some(Err(miss))) = (&slot, decluttered, miss)
                {
                    // The notes of the stages the cache skips, before the optimizer's.
                    let skipped = notes.clone();
                    let writing = Instant::now();
                    notes.push(match slot.write(decluttered, &skipped) {
                        Ok(bytes) => format!(
                            "cache: {miss}; {} {} ({:.1} MiB)",
                            crate::cache::WRITTEN_NOTE,
                            slot.archive().display(),
                            bytes as f64 / (1 << 20) as f64
                        ),
                        Err(e) => format!("cache: {miss}; not written ({e})"),
                    });
                    load_stages.push(("write cache", writing.elapsed().as_secs_f64() * 1e3));
                }
                notes.extend(built.notes);
                load_stages.extend(built.stages);
                built.model
            }
        };
        let inputs = facts(
            &typed,
            Side::Input,
            typed
                .input_outlets()
                .map_err(|e| Error::model(path, "reading inputs", e))?,
        )?;
        let outputs = facts(
            &typed,
            Side::Output,
            typed
                .output_outlets()
                .map_err(|e| Error::model(path, "reading outputs", e))?,
        )?;
        let planning = Instant::now();
        let plan = typed
            .into_runnable_with_options(&run_options(options))
            .map_err(|e| Error::model(path, "building the execution plan", e))?;
        load_stages.push(("plan", planning.elapsed().as_secs_f64() * 1e3));
        Ok(OnnxModel {
            path: path.to_owned(),
            plan,
            inputs,
            outputs,
            notes,
            load_ms: start.elapsed().as_secs_f64() * 1e3,
            load_stages,
        })
    }

    /// The graph file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Model inputs in graph order.
    pub fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    /// Model outputs in graph order.
    pub fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    /// What the loader changed or ignored to load this graph.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Milliseconds from file to runnable plan.
    pub fn load_ms(&self) -> f64 {
        self.load_ms
    }

    /// Where [`OnnxModel::load_ms`] went: (stage, milliseconds) in order: read and decode,
    /// parse, types and shapes, patches, declutter, dynamic quantize, f32 packing, prefill
    /// plans, edgevlm kernels, optimize, constant folds, plan (from the load cache: read
    /// cache and declutter cached, then prefill plans on). Cold start is the sum.
    pub fn load_stages(&self) -> &[(&'static str, f64)] {
        &self.load_stages
    }

    /// Index of the input or output called `name`.
    pub fn input_index(&self, name: &str) -> Option<usize> {
        self.inputs.iter().position(|s| s.name == name)
    }

    /// Index of the output called `name`.
    pub fn output_index(&self, name: &str) -> Option<usize> {
        self.outputs.iter().position(|s| s.name == name)
    }

    /// Runs the plan on inputs given in graph order, after checking them against the specs.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        self.check_inputs(&inputs)?;
        let outputs = self
            .plan
            .run(inputs.into_iter().map(|t| t.into_tvalue()).collect())
            .map_err(|e| Error::Inference(e.into()))?;
        Ok(outputs.into_iter().map(|v| v.into_tensor()).collect())
    }

    /// Like [`OnnxModel::run`], timing every node of the plan into `profile`.
    ///
    /// Goes through tract's `SimpleState::run_plan_with_eval`: each node's evaluation is
    /// wrapped in a clock read, nothing else changes (no input is cloned), so the outputs are
    /// those of [`OnnxModel::run`]. The clock reads cost a little per node: keep profiled runs
    /// apart from timed ones.
    pub fn run_profiled(
        &self,
        inputs: Vec<Tensor>,
        profile: &mut NodeProfile,
    ) -> Result<Vec<Tensor>> {
        self.check_inputs(&inputs)?;
        let mut state = self.plan.spawn().map_err(|e| Error::Inference(e.into()))?;
        let outputs = state
            .run_plan_with_eval(
                inputs.into_iter().map(|t| t.into_tvalue()).collect(),
                |ctx, op_state, node, node_inputs| {
                    let start = Instant::now();
                    let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, node_inputs);
                    profile.record(node.id, &node.name, &node.op().name(), start.elapsed());
                    out
                },
            )
            .map_err(|e| Error::Inference(e.into()))?;
        profile.finish_run();
        Ok(outputs.into_iter().map(|v| v.into_tensor()).collect())
    }

    fn check_inputs(&self, inputs: &[Tensor]) -> Result<()> {
        if inputs.len() != self.inputs.len() {
            return Err(Error::Input {
                name: "*".into(),
                message: format!(
                    "model takes {} inputs ({}), got {}",
                    self.inputs.len(),
                    self.inputs
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    inputs.len()
                ),
            });
        }
        for (spec, t) in self.inputs.iter().zip(inputs) {
            spec.check(t)?;
        }
        Ok(())
    }
}

/// The optimized model from a cached decluttered one, with every stage's time from `start`
/// on (reading the entry included). A failure is the entry's: the caller loads from ONNX.
fn from_cache(
    slot: &crate::cache::Slot,
    mut decluttered: TypedModel,
    mapped: usize,
    options: &LoadOptions,
    start: Instant,
) -> std::result::Result<Built, crate::cache::Miss> {
    let broken = |stage: &str, e: TractError| {
        crate::cache::Miss::Broken(format!(
            "{}: {stage}: {}",
            slot.archive().display(),
            e.root_cause()
        ))
    };
    let mut stages = vec![("read cache", start.elapsed().as_secs_f64() * 1e3)];
    // NNEF spells some ops in its own primitives (unsqueeze, literal constants): one more
    // declutter gives back the model the ONNX path hands on, which the rewrites after the
    // cache point expect (a 4-bit product's row switch needs its activation's shape in the
    // decluttered form).
    let redeclutter = Instant::now();
    decluttered
        .declutter()
        .map_err(|e| broken("decluttering", e))?;
    stages.push((
        "declutter cached",
        redeclutter.elapsed().as_secs_f64() * 1e3,
    ));
    let mut built = finish(decluttered, true, options).map_err(|(stage, e)| broken(stage, e))?;
    stages.append(&mut built.stages);
    built.stages = stages;
    built.notes.push(format!(
        "cache: {} {}{}",
        crate::cache::READ_NOTE,
        slot.archive().display(),
        if mapped > 0 {
            format!(
                " ({:.1} MiB of f32 weights mapped in place)",
                mapped as f64 / (1 << 20) as f64
            )
        } else {
            String::new()
        }
    ));
    Ok(built)
}

/// Loads `path` from its ONNX protobuf: the decluttered model (a copy, when `keep`, for the
/// cache) and the optimized one. What the load changed goes to `notes`, the stage times to
/// `stages`. Exporters often declare output shapes / value_info that contradict the graph
/// ("Impossible to unify Sym(batch) with Val(1)"): when the strict load fails, the graph
/// itself is the truth and the load is tried again with those ignored.
fn from_onnx(
    path: &Path,
    options: &LoadOptions,
    fixed: &[(&str, &[Option<usize>])],
    keep: bool,
    notes: &mut Vec<String>,
    stages: &mut Vec<(&'static str, f64)>,
) -> Result<(Option<TypedModel>, Built)> {
    let start = Instant::now();
    let mut onnx = tract_onnx::onnx();
    if options.avx512_kernels {
        crate::nbits::register(&mut onnx);
    }
    let dir = path.parent().and_then(|p| p.to_str());
    let attempt = |onnx: &tract_onnx::Onnx, proto: HeldProto| {
        let front = declutter(onnx, proto, dir, fixed, options)?;
        let kept = keep.then(|| front.model.clone());
        let back = finish(front.model, false, options)?;
        Ok::<_, StageError>((kept, front.notes, front.stages, back))
    };
    let (proto, proto_notes) = read_proto(&onnx, path, options)?;
    notes.extend(proto_notes);
    stages.push(("read and decode", start.elapsed().as_secs_f64() * 1e3));
    let (kept, front_notes, front_stages, built) = match attempt(&onnx, proto) {
        Ok(done) => done,
        Err(first) => {
            // The protobuf went with the first parse (it holds a copy of every weight), so
            // it is read again.
            let lenient = onnx
                .clone()
                .with_ignore_output_shapes(true)
                .with_ignore_value_info(true);
            let (proto, _) = read_proto(&onnx, path, options)?;
            let done = attempt(&lenient, proto).map_err(|(stage, e)| {
                Error::model(
                    path,
                    format!(
                        "{stage} (also tried with declared output shapes and value_info ignored)"
                    ),
                    e,
                )
            })?;
            notes.push(format!(
                "declared output shapes / value_info contradict the graph and were ignored ({})",
                first.1.root_cause()
            ));
            done
        }
    };
    notes.extend(front_notes);
    stages.extend(front_stages);
    Ok((kept, built))
}

type StageError = (&'static str, TractError);

/// A typed model (decluttered or optimized) with what the load changed and how long each
/// stage took.
struct Built {
    model: TypedModel,
    notes: Vec<String>,
    stages: Vec<(&'static str, f64)>,
}

/// Milliseconds per load stage, in order.
#[derive(Debug, Default)]
struct Stages {
    at: Option<Instant>,
    done: Vec<(&'static str, f64)>,
}

impl Stages {
    fn start() -> Stages {
        Stages {
            at: Some(Instant::now()),
            done: vec![],
        }
    }

    /// Ends stage `name` now and starts the next one.
    fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        if let Some(at) = self.at.replace(now) {
            self.done.push((name, (now - at).as_secs_f64() * 1e3));
        }
    }
}

/// Rows from which a 4-bit product runs on expanded f32 weights (see
/// [`crate::patches::expand_block_quant_for_many_rows`]).
const BLOCK_QUANT_MIN_ROWS: usize = 16;

/// Held while a graph's protobuf exists (from reading the file to parsing it): the protobuf
/// holds a copy of every weight and parsing makes another, so two graphs loading on two
/// threads take turns here and their peaks do not add up. The stages after parsing (typing,
/// decluttering, optimizing: most of the load time) still run side by side.
static PROTOBUF_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A decoded protobuf and this thread's turn at [`PROTOBUF_TURN`], released together.
struct HeldProto {
    proto: pb::ModelProto,
    _turn: std::sync::MutexGuard<'static, ()>,
}

/// The ONNX protobuf at `path`, checked (a graph, only operators tract implements) and with
/// the protobuf-level rewrites `options` ask for; what they changed is in the notes.
/// The ONNX protobuf in `path`, decoded from a read-only mapping held by a `Bytes`: prost
/// then copies each weight (`raw_data`) once, into its field. tract's `proto_model_for_path`
/// decodes from the mapping as a byte slice, which prost copies twice (into a `Bytes`, then
/// into the field): twice the fresh memory, page faults and copying for every weight.
/// Like tract's reader, this maps the file: it must not shrink while it is decoded.
fn decode_proto(path: &Path) -> TractResult<pb::ModelProto> {
    use prost::Message;
    let file = std::fs::File::open(path)?;
    let map = crate::mapped::MappedFile::open(&file, file.metadata()?.len())?;
    Ok(pb::ModelProto::decode(map.into_bytes())?)
}

fn read_proto(
    onnx: &tract_onnx::Onnx,
    path: &Path,
    options: &LoadOptions,
) -> Result<(HeldProto, Vec<String>)> {
    let turn = PROTOBUF_TURN.lock().unwrap_or_else(|e| e.into_inner());
    let mut proto = decode_proto(path).map_err(|e| {
        Error::model(
            path,
            "not a valid ONNX protobuf (truncated file, or not an ONNX model?)",
            e,
        )
    })?;
    if proto.graph.as_ref().is_none_or(|g| g.node.is_empty()) {
        return Err(Error::Unsupported {
            path: path.to_owned(),
            message: "not an ONNX model: the file decodes but holds no graph nodes".into(),
        });
    }
    check_operators(path, onnx, &proto)?;
    let mut notes = vec![];
    let dir = path.parent().and_then(|p| p.to_str());
    if options.f16_as_f32 {
        let upcast = crate::upcast::f16_to_f32(onnx, &mut proto, dir).map_err(|message| {
            Error::Unsupported {
                path: path.to_owned(),
                message,
            }
        })?;
        if let Some(u) = upcast {
            let boundary = match u.boundary {
                0 => String::new(),
                n => format!("; {n} float16 input(s)/output(s) kept behind casts"),
            };
            notes.push(format!(
                "fp16: {} float16 tensors ({:.1} MiB) and {} cast targets run in float32{boundary} \
                 (tract {TRACT_VERSION} has no fast float16 path on this CPU)",
                u.tensors,
                u.f16_bytes as f64 / (1 << 20) as f64,
                u.nodes,
            ));
        }
    }
    if options.fix_qdq_softmax {
        let rewritten = rewrite_qdq_softmax(&mut proto).map_err(|message| Error::Unsupported {
            path: path.to_owned(),
            message,
        })?;
        if !rewritten.is_empty() {
            notes.push(format!(
                "qdq-softmax: DequantizeLinear before {} rewritten to float arithmetic \
                 (tract {TRACT_VERSION} folds DQ->Softmax->Q into a wrong lookup table)",
                rewritten.join(", ")
            ));
        }
    }
    if options.qdq_integer_products {
        let rewritten = crate::qdq::qdq_products_to_integer(&mut proto);
        if !rewritten.is_empty() {
            notes.push(format!(
                "qdq-integer: {} static-QDQ MatMul(s) with 8-bit weights run as integer products \
                 (tract {TRACT_VERSION} dequantizes the weights and multiplies in float32)",
                rewritten.len()
            ));
        }
    }
    Ok((HeldProto { proto, _turn: turn }, notes))
}

/// The parsed, typed and decluttered model, with edgevlm's rewrites that belong before or
/// right after tract's declutter: the load cache's point (see [`crate::cache`]).
fn declutter(
    onnx: &tract_onnx::Onnx,
    proto: HeldProto,
    dir: Option<&str>,
    fixed: &[(&str, &[Option<usize>])],
    options: &LoadOptions,
) -> Result<Built, StageError> {
    let mut stages = Stages::start();
    let parsed = onnx
        .parse(&proto.proto, dir)
        .map_err(|e| ("parsing the graph", e))?;
    // Every weight is in the parsed model now: free the protobuf's copy before the stages
    // that pack weights again (its peak would add up with theirs), and let another load read.
    drop(proto);
    stages.mark("parse");
    if !parsed.unresolved_inputs.is_empty() {
        return Err((
            "parsing the graph",
            TractError::msg(format!("unresolved inputs {:?}", parsed.unresolved_inputs)),
        ));
    }
    let mut model = parsed.model;
    for (name, dims) in fixed {
        let outlets = model.input_outlets().map_err(|e| ("reading inputs", e))?;
        let Some(ix) = outlets
            .iter()
            .position(|o| model.node(o.node).name == *name)
        else {
            continue;
        };
        let fact = model
            .input_fact_mut(ix)
            .map_err(|e| ("fixing input sizes", e))?;
        for (axis, size) in dims.iter().enumerate() {
            if let Some(n) = size {
                fact.shape.set_dim(axis, TDim::from(*n));
            }
        }
    }
    let typed = model
        .into_typed()
        .map_err(|e| ("inferring types and shapes", e))?;
    stages.mark("types and shapes");
    let mut typed = typed;
    let mut notes = vec![];
    if options.avx512_kernels {
        // Products parsed straight onto the kernel (crate::nbits), then the Q4_0 ones tract
        // made (MatMulNBits the parser left to tract, GGUF-style weights).
        let parsed = typed
            .nodes()
            .iter()
            .filter(|n| n.op_is::<crate::q4mm::Q4MatMul>())
            .count();
        let own_q4 = parsed
            + crate::q4mm::own_q4_products(&mut typed).map_err(|e| ("packing 4-bit weights", e))?;
        // Only built where there is an f32 kernel.
        if let (Some(kernel), true) = (crate::q4mm::f32_kernel(), own_q4 > 0) {
            let (tag, name) = (kernel.tag(), kernel.name());
            notes.push(format!(
                "q4-{tag}: {own_q4} 4-bit product(s) run on edgevlm's {name} 4-bit kernel at \
                 every row count, weights packed once at load (tract {TRACT_VERSION} runs them as \
                 matrix-vector products)"
            ));
        }
    }
    let expanded =
        crate::patches::expand_block_quant_for_many_rows(&mut typed, BLOCK_QUANT_MIN_ROWS)
            .map_err(|e| ("expanding block-quantized weights", e))?;
    if expanded > 0 {
        notes.push(format!(
            "q4-many-rows: {expanded} 4-bit product(s) with >= {BLOCK_QUANT_MIN_ROWS} rows expand their \
             weights to f32 per run (tract {TRACT_VERSION} runs them as matrix-vector products)"
        ));
    }
    if options.fix_block_quant_reshape {
        crate::patches::protect_block_quant_products(&mut typed)
            .map_err(|e| ("protecting block-quantized products", e))?;
    }
    let gelus = crate::patches::fuse_gelu_approximations(&mut typed)
        .map_err(|e| ("fusing GELU approximations", e))?;
    if gelus > 0 {
        notes.push(format!(
            "gelu: {gelus} tanh-approximated GELU(s) fused before decluttering (tract {TRACT_VERSION} \
             would run x^3 as powf and never fuse them)"
        ));
    }
    let requantized = crate::quant::quantize_before_repeats(&mut typed)
        .map_err(|e| ("moving quantize pairs before repeats", e))?;
    if requantized > 0 {
        notes.push(format!(
            "qdq-repeat: {requantized} quantize -> dequantize pair(s) moved before the repeat \
             of the key / value heads they followed (tract {TRACT_VERSION} folds a repeat into \
             a grouped product only when nothing sits in between)"
        ));
    }
    stages.mark("patches");
    let mut typed = typed.into_decluttered().map_err(|e| ("decluttering", e))?;
    stages.mark("declutter");
    // After decluttering: the weights' constants have reached the products by then.
    crate::patches::faster_dynamic_quantize(&mut typed)
        .map_err(|e| ("replacing DynamicQuantizeLinear", e))?;
    stages.mark("dynamic quantize");
    if options.avx512_kernels {
        // Before the cache point: the load cache keeps the packed panels, so a cached load
        // uses them as read instead of packing every f32 weight again.
        let f32s =
            crate::q4mm::own_f32_products(&mut typed).map_err(|e| ("packing f32 weights", e))?;
        if let (Some(kernel), true) = (crate::q4mm::f32_kernel(), f32s > 0) {
            let tract = match kernel {
                crate::q4mm::F32Kernel::Avx512 => {
                    "kernel choice is about half as fast for a ViT's products"
                }
                crate::q4mm::F32Kernel::Avx2 => {
                    "kernels run a decode step's one-row products on one thread however many \
                     there are, and many-row products a little slower"
                }
            };
            let (tag, name) = (kernel.tag(), kernel.name());
            notes.push(format!(
                "f32-{tag}: {f32s} f32 product(s) with constant weights packed at load for \
                 edgevlm's {name} FMA kernel (tract {TRACT_VERSION}'s {tract})"
            ));
        }
        stages.mark("f32 packing");
    }
    Ok(Built {
        model: typed,
        notes,
        stages: stages.done,
    })
}

/// The decluttered model's prefill plans and optimization: what every load runs, from the
/// ONNX file or from the cache.
fn finish(
    typed: TypedModel,
    decluttered: bool,
    options: &LoadOptions,
) -> Result<Built, StageError> {
    let mut typed = typed;
    let mut decluttered = decluttered;
    let mut notes = vec![];
    let mut stages = Stages::start();
    // After the cache point: the cached model is the same whichever outputs are cut. After a
    // declutter, and none after the cut, on both paths: from ONNX, a declutter after the cut
    // rewrote the sliced graph otherwise than the cache path's (which declutters before
    // `finish`), and tract's own kernels then gave the two plans' logits ~1e-6 apart.
    if !options.last_position_outputs.is_empty() && !decluttered {
        typed.declutter().map_err(|e| ("optimizing", e))?;
        decluttered = true;
        stages.mark("declutter");
    }
    let cut = crate::patches::last_position_only(&mut typed, &options.last_position_outputs)
        .map_err(|e| ("cutting outputs to their last position", e))?;
    if cut > 0 {
        notes.push(format!(
            "last-position: {} computed for their last position only, the only one read \
             (ONNX Runtime and tract compute the product behind them for every position)",
            options.last_position_outputs.join(", ")
        ));
    }
    if options.prefill_plans {
        let compile = |single: TypedModel| {
            let (mut notes, mut stages) = (vec![], Stages::start());
            optimize(single, false, options, &mut notes, &mut stages)
                .map_err(|(_, e)| e)?
                .into_runnable_with_options(&run_options(options))
        };
        let switched = crate::patches::switch_products_on_rows(
            &mut typed,
            BLOCK_QUANT_MIN_ROWS,
            crate::patches::WEIGHT_CHUNK_BYTES,
            &compile,
        )
        .map_err(|e| ("compiling prefill plans", e))?;
        if switched > 0 {
            decluttered = false;
            notes.push(format!(
                "prefill-plans: {switched} 4-bit product(s) with a run-time row count also \
                 get a plan on f32 kernels, taken from {BLOCK_QUANT_MIN_ROWS} rows (their \
                 weights are held twice; tract {TRACT_VERSION} runs them as matrix-vector \
                 products)"
            ));
        }
        stages.mark("prefill plans");
    }
    let typed = optimize(typed, decluttered, options, &mut notes, &mut stages)?;
    Ok(Built {
        model: typed,
        notes,
        stages: stages.done,
    })
}

/// Executor settings for plans built with `options`.
fn run_options(options: &LoadOptions) -> RunOptions {
    RunOptions {
        executor: shared_executor(options.threads),
        ..Default::default()
    }
}

/// The process's one tract executor for `threads` (`None` for one thread): every plan
/// loaded for the same thread count shares its rayon pool (a package's three graphs and
/// their prefill plans used to start one pool each), and edgevlm's kernels read the thread
/// count from it (`team::threads`).
fn shared_executor(threads: usize) -> Option<Executor> {
    static POOLS: Mutex<Vec<(usize, Executor)>> = Mutex::new(Vec::new());
    if threads < 2 {
        return None;
    }
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, e)) = pools.iter().find(|(t, _)| *t == threads) {
        return Some(e.clone());
    }
    let executor = Executor::multithread(threads);
    pools.push((threads, executor.clone()));
    Some(executor)
}

/// tract's optimization, then the rewrites that need an optimized model; what they changed
/// goes to `notes`. `decluttered`: `typed` is what tract's declutter left, unchanged since,
/// so a declutter would change nothing (each costs a pass of symbolic shape algebra over
/// every node: ~5 ms of the probe int8 decoder's cached load).
fn optimize(
    typed: TypedModel,
    decluttered: bool,
    options: &LoadOptions,
    notes: &mut Vec<String>,
    stages: &mut Stages,
) -> Result<TypedModel, StageError> {
    let mut typed = typed;
    if !decluttered {
        typed.declutter().map_err(|e| ("optimizing", e))?;
    }
    // Before the attention's fusion, which takes the pairs this makes; on every CPU.
    let float_dqs = crate::quant::fold_float_dequants(&mut typed)
        .map_err(|e| ("folding float dequantizes", e))?;
    if float_dqs > 0 {
        notes.push(format!(
            "qdq-float: {float_dqs} quantize(s) and the float dequantize written for the \
             softmax after them run as one pass (tract {TRACT_VERSION} would cast, subtract \
             and multiply in three)"
        ));
    }
    if options.avx512_kernels {
        // Both ops below are only built where there is an f32 kernel.
        let kernel = crate::q4mm::f32_kernel().map_or("", |k| k.name());
        let fused =
            crate::attention::fuse_attention(&mut typed).map_err(|e| ("fusing attention", e))?;
        if fused > 0 {
            notes.push(format!(
                "attention: {fused} attention block(s) fused into edgevlm's {kernel} kernel, \
                 scores never written out (tract {TRACT_VERSION} writes, scales, masks, \
                 softmaxes and repacks a heads x rows x keys tensor)"
            ));
        }
        let softmaxes =
            crate::attention::fast_softmaxes(&mut typed).map_err(|e| ("replacing softmax", e))?;
        if softmaxes > 0 {
            notes.push(format!(
                "softmax: {softmaxes} last-axis softmax(es) on edgevlm's {kernel} kernel (tract \
                 {TRACT_VERSION} runs rows of a length not a multiple of 4 through generic \
                 per-row kernels)"
            ));
        }
        let (f32_convs, pools) = crate::conv::own_convs_and_pools(&mut typed)
            .map_err(|e| ("replacing convolutions and pools", e))?;
        if f32_convs > 0 {
            notes.push(format!(
                "conv: {f32_convs} f32 convolution(s) on edgevlm's {kernel} kernel, their taps \
                 copied 32 positions at a time into an L1 panel, bias and Relu applied there \
                 (tract {TRACT_VERSION} writes out an Im2col of the whole image first)"
            ));
        }
        if pools > 0 {
            notes.push(format!(
                "maxpool: {pools} f32 max pool(s) with their geometry resolved at load (tract \
                 {TRACT_VERSION} rebuilds it on every run when the batch is symbolic)"
            ));
        }
        let convs = crate::int8mm::patch_convs_as_products(&mut typed)
            .map_err(|e| ("rewriting patch convolutions", e))?;
        if convs > 0 {
            notes.push(format!(
                "patch-conv: {convs} 8-bit convolution(s) with a stride equal to their kernel \
                 (a ViT's patch embedding) rewritten into int8 products over whole patches \
                 (tract {TRACT_VERSION} lowers them to Im2col and its own int8 kernel)"
            ));
        }
        let int_convs = crate::conv::integer_convs_in_f32(&mut typed)
            .map_err(|e| ("rewriting 8-bit convolutions", e))?;
        if int_convs > 0 {
            notes.push(format!(
                "conv-integer: {int_convs} 8-bit convolution(s) run as exact f32 sums on \
                 edgevlm's {kernel} convolution (tract {TRACT_VERSION} runs an Im2col, its \
                 int8 kernel and zero-point corrections)"
            ));
        }
        let (kernel, own) = crate::int8mm::vnni_int8_products(&mut typed)
            .map_err(|e| ("packing int8 weights", e))?;
        let scaled =
            crate::int8mm::fuse_int8_scales(&mut typed).map_err(|e| ("fusing int8 scales", e))?;
        if let (Some(kernel), true) = (kernel, own > 0) {
            use crate::int8mm::Int8Kernel;
            let (tag, kernel, tract) = match kernel {
                Int8Kernel::Amx => (
                    "int8-amx",
                    "AMX kernel (16 rows or more per product; fewer on its AVX-512 VNNI kernel)",
                    "8x8 VNNI tile is slower and its optimizer slow to lower them",
                ),
                Int8Kernel::Vnni => (
                    "int8-vnni",
                    "AVX-512 VNNI kernel",
                    "8x8 tile is slower and its optimizer slow to lower them",
                ),
                Int8Kernel::Avx2 => (
                    "int8-avx2",
                    "AVX2 kernel (16-bit multiply-adds)",
                    "AVX2 kernel multiplies 32-bit lanes, ~100x slower than ONNX Runtime here",
                ),
            };
            notes.push(format!(
                "{tag}: {own} 8-bit product(s) with constant weights packed at load for \
                 edgevlm's {kernel}, {scaled} with their Cast and scale folded in (tract \
                 {TRACT_VERSION}'s {tract})"
            ));
        }
    }
    // After tract's last declutter, which would fold the reshapes back into the products.
    let merged = crate::patches::merge_int8_product_rows(&mut typed)
        .map_err(|e| ("merging int8 product rows", e))?;
    if merged > 0 {
        notes.push(format!(
            "int8-rows: {merged} 8-bit product(s) get their outer axes merged into one row axis \
             (tract {TRACT_VERSION} would loop over them around matrix-vector products)"
        ));
    }
    stages.mark("edgevlm kernels");
    typed.optimize().map_err(|e| ("optimizing", e))?;
    stages.mark("optimize");
    let (pairs, quants, dequants) =
        crate::quant::fast_quantize_ops(&mut typed).map_err(|e| ("replacing quantize ops", e))?;
    if pairs + quants + dequants > 0 {
        notes.push(format!(
            "quantize: {pairs} QuantizeLinear->DequantizeLinear pair(s) fused into one pass, \
             {quants} QuantizeLinear and {dequants} DequantizeLinear on vectorized loops \
             (tract {TRACT_VERSION} rounds element by element through a function call)"
        ));
    }
    let routines =
        crate::patches::threaded_routines(&mut typed).map_err(|e| ("threading kernels", e))?;
    if routines > 0 && options.threads > 1 {
        notes.push(format!(
            "kernel-threads: {routines} element-wise op(s) and last-axis RmsNorm(s) on tract's \
             kernels in pieces over edgevlm's threads (tract {TRACT_VERSION} hands them to its \
             rayon pool, which then shares the cores with edgevlm's spinning workers)"
        ));
    }
    let reduces = crate::conv::own_reduces(&mut typed).map_err(|e| ("replacing reduces", e))?;
    if reduces > 0 {
        notes.push(format!(
            "reduce: {reduces} f32 sum(s) / maximum(s) over consecutive axes (global pools, \
             means) vectorized (tract {TRACT_VERSION} folds them element by element)"
        ));
    }
    let relus = crate::conv::own_relus(&mut typed).map_err(|e| ("replacing relus", e))?;
    if relus > 0 {
        notes.push(format!(
            "relu: {relus} Relu(s) left on tract's generic broadcasting Max run in place \
             (tract {TRACT_VERSION} lowers a Relu behind a quantized convolution no further)"
        ));
    }
    let broadcasts = crate::patches::faster_broadcast_binaries(&mut typed)
        .map_err(|e| ("replacing broadcast binaries", e))?;
    if broadcasts > 0 {
        notes.push(format!(
            "broadcast: {broadcasts} Add/Mul with a block-repeated operand run block by block \
             (tract {TRACT_VERSION} leaves them on its generic broadcast)"
        ));
    }
    let folds =
        crate::patches::fold_shared_constants(&mut typed).map_err(|e| ("folding constants", e))?;
    if folds > 0 {
        // The weights those folds detached from their sums now feed their packing alone:
        // tract's own constant propagation packs them once, here, instead of per run.
        tract_onnx::tract_core::optim::Optimizer::prop_consts()
            .optimize(&mut typed)
            .map_err(|e| ("folding constants", e))?;
        typed = typed.into_compact().map_err(|e| ("folding constants", e))?;
        notes.push(format!(
            "const-fold: {folds} computation(s) on constant weights folded at load (tract \
             {TRACT_VERSION} repeats them every run when the weight is shared)"
        ));
    }
    stages.mark("constant folds");
    Ok(typed)
}

enum Side {
    Input,
    Output,
}

/// Names and facts of the model's inputs or outputs. An input is named by its source node
/// (the ONNX input name): when tract removes a no-op op right behind an input (a `Cast` to the
/// type it already has), the input's outlet takes over that op's output label.
fn facts(model: &TypedModel, side: Side, outlets: &[OutletId]) -> Result<Vec<TensorSpec>> {
    outlets
        .iter()
        .map(|o| {
            let node = model.node(o.node);
            let name = match side {
                Side::Input => &node.name,
                Side::Output => model.outlet_label(*o).unwrap_or(&node.name),
            }
            .to_string();
            let fact = model
                .outlet_fact(*o)
                .map_err(|e| Error::Inference(e.into()))?;
            Ok(TensorSpec::from_fact(name, fact))
        })
        .collect()
}

fn each_node<'a>(graph: &'a pb::GraphProto, f: &mut impl FnMut(&'a pb::NodeProto)) {
    for node in &graph.node {
        f(node);
        for attr in &node.attribute {
            if let Some(g) = &attr.g {
                each_node(g, f);
            }
            for g in &attr.graphs {
                each_node(g, f);
            }
        }
    }
}

/// Refuses graphs with operators tract does not implement, naming them, instead of failing later.
fn check_operators(path: &Path, onnx: &tract_onnx::Onnx, proto: &pb::ModelProto) -> Result<()> {
    let mut missing: Vec<String> = vec![];
    if let Some(graph) = &proto.graph {
        each_node(graph, &mut |node| {
            if !onnx.op_register.0.contains_key(&node.op_type) {
                let domain = if node.domain.is_empty() {
                    "ai.onnx"
                } else {
                    &node.domain
                };
                let entry = format!("{domain}.{} (node '{}')", node.op_type, node.name);
                if !missing
                    .iter()
                    .any(|m| m.starts_with(&format!("{domain}.{} ", node.op_type)))
                {
                    missing.push(entry);
                }
            }
        });
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::Unsupported {
        path: path.to_owned(),
        message: format!(
            "operators tract {TRACT_VERSION} does not implement: {}",
            missing.join(", ")
        ),
    })
}

/// Operators that keep their input's shape but mix values along an axis. tract 0.23.9 treats
/// them as element-wise when it folds `DequantizeLinear -> op -> QuantizeLinear` into a
/// 256-entry lookup table, which is wrong for them.
const AXIS_MIXING_OPS: &[&str] = &[
    "Softmax",
    "LogSoftmax",
    "Hardmax",
    "LpNormalization",
    "MeanVarianceNormalization",
    "LRN",
];

/// Rewrites every per-tensor `DequantizeLinear` that feeds an axis-mixing op (Softmax, ...) into
/// `Mul(Sub(Cast(x), Cast(zero_point)), scale)`: the same arithmetic ONNX Runtime does, but not a
/// DequantizeLinear, so tract has nothing to fold and Softmax runs in float. Returns the names
/// of the ops whose input was rewritten; refuses per-axis dequantization there (not seen in
/// practice), since the plain broadcast would be wrong.
pub fn rewrite_qdq_softmax(proto: &mut pb::ModelProto) -> std::result::Result<Vec<String>, String> {
    let Some(graph) = proto.graph.as_mut() else {
        return Ok(vec![]);
    };
    let mixing_inputs: Vec<(String, String)> = graph
        .node
        .iter()
        .filter(|n| n.domain.is_empty() && AXIS_MIXING_OPS.contains(&n.op_type.as_str()))
        .filter_map(|n| {
            n.input
                .first()
                .map(|i| (i.clone(), format!("{} '{}'", n.op_type, n.name)))
        })
        .collect();
    let mut rewritten = vec![];
    let mut new_nodes = Vec::with_capacity(graph.node.len());
    for node in std::mem::take(&mut graph.node) {
        let feeds = (node.op_type == "DequantizeLinear" && node.domain.is_empty())
            .then(|| {
                mixing_inputs
                    .iter()
                    .find(|(i, _)| node.output.first() == Some(i))
            })
            .flatten();
        let Some((_, consumer)) = feeds else {
            new_nodes.push(node);
            continue;
        };
        let per_tensor = |name: &str| {
            graph
                .initializer
                .iter()
                .find(|t| t.name == name)
                .map(|t| t.dims.iter().product::<i64>() == 1)
        };
        match per_tensor(&node.input[1]) {
            Some(true) => {}
            Some(false) => {
                return Err(format!(
                    "per-axis DequantizeLinear '{}' feeds {consumer}: tract {TRACT_VERSION} would fold it \
                     into a wrong lookup table and the runtime cannot rewrite it; quantize that op per-tensor \
                     or leave it in float",
                    node.name
                ))
            }
            // Scale computed at run time: tract only folds constant-scale DequantizeLinear.
            None => {
                new_nodes.push(node);
                continue;
            }
        }
        let base = if node.name.is_empty() {
            node.output[0].clone()
        } else {
            node.name.clone()
        };
        let tmp = |suffix: &str| format!("{base}/edgevlm_float_dq/{suffix}");
        let cast = |input: &str, output: String| pb::NodeProto {
            input: vec![input.to_string()],
            output: vec![output.clone()],
            name: output,
            op_type: "Cast".into(),
            attribute: vec![pb::AttributeProto {
                name: "to".into(),
                r#type: pb::attribute_proto::AttributeType::Int as i32,
                i: 1, // TensorProto.FLOAT
                ..Default::default()
            }],
            ..Default::default()
        };
        new_nodes.push(cast(&node.input[0], tmp("x")));
        let mut centered = tmp("x");
        if let Some(zp) = node.input.get(2).filter(|z| !z.is_empty()) {
            new_nodes.push(cast(zp, tmp("zero_point")));
            new_nodes.push(pb::NodeProto {
                input: vec![tmp("x"), tmp("zero_point")],
                output: vec![tmp("centered")],
                name: tmp("centered"),
                op_type: "Sub".into(),
                ..Default::default()
            });
            centered = tmp("centered");
        }
        new_nodes.push(pb::NodeProto {
            input: vec![centered, node.input[1].clone()],
            output: vec![node.output[0].clone()],
            name: tmp("scaled"),
            op_type: "Mul".into(),
            ..Default::default()
        });
        rewritten.push(consumer.clone());
    }
    graph.node = new_nodes;
    Ok(rewritten)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{random_input, SplitMix64};

    const DEMO_GRAPH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/demo/model.onnx");

    #[test]
    fn profiled_run_matches_plain_run_and_times_every_node() {
        let model = OnnxModel::load(Path::new(DEMO_GRAPH), &LoadOptions::default()).unwrap();
        let mut rng = SplitMix64::new(3);
        let input = random_input(&model.inputs()[0], &mut rng).unwrap();
        let plain = model.run(vec![input.clone()]).unwrap();
        let mut profile = NodeProfile::new();
        for _ in 0..3 {
            let profiled = model
                .run_profiled(vec![input.clone()], &mut profile)
                .unwrap();
            assert_eq!(plain, profiled);
        }
        assert_eq!(profile.runs(), 3);
        let ranked = profile.ranked();
        // Every node of the plan's order ran, each once per run; constants never do.
        let order = model.plan.order_without_consts().len();
        assert_eq!(ranked.len(), order, "{ranked:#?}");
        assert!(ranked.iter().all(|n| n.calls == 3 && !n.op.is_empty()));
        assert!(ranked.windows(2).all(|w| w[0].total >= w[1].total));
        assert!(ranked
            .iter()
            .any(|n| n.op.contains("Conv") || n.op.contains("MatMul")));
        assert!(profile.total() > std::time::Duration::ZERO);
        // A wrong input is refused before tract sees it, as in `run`.
        assert!(matches!(
            model.run_profiled(vec![], &mut profile),
            Err(Error::Input { .. })
        ));
    }
}
