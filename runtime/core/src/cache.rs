//! The load cache: each graph's decluttered model in tract's NNEF form, so that a cold start
//! skips reading the ONNX protobuf, parsing it, typing it and decluttering it.
//!
//! A load with [`crate::LoadOptions::cache_dir`] set looks for its slot there: `<graph
//! stem>-<16 hex digits>.nnef.tar` (tract's NNEF archive) and, beside it, `.json` (the stamp
//! and the load notes). The slot's name comes from the graph's path, the load options and the
//! fixed input dims; the stamp records what the cached model was built from: the cache
//! format, the tract and edgevlm versions, the running executable (size, mtime, inode: a new
//! build of edgevlm may rewrite graphs differently), the CPU features the rewrites depend on,
//! and the size, mtime and inode of the graph file and of its external-data files (siblings
//! whose name starts with the graph's). A slot whose stamp differs is stale and is rebuilt
//! in place; one that does not read back (truncated, corrupt) too. Neither is ever an
//! error: the load falls back to the ONNX file and says why in its notes.
//!
//! The cache point is after tract's declutter and the rewrites edgevlm makes before it (the
//! 4-bit products [`crate::nbits`] parses, the block-quant guards, fused GELUs), the
//! dynamic-quantize replacement and the f32 products packed for edgevlm's kernel (their
//! panels stored, so a cached load does not pack them again); the later rewrites and tract's optimization run on every
//! load, cached or not, so a cached load builds the same plan. NNEF has no words for those
//! edgevlm ops nor for a few tract ops a quantized ONNX graph declutters into (quantize and
//! dequantize with constant parameters, lookup tables): [`nnef`] registers them in an
//! `edgevlm` extension. A graph with an op neither knows is loaded without cache (the note
//! names the op).
//!
//! The f32 products' packed panels (most of an fp32 graph's bytes) are archive entries of
//! their own, `edgevlm_f32_panels/<node>.dat`, that a read maps in place rather than
//! copies (see `mapped.rs`); the archive's CRC-32 is checked over the mapped bytes, on
//! all cores, before anything parses them.
//!
//! Writes go to a temporary file renamed into place, the stamp last, so a reader never sees
//! a half-written slot as valid, and an archive a running model has mapped is never
//! rewritten or truncated.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tract_nnef::internal::*;
use tract_onnx::tract_core::ops::array::Slice;
use tract_onnx::tract_core::ops::binary::{BinMiniOp, TypedBinOp};
use tract_onnx::tract_core::ops::einsum::einsum_matmul::EinSumMatMul;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::quant::{
    DequantizeLinearF32, LookupTable, QuantizeLinearI8, QuantizeLinearU8,
};
use tract_onnx::WithOnnx;
use tract_transformers::WithTractTransformers;

use crate::mapped::{MappedF32, MappedFile};
use crate::patches::{DynamicQuantizeU8, ExpandWeight, FoldBarrier};
use crate::q4mm::{F32MatMul, F32Panels, Q4MatMul, Q4Packed};
use crate::LoadOptions;

/// Bumped when what the cache holds changes meaning (the cache point, an op's encoding).
/// 2: f32 products packed before the cache point, their panels stored.
/// 3: those panels as archive entries mapped in place, no longer graph variables.
/// 4: products whose contracted axes are not the activation's last ones (an out projection
/// with the heads' transpose folded in) packed too, behind a fold barrier and moves.
const FORMAT: u32 = 4;

/// Identity of a file on disk: a replaced or rewritten file changes at least one of these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileId {
    path: String,
    size: u64,
    mtime_ns: i128,
    inode: u64,
}

impl FileId {
    fn of(path: &Path) -> std::io::Result<FileId> {
        let meta = std::fs::metadata(path)?;
        let mtime_ns = match meta.modified()?.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i128,
            Err(e) => -(e.duration().as_nanos() as i128),
        };
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let inode = 0;
        Ok(FileId {
            path: path.display().to_string(),
            size: meta.len(),
            mtime_ns,
            inode,
        })
    }
}

/// What a cached model was built from; a slot is used only when all of it matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    format: u32,
    tract: String,
    edgevlm: String,
    executable: Option<FileId>,
    cpu: String,
    sources: Vec<FileId>,
    options: String,
    fixed: String,
}

impl Stamp {
    /// The first field where `self` (the slot's) differs from `now`, for the note.
    fn difference(&self, now: &Stamp) -> String {
        if self.format != now.format {
            format!("cache format {} (now {})", self.format, now.format)
        } else if self.tract != now.tract {
            format!("tract {} (now {})", self.tract, now.tract)
        } else if self.edgevlm != now.edgevlm || self.executable != now.executable {
            "built by another edgevlm executable".into()
        } else if self.cpu != now.cpu {
            format!("CPU features {} (now {})", self.cpu, now.cpu)
        } else if self.sources != now.sources {
            "the graph or its data files changed since".into()
        } else {
            "other load options".into()
        }
    }
}

/// The slot's second file: the stamp, the notes of the stages the cache skips, and the
/// archive's size (a truncated archive is caught before tract reads it).
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    stamp: Stamp,
    notes: Vec<String>,
    archive_bytes: u64,
    /// CRC-32 of the archive, checked as it is read: a flipped bit in a weight would
    /// otherwise load and compute garbage.
    archive_crc32: u32,
    /// The model's input and output names: NNEF identifiers cannot hold every ONNX name
    /// (`past_key_values.0.key` comes back as `past_key_values_0_key`).
    inputs: Vec<String>,
    outputs: Vec<String>,
}

/// The names of `model`'s inputs (their source nodes) and outputs (their labels, else their
/// nodes), as [`crate::OnnxModel`] reports them.
fn io_names(model: &TypedModel) -> TractResult<(Vec<String>, Vec<String>)> {
    let inputs = model
        .input_outlets()?
        .iter()
        .map(|o| model.node(o.node).name.clone())
        .collect();
    let outputs = model
        .output_outlets()?
        .iter()
        .map(|o| {
            model
                .outlet_label(*o)
                .unwrap_or(&model.node(o.node).name)
                .to_string()
        })
        .collect();
    Ok((inputs, outputs))
}

/// Removes the entries in `dir` whose graph file is gone (a package replaced by a new
/// version at another path, a deleted model), so the cache does not grow with every model a
/// board has had. Entries that cannot be read are left alone.
fn remove_orphans(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let graph = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|v| v["stamp"]["sources"][0]["path"].as_str().map(PathBuf::from));
        if graph.is_some_and(|g| !g.exists()) {
            let _ = std::fs::remove_file(path.with_extension("nnef.tar"));
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// tract 0.23.9's NNEF writer prints a constant of symbolic-dimension type (`TDim`, what
/// ONNX shape arithmetic in int64 becomes) as a plain literal, which reads back as an
/// integer: an `Iff` between it and a `TDim` wire then fails to load ("TDim vs I32"). It
/// prints any wire whose value is known as a literal, so a cast after an integer constant
/// does not help either. Such constants (concrete values only) are written through this op,
/// whose output the writer does not know, and read back as the `TDim` constants they were.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct TDimConst(Arc<Tensor>);

impl Op for TDimConst {
    fn name(&self) -> StaticName {
        "EdgevlmTDimConst".into()
    }

    op_as_typed_op!();
}

impl EvalOp for TDimConst {
    /// Never folded: the op exists only to keep its value unknown to the writer.
    fn eval_out_of_plan(&self, _inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        Ok(None)
    }

    fn eval(&self, _ctx: &EvalContext, _inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        Ok(tvec!(self.0.cast_to::<TDim>()?.into_owned().into_tvalue()))
    }
}

impl TypedOp for TDimConst {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(TDim::fact(self.0.shape())))
    }

    as_op!();
}

/// A product on its way to the archive. tract's writer rewrites every f32 product into NNEF
/// `matmul` between merge / unmerge reshapes before serializing (`rewrite_model`), which the
/// declutter after reading has to fold back (about half of that declutter's time, ~1 s on
/// the SmolVLM2-256M int8 decoder). Products are wrapped in this op, which the rewrite does
/// not know, written by [`dump_einsum`] as themselves and read back as the `EinSum` they were.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct WrittenEinSum(EinSum);

impl Op for WrittenEinSum {
    fn name(&self) -> StaticName {
        "EdgevlmWrittenEinSum".into()
    }

    op_as_typed_op!();
}

impl EvalOp for WrittenEinSum {
    op_out_of_plan!();

    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.0.eval(ctx, inputs)
    }
}

impl TypedOp for WrittenEinSum {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.0.output_facts(inputs)
    }

    as_op!();
}

/// Wraps `model`'s products (`EinSum`, and `EinSumMatMul` as its product) in
/// [`WrittenEinSum`]s. Returns how many.
fn einsums_for_writing(model: &mut TypedModel) -> usize {
    let mut wrapped = 0;
    for node in model.nodes_mut() {
        let product = if let Some(op) = node.op_as::<EinSum>() {
            op.clone()
        } else if let Some(op) = node.op_as::<EinSumMatMul>() {
            op.op.clone()
        } else {
            continue;
        };
        node.op = Box::new(WrittenEinSum(product));
        wrapped += 1;
    }
    wrapped
}

/// Replaces `model`'s `TDim` constants by [`TDimConst`]s (see there). Returns how many.
fn tdim_consts_for_writing(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::konst::Const;
    let targets: Vec<(usize, Tensor)> = model
        .nodes()
        .iter()
        .filter_map(|n| {
            let k = n.op_as::<Const>()?.val();
            (k.datum_type() == TDim::datum_type())
                .then(|| k.cast_to::<i64>().ok().map(|t| (n.id, t.into_owned())))
                .flatten()
        })
        .collect();
    for (id, ints) in targets.iter().cloned() {
        let node = model.node(id);
        let patch = TypedModelPatch::replace_single_op(
            model,
            node,
            &[],
            TDimConst(ints.into_arc_tensor()),
        )?;
        patch.apply(model)?;
    }
    Ok(targets.len())
}

fn dump_tdim_const(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &TDimConst,
) -> TractResult<Option<Arc<RValue>>> {
    let values = ast.konst_variable(format!("{}.values", node.name), &op.0)?;
    Ok(Some(invocation("edgevlm_tdim_const", &[values], &[])))
}

fn load_tdim_const(b: &mut ModelBuilder, i: &ResolvedInvocation) -> TractResult<Value> {
    let values: Arc<Tensor> = i.named_arg_as(b, "values")?;
    let dims = values.cast_to::<TDim>()?.into_owned().into_arc_tensor();
    b.wire(tract_onnx::tract_core::ops::konst::Const::new(dims)?, &[])
}

/// Gives the inputs and outputs of `model`, read back from NNEF, the names they had.
fn restore_names(model: &mut TypedModel, meta: &Meta) -> TractResult<()> {
    let (inputs, outputs) = (
        model.input_outlets()?.to_vec(),
        model.output_outlets()?.to_vec(),
    );
    ensure!(
        inputs.len() == meta.inputs.len() && outputs.len() == meta.outputs.len(),
        "{} inputs and {} outputs, {} and {} written",
        inputs.len(),
        outputs.len(),
        meta.inputs.len(),
        meta.outputs.len()
    );
    for (outlet, name) in inputs.iter().zip(&meta.inputs) {
        model.node_mut(outlet.node).name = name.clone();
    }
    for (outlet, name) in outputs.iter().zip(&meta.outputs) {
        model.set_outlet_label(*outlet, name.clone())?;
    }
    Ok(())
}

/// The words of the load note that says a load wrote its graph's cache entry.
pub const WRITTEN_NOTE: &str = "decluttered model written to";
/// The words of the load note that says a load came from its graph's cache entry.
pub const READ_NOTE: &str = "decluttered model read from";

/// Did the load whose notes these are write a cache entry?
pub fn wrote_entry(notes: &[String]) -> bool {
    notes.iter().any(|n| n.contains(WRITTEN_NOTE))
}

/// Why a slot was not used.
#[derive(Debug)]
pub(crate) enum Miss {
    /// No cached model yet.
    Absent,
    /// Built from something else (the reason).
    Stale(String),
    /// Present but unreadable (the reason).
    Broken(String),
}

impl std::fmt::Display for Miss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Miss::Absent => write!(f, "none yet"),
            Miss::Stale(why) => write!(f, "stale: {why}"),
            Miss::Broken(why) => write!(f, "unreadable: {why}"),
        }
    }
}

/// One graph's place in a cache directory.
pub(crate) struct Slot {
    archive: PathBuf,
    meta: PathBuf,
    stamp: Stamp,
}

impl Slot {
    /// The slot of `graph` loaded with `options` and `fixed` input dims in `dir`.
    pub(crate) fn new(
        dir: &Path,
        graph: &Path,
        options: &LoadOptions,
        fixed: &[(&str, &[Option<usize>])],
    ) -> std::io::Result<Slot> {
        let graph = std::fs::canonicalize(graph)?;
        let options = format!(
            "{:?}",
            LoadOptions {
                threads: 1,
                cache_dir: None,
                // Applied after the cache point.
                last_position_outputs: vec![],
                ..options.clone()
            }
        );
        let fixed = format!("{fixed:?}");
        let name = graph
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stem = name.strip_suffix(".onnx").unwrap_or(&name);
        let mut sources = vec![FileId::of(&graph)?];
        if let Some(parent) = graph.parent() {
            let mut data = vec![];
            for entry in std::fs::read_dir(parent)? {
                let entry = entry?;
                let sibling = entry.file_name().to_string_lossy().into_owned();
                if sibling != name && sibling.starts_with(stem) && entry.file_type()?.is_file() {
                    data.push(FileId::of(&entry.path())?);
                }
            }
            data.sort_by(|a, b| a.path.cmp(&b.path));
            sources.extend(data);
        }
        let id = Sha256::digest(format!("{}\n{options}\n{fixed}", graph.display()));
        let hex: String = id[..8].iter().map(|b| format!("{b:02x}")).collect();
        let safe: String = stem
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let base = dir.join(format!("{safe}-{hex}"));
        Ok(Slot {
            archive: base.with_extension("nnef.tar"),
            meta: base.with_extension("json"),
            stamp: Stamp {
                format: FORMAT,
                tract: crate::TRACT_VERSION.into(),
                edgevlm: env!("CARGO_PKG_VERSION").into(),
                executable: std::env::current_exe()
                    .ok()
                    .and_then(|p| FileId::of(&p).ok()),
                // Which f32 products were packed before the cache point.
                cpu: crate::q4mm::f32_kernel()
                    .map_or("baseline", |k| k.tag())
                    .into(),
                sources,
                options,
                fixed,
            },
        })
    }

    /// The archive's path (for notes).
    pub(crate) fn archive(&self) -> &Path {
        &self.archive
    }

    /// The cached decluttered model, the notes of the stages it skips, and how many bytes of
    /// f32 panels it maps in place; or why not.
    pub(crate) fn read(&self) -> Result<(TypedModel, Vec<String>, usize), Miss> {
        let text = match std::fs::read_to_string(&self.meta) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Miss::Absent),
            Err(e) => return Err(Miss::Broken(format!("{}: {e}", self.meta.display()))),
        };
        let unreadable =
            |e: serde_json::Error| Miss::Broken(format!("{}: {e}", self.meta.display()));
        let value: serde_json::Value = serde_json::from_str(&text).map_err(unreadable)?;
        // The stamp first: an entry of another cache format is stale, not broken.
        if let Some(Ok(stamp)) = value.get("stamp").map(Stamp::deserialize) {
            if stamp != self.stamp {
                return Err(Miss::Stale(stamp.difference(&self.stamp)));
            }
        }
        let meta = Meta::deserialize(value).map_err(unreadable)?;
        let broken =
            |e: &dyn std::fmt::Display| Miss::Broken(format!("{}: {e}", self.archive.display()));
        let file = std::fs::File::open(&self.archive).map_err(|e| broken(&e))?;
        let size = file.metadata().map_err(|e| broken(&e))?.len();
        if size != meta.archive_bytes {
            return Err(broken(&format!(
                "{size} bytes, {} written",
                meta.archive_bytes
            )));
        }
        let map = MappedFile::open(&file, size).map_err(|e| broken(&e))?;
        // The checksum before anything parses the archive, so corrupt bytes never reach
        // tract's reader; on all cores, which also brings the mapped pages in.
        let crc = checksum(map.bytes());
        if crc != meta.archive_crc32 {
            return Err(broken(&format!(
                "checksum {crc:08x}, {:08x} written",
                meta.archive_crc32
            )));
        }
        // tract's NNEF reader is not written for hostile input: a corrupt archive may panic.
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let proto = read_proto(&map)?;
            let mapped = proto.resources.values();
            let mapped = mapped.filter_map(|r| r.downcast_ref::<MappedF32>());
            let mapped = mapped.map(|m| m.as_slice().len() * 4).sum();
            let mut model = nnef_reader().model_for_proto_model(&proto)?;
            restore_names(&mut model, &meta)?;
            Ok::<_, TractError>((model, mapped))
        }));
        match read {
            Ok(Ok((model, mapped))) => Ok((model, meta.notes, mapped)),
            Ok(Err(e)) => Err(broken(&e.root_cause())),
            Err(_) => Err(broken(&"tract's NNEF reader panicked")),
        }
    }

    /// Stores `model` (decluttered) and `notes` in the slot; returns the archive's size.
    pub(crate) fn write(&self, model: TypedModel, notes: &[String]) -> Result<u64, String> {
        let mut model = model;
        // tract writes a binary op as its name alone: an output type of its own (quantized
        // arithmetic) would not come back. None of the graphs edgevlm loads has one; a graph
        // that does is not cached rather than cached wrong.
        if let Some(n) = model
            .nodes()
            .iter()
            .find(|n| n.op_as::<TypedBinOp>().is_some_and(|op| op.1.is_some()))
        {
            return Err(format!(
                "{}: a binary op with its own output type, which NNEF does not keep",
                n.name
            ));
        }
        tdim_consts_for_writing(&mut model).map_err(|e| format!("{e:#}"))?;
        einsums_for_writing(&mut model);
        let dir = self.archive.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // A stale stamp must not outlive the archive it describes.
        let _ = std::fs::remove_file(&self.meta);
        let tmp = |path: &Path| {
            let mut name = path.as_os_str().to_owned();
            name.push(format!(".tmp{}", std::process::id()));
            PathBuf::from(name)
        };
        let (archive_tmp, meta_tmp) = (tmp(&self.archive), tmp(&self.meta));
        let result = (|| {
            let file = std::fs::File::create(&archive_tmp)
                .map_err(|e| format!("{}: {e}", archive_tmp.display()))?;
            let out = Checksummed::new(std::io::BufWriter::with_capacity(1 << 20, file));
            let out = nnef()
                .write_to_tar(&model, out)
                .map_err(|e| format!("{:#}", e))?;
            let archive_crc32 = out.crc.clone().finalize();
            let file = out
                .inner
                .into_inner()
                .map_err(|e| format!("{}: {}", archive_tmp.display(), e.error()))?;
            file.sync_all()
                .map_err(|e| format!("{}: {e}", archive_tmp.display()))?;
            let archive_bytes = file
                .metadata()
                .map_err(|e| format!("{}: {e}", archive_tmp.display()))?
                .len();
            let (inputs, outputs) = io_names(&model).map_err(|e| format!("{e:#}"))?;
            let meta = Meta {
                stamp: self.stamp.clone(),
                notes: notes.to_vec(),
                archive_bytes,
                archive_crc32,
                inputs,
                outputs,
            };
            let mut out = std::fs::File::create(&meta_tmp)
                .map_err(|e| format!("{}: {e}", meta_tmp.display()))?;
            out.write_all(serde_json::to_string_pretty(&meta).unwrap().as_bytes())
                .and_then(|_| out.sync_all())
                .map_err(|e| format!("{}: {e}", meta_tmp.display()))?;
            std::fs::rename(&archive_tmp, &self.archive)
                .and_then(|_| std::fs::rename(&meta_tmp, &self.meta))
                .map_err(|e| format!("{}: {e}", self.meta.display()))?;
            Ok(archive_bytes)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&archive_tmp);
            let _ = std::fs::remove_file(&meta_tmp);
        }
        remove_orphans(dir);
        result
    }
}

/// The archive directory of the f32 products' packed panels ([`dump_f32`]).
const PANELS_DIR: &str = "edgevlm_f32_panels";

/// CRC-32 of `bytes`, in one part per core.
fn checksum(bytes: &[u8]) -> u32 {
    let part = bytes.len().div_ceil(crate::par::cores()).max(1 << 20);
    let parts: Vec<&[u8]> = bytes.chunks(part).collect();
    let crcs = crate::par::map(&parts, |part| {
        let mut crc = crc32fast::Hasher::new();
        crc.update(part);
        crc
    });
    let mut crc = crc32fast::Hasher::new();
    for part in &crcs {
        crc.combine(part);
    }
    crc.finalize()
}

/// The parts of an archive [`Slot::write`] wrote (tract's `proto_model_for_read`, with
/// the text parsed on a second core while the tensors are read: together they are most of
/// a cached load's reading time). tract writes the graph's text first. The f32 products'
/// panels are not read: they are resources, [`MappedF32`] in place in `map`.
fn read_proto(map: &Arc<MappedFile>) -> TractResult<tract_nnef::ast::ProtoModel> {
    use std::io::Read;
    use tract_nnef::resource::{GRAPH_NNEF_FILENAME, GRAPH_QUANT_FILENAME};
    let mut archive = tar::Archive::new(std::io::Cursor::new(map.bytes()));
    // Seeking past the entries that are mapped, not read.
    let mut entries = archive.entries_with_seek()?;
    let mut text = String::new();
    {
        let mut first = entries.next().context("empty archive")??;
        let path = first.path()?.into_owned();
        ensure!(
            path == Path::new(GRAPH_NNEF_FILENAME),
            "{} first, not {GRAPH_NNEF_FILENAME}",
            path.display()
        );
        first.read_to_string(&mut text)?;
    }
    let (doc, parts) = crate::par::join(
        || {
            // The framework too: its `tract_nnef` registry parses tract's NNEF library.
            nnef_reader();
            crate::nnef_text::parse_document(&text)
        },
        || -> TractResult<_> {
            let mut tensors = HashMap::new();
            let mut resources: HashMap<String, Arc<dyn tract_nnef::resource::Resource>> =
                HashMap::new();
            let mut quantization = None;
            for entry in entries {
                let mut entry = entry?;
                if entry.header().entry_type().is_dir() {
                    continue;
                }
                let path = entry.path()?.into_owned();
                if path.extension().is_some_and(|e| e == "dat") {
                    let id = tensor_id(&path)?;
                    if path.starts_with(PANELS_DIR) {
                        let panels = mapped_f32(map, &entry)
                            .with_context(|| format!("tensor {}", path.display()))?;
                        resources.insert(id, Arc::new(panels));
                        continue;
                    }
                    let tensor = tract_nnef::tensors::read_tensor(&mut entry)
                        .with_context(|| format!("tensor {}", path.display()))?;
                    // Under its label with and without a leading `/` (see `tensor_id`);
                    // two labels that differ only there would be one entry name, and the
                    // archive cannot say which tensor is which.
                    let tensor = Arc::new(tensor);
                    let slash = Identifier(format!("/{id}"));
                    ensure!(
                        tensors.insert(slash, tensor.clone()).is_none(),
                        "two tensors named {}",
                        path.display()
                    );
                    tensors.insert(Identifier(id), tensor);
                } else if path == Path::new(GRAPH_QUANT_FILENAME) {
                    let mut text = String::new();
                    entry.read_to_string(&mut text)?;
                    let quant = tract_nnef::ast::quant::parse_quantization(&text)?;
                    quantization = Some(quant.into_iter().collect());
                } else {
                    bail!("unexpected entry {}", path.display());
                }
            }
            Ok((tensors, resources, quantization))
        },
    );
    let (tensors, resources, quantization) = parts?;
    Ok(tract_nnef::ast::ProtoModel {
        doc: doc?,
        tensors,
        quantization,
        resources,
    })
}

/// The label of the tensor an archive entry holds, without a leading `/`. tract's writer
/// stores a label that starts with `/` (a constant named after an ONNX node, `/model/...`, as
/// real exports name their nodes) as `./model/....dat`, which the tar format keeps only for
/// names past 100 bytes; tract's reader takes the `./` off. Either way the archive no longer
/// says whether the label had its `/`: [`read_proto`] files each tensor under both.
fn tensor_id(path: &Path) -> TractResult<String> {
    tract_nnef::resource::resource_path_to_id(path.strip_prefix("./").unwrap_or(path))
}

/// The f32 vector an archive entry holds, in place: the entry is a 128-byte header in the
/// NNEF tensor file format (as tract writes it: fields in the machine's byte order), then
/// the values.
fn mapped_f32<R: std::io::Read>(
    map: &Arc<MappedFile>,
    entry: &tar::Entry<R>,
) -> TractResult<MappedF32> {
    const HEADER: usize = 128;
    let start = usize::try_from(entry.raw_file_position())?;
    let size = usize::try_from(entry.size())?;
    let header = start
        .checked_add(HEADER)
        .and_then(|end| map.bytes().get(start..end))
        .context("truncated header")?;
    let u32_at = |at: usize| u32::from_ne_bytes(header[at..at + 4].try_into().unwrap());
    let u16_at = |at: usize| u16::from_ne_bytes(header[at..at + 2].try_into().unwrap());
    // magic, version 1.0, data bytes, rank, dims[8], bits per item, item type, vendor.
    let (magic, data_bytes, rank, len) = (&header[..4], u32_at(4), u32_at(8), u32_at(12));
    let (bits, item_type, vendor) = (u32_at(44), u16_at(48), u16_at(50));
    ensure!(
        magic == [0x4e, 0xef, 1, 0]
            && rank == 1
            && (bits, item_type, vendor) == (32, 0, 0)
            && Some(data_bytes) == len.checked_mul(4)
            && size == HEADER + data_bytes as usize,
        "not an f32 vector in the NNEF tensor format"
    );
    MappedF32::new(map.clone(), start + HEADER, len as usize)
        .context("values outside the archive or unaligned")
}

/// A writer that keeps the CRC-32 of the bytes through it.
struct Checksummed<T> {
    inner: T,
    crc: crc32fast::Hasher,
}

impl<T> Checksummed<T> {
    fn new(inner: T) -> Self {
        Checksummed {
            inner,
            crc: crc32fast::Hasher::new(),
        }
    }
}

impl<W: Write> Write for Checksummed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// tract's NNEF framework with the registries a cached graph needs: tract-core's, ONNX's,
/// tract-transformers' and edgevlm's (see the module docs).
pub fn nnef() -> &'static tract_nnef::framework::Nnef {
    static NNEF: OnceLock<tract_nnef::framework::Nnef> = OnceLock::new();
    NNEF.get_or_init(|| framework(tract_nnef::nnef()))
}

/// [`nnef`] for reading only: without tract's library of NNEF fragment definitions
/// (`Nnef::stdlib`), which only its writer looks up. `Nnef::default` parses that library
/// once for itself and once more for the `tract_nnef` registry, ~5-8 ms each with tract's
/// parser, on the path of every cached cold start. The same registries, in the same order.
fn nnef_reader() -> &'static tract_nnef::framework::Nnef {
    static NNEF: OnceLock<tract_nnef::framework::Nnef> = OnceLock::new();
    NNEF.get_or_init(|| {
        framework(tract_nnef::framework::Nnef {
            stdlib: vec![],
            registries: vec![tract_nnef::ops::tract_nnef(), tract_nnef::ops::tract_core()],
            // Archives are read by `read_proto`, not through resource loaders.
            resource_loaders: vec![],
            allow_extended_identifier_syntax: false,
            extern_all_constants: false,
        })
    })
}

fn framework(base: tract_nnef::framework::Nnef) -> tract_nnef::framework::Nnef {
    let mut nnef = base.with_onnx().with_tract_transformers();
    // First, so its dumpers for tract ops (products, slices) win over tract's.
    nnef.registries.insert(0, registry());
    nnef
}

fn registry() -> Registry {
    let mut r = Registry::new("edgevlm")
        .with_doc("Extension `edgevlm`: edgevlm's own ops and tract ops NNEF has no words for.");
    let input = || TypeName::Scalar.tensor().named("input");
    let int = |name: &str| TypeName::Integer.named(name);
    let output = [("output", TypeName::Scalar.tensor())];

    r.register_dumper(dump_einsum);
    r.register_dumper(|ast, node, op: &EinSumMatMul| dump_einsum(ast, node, &op.op));
    r.register_dumper(|ast, node, op: &WrittenEinSum| dump_einsum(ast, node, &op.0));
    r.register_primitive(
        "edgevlm_einsum",
        &[
            TypeName::Scalar.tensor().array().named("inputs"),
            TypeName::String.named("expr"),
            TypeName::String.named("acc"),
            TypeName::String.named("output"),
        ],
        &output,
        load_einsum,
    );
    // tract's registries check binary ops by their mini op; ours comes first, so these
    // names win when writing, and as primitives they read back without tract's casts.
    let binary = [
        TypeName::Scalar.tensor().named("a"),
        TypeName::Scalar.tensor().named("b"),
    ];
    for (id, op) in BINARIES {
        r.register_binary(id, &*op());
        r.register_primitive(id, &binary, &output, load_binary);
    }
    r.register_dumper(dump_slice);
    r.register_primitive(
        "edgevlm_slice",
        &[
            input(),
            int("axis"),
            TypeName::Integer.array().named("bounds"),
        ],
        &output,
        load_slice,
    );
    r.register_dumper(dump_tdim_const);
    r.register_primitive(
        "edgevlm_tdim_const",
        &[TypeName::Integer.tensor().named("values")],
        &output,
        load_tdim_const,
    );
    r.register_dumper(dump_q4);
    r.register_primitive(
        "edgevlm_q4_matmul",
        &[
            input(),
            TypeName::Scalar.tensor().named("scales"),
            TypeName::Integer.tensor().named("nibbles"),
            int("n"),
            int("k"),
        ],
        &output,
        load_q4,
    );
    r.register_dumper(dump_f32);
    r.register_primitive(
        "edgevlm_f32_matmul",
        &[
            input(),
            TypeName::String.named("panels"),
            int("n"),
            int("k"),
        ],
        &output,
        load_f32,
    );
    r.register_dumper(|ast, node, _: &FoldBarrier| unary(ast, node, "edgevlm_fold_barrier", &[]));
    r.register_primitive("edgevlm_fold_barrier", &[input()], &output, |b, i| {
        wire_unary(b, i, FoldBarrier)
    });
    r.register_dumper(|ast, node, _: &ExpandWeight| unary(ast, node, "edgevlm_expand_weight", &[]));
    r.register_primitive("edgevlm_expand_weight", &[input()], &output, |b, i| {
        wire_unary(b, i, ExpandWeight)
    });
    r.register_dumper(|ast, node, _: &DynamicQuantizeU8| {
        unary(ast, node, "edgevlm_dynamic_quantize_u8", &[])
    });
    r.register_primitive(
        "edgevlm_dynamic_quantize_u8",
        &[input()],
        &[
            ("output", TypeName::Integer.tensor()),
            ("scale", TypeName::Scalar.tensor()),
            ("zero_point", TypeName::Integer.tensor()),
        ],
        |b, i| wire_unary(b, i, DynamicQuantizeU8),
    );
    r.register_dumper(|ast, node, op: &DequantizeLinearF32| {
        let args = [
            ("scale_bits", numeric(op.scale.to_bits())),
            ("zero_point", numeric(op.zero_point)),
        ];
        unary(ast, node, "edgevlm_dequantize_linear_f32", &args)
    });
    r.register_primitive(
        "edgevlm_dequantize_linear_f32",
        &[input(), int("scale_bits"), int("zero_point")],
        &output,
        |b, i| {
            let op = DequantizeLinearF32 {
                scale: f32::from_bits(i.named_arg_as::<i64>(b, "scale_bits")? as u32),
                zero_point: i.named_arg_as::<i64>(b, "zero_point")? as i32,
            };
            wire_unary(b, i, op)
        },
    );
    let quantize = [input(), int("scale_bits"), int("zero_point"), int("signed")];
    r.register_element_wise(
        "edgevlm_quantize_linear",
        std::any::TypeId::of::<QuantizeLinearI8>(),
        Box::new(dump_quantize),
        quantize.to_vec(),
        load_quantize,
    );
    r.register_element_wise(
        "edgevlm_quantize_linear",
        std::any::TypeId::of::<QuantizeLinearU8>(),
        Box::new(dump_quantize),
        quantize.to_vec(),
        load_quantize,
    );
    r.register_element_wise(
        "edgevlm_lookup_table",
        std::any::TypeId::of::<LookupTable>(),
        Box::new(dump_lookup_table),
        vec![input(), TypeName::Integer.tensor().named("table")],
        load_lookup_table,
    );
    r
}

/// `id(input, args...)` for a node with one input.
fn unary(
    ast: &mut IntoAst,
    node: &TypedNode,
    id: &str,
    args: &[(&str, RValue)],
) -> TractResult<Option<Arc<RValue>>> {
    let input = ast.mapping[&node.inputs[0]].clone();
    Ok(Some(invocation(id, &[input], args)))
}

/// Wires `op` on the invocation's `input`.
fn wire_unary(
    b: &mut ModelBuilder,
    i: &ResolvedInvocation,
    op: impl Into<Box<dyn TypedOp>>,
) -> TractResult<Value> {
    let input: OutletId = i.named_arg_as(b, "input")?;
    b.wire(op, &[input])
}

/// A product as it is (those tract's writer leaves as products: the quantized ones; it turns
/// the others into NNEF `matmul` between reshapes, which the declutter after reading folds
/// back). tract's own spelling reads a quantized product back with its seven parameters
/// behind casts. A product tract has prepared for a matrix kernel (`EinSumMatMul`) is
/// written as its product, as tract writes it: the rewrites after the cache point look for
/// products.
fn dump_einsum(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &EinSum,
) -> TractResult<Option<Arc<RValue>>> {
    let inputs = node
        .inputs
        .iter()
        .map(|i| ast.mapping[i].as_ref().clone())
        .collect();
    Ok(Some(invocation(
        "edgevlm_einsum",
        &[Arc::new(RValue::Array(inputs))],
        &[
            ("expr", string(op.axes.to_string())),
            ("acc", string(format!("{:?}", op.operating_dt))),
            (
                "output",
                string(op.q_params.map(|dt| format!("{dt:?}")).unwrap_or_default()),
            ),
        ],
    )))
}

fn load_einsum(b: &mut ModelBuilder, i: &ResolvedInvocation) -> TractResult<Value> {
    let inputs: TVec<OutletId> = i.named_arg_as(b, "inputs")?;
    let axes = i
        .named_arg_as::<String>(b, "expr")?
        .parse::<AxesMapping>()?;
    let operating_dt: DatumType = i.named_arg_as::<String>(b, "acc")?.parse()?;
    let output = i.named_arg_as::<String>(b, "output")?;
    let q_params = if output.is_empty() {
        None
    } else {
        Some(output.parse::<DatumType>()?)
    };
    let op = EinSum {
        axes,
        operating_dt,
        q_params,
    };
    b.wire(op, &inputs)
}

/// An arithmetic binary op between operands that already have its type and rank: tract's
/// NNEF reader casts both operands of every `add` / `mul` to a common type (a cast node each,
/// ~190 in a 4-layer int8 decoder, that the declutter after reading removes again).
/// Makes one binary mini op.
type MakeBinary = fn() -> Box<dyn BinMiniOp>;

/// The binary ops written as themselves (`edgevlm_add(a, b)`), by NNEF name.
const BINARIES: [(&str, MakeBinary); 7] = {
    use tract_onnx::tract_core::ops::math;
    [
        ("edgevlm_add", || Box::new(math::Add)),
        ("edgevlm_sub", || Box::new(math::Sub)),
        ("edgevlm_mul", || Box::new(math::Mul)),
        ("edgevlm_div", || Box::new(math::Div)),
        ("edgevlm_max", || Box::new(math::Max)),
        ("edgevlm_min", || Box::new(math::Min)),
        ("edgevlm_pow", || Box::new(math::Pow)),
    ]
};

/// Reads one of [`BINARIES`] back as the binary op it was, without casts.
fn load_binary(b: &mut ModelBuilder, i: &ResolvedInvocation) -> TractResult<Value> {
    let name = &i.invocation.id.0;
    let (_, op) = BINARIES
        .iter()
        .find(|(id, _)| id == name)
        .with_context(|| format!("{name}: not an edgevlm binary op"))?;
    let (x, y): (OutletId, OutletId) = (i.named_arg_as(b, "a")?, i.named_arg_as(b, "b")?);
    b.wire(TypedBinOp(op(), None), &[x, y])
}

/// A slice as it is: tract's NNEF `slice` reads back as a clamping subgraph and a `DynSlice`
/// when a bound is symbolic (a decoder's rotary tables).
fn dump_slice(ast: &mut IntoAst, node: &TypedNode, op: &Slice) -> TractResult<Option<Arc<RValue>>> {
    let args = [
        ("axis", numeric(op.axis)),
        (
            "bounds",
            tract_nnef::ser::tdims(&[op.start.clone(), op.end.clone()]),
        ),
    ];
    unary(ast, node, "edgevlm_slice", &args)
}

fn load_slice(b: &mut ModelBuilder, i: &ResolvedInvocation) -> TractResult<Value> {
    let input: OutletId = i.named_arg_as(b, "input")?;
    let axis: usize = i.named_arg_as(b, "axis")?;
    let bounds: TVec<TDim> = i.named_arg_as(b, "bounds")?;
    ensure!(bounds.len() == 2, "edgevlm_slice: {} bounds", bounds.len());
    b.wire(
        Slice::new(axis, bounds[0].clone(), bounds[1].clone()),
        &[input],
    )
}

fn dump_q4(ast: &mut IntoAst, node: &TypedNode, op: &Q4MatMul) -> TractResult<Option<Arc<RValue>>> {
    let input = ast.mapping[&node.inputs[0]].clone();
    let (n, k, scales, nibbles) = op.weight.parts();
    let scales = ast.konst_variable(format!("{}.scales", node.name), &rctensor1(scales))?;
    let nibbles = ast.konst_variable(format!("{}.nibbles", node.name), &rctensor1(nibbles))?;
    Ok(Some(invocation(
        "edgevlm_q4_matmul",
        &[input, scales, nibbles],
        &[("n", numeric(n)), ("k", numeric(k))],
    )))
}

fn load_q4(b: &mut ModelBuilder, i: &ResolvedInvocation) -> TractResult<Value> {
    let input: OutletId = i.named_arg_as(b, "input")?;
    let scales: Arc<Tensor> = i.named_arg_as(b, "scales")?;
    let nibbles: Arc<Tensor> = i.named_arg_as(b, "nibbles")?;
    let (n, k) = (
        i.named_arg_as::<usize>(b, "n")?,
        i.named_arg_as::<usize>(b, "k")?,
    );
    let scales = scales.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    let nibbles = nibbles.try_as_plain_ram()?.as_slice::<u8>()?.to_vec();
    let weight = Q4Packed::from_parts(n, k, scales, nibbles)
        .with_context(|| format!("edgevlm_q4_matmul: parts do not fit n = {n}, k = {k}"))?;
    b.wire(
        Q4MatMul {
            weight: Arc::new(weight),
        },
        &[input],
    )
}

fn dump_f32(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &F32MatMul,
) -> TractResult<Option<Arc<RValue>>> {
    let input = ast.mapping[&node.inputs[0]].clone();
    let (n, k, panels) = op.weight.parts();
    // Not a `variable`: tract would copy the tensor into a graph constant. An archive entry
    // under `PANELS_DIR`, which `read_proto` maps in place and `load_f32` looks up by name.
    let label = Identifier(format!("{PANELS_DIR}/{}", node.id));
    ensure!(
        !ast.tensors.contains_key(&label),
        "{} written twice",
        label.0
    );
    ast.tensors.insert(label.clone(), panels);
    Ok(Some(invocation(
        "edgevlm_f32_matmul",
        &[input],
        &[
            ("panels", string(&label.0)),
            ("n", numeric(n)),
            ("k", numeric(k)),
        ],
    )))
}

fn load_f32(b: &mut ModelBuilder, i: &ResolvedInvocation) -> TractResult<Value> {
    let input: OutletId = i.named_arg_as(b, "input")?;
    let label: String = i.named_arg_as(b, "panels")?;
    let (n, k) = (
        i.named_arg_as::<usize>(b, "n")?,
        i.named_arg_as::<usize>(b, "k")?,
    );
    let unfit = || format!("edgevlm_f32_matmul: panels {label} do not fit n = {n}, k = {k}");
    // The panels are used as read, mapped in place by `read_proto` (or read into a tensor
    // by a reader that copies): no packing.
    let mapped = b.proto_model.resources.get(&label);
    let weight = if let Some(mapped) = mapped.and_then(|r| r.downcast_ref::<MappedF32>()) {
        F32Panels::from_mapped(n, k, mapped.clone()).with_context(unfit)?
    } else {
        let panels = b
            .proto_model
            .tensors
            .get(&Identifier(label.clone()))
            .with_context(|| format!("edgevlm_f32_matmul: no entry {label}.dat"))?;
        F32Panels::from_parts(n, k, panels.clone()).with_context(unfit)?
    };
    b.wire(
        F32MatMul {
            weight: Arc::new(weight),
        },
        &[input],
    )
}

fn element_wise(node: &TypedNode) -> TractResult<&ElementWiseOp> {
    node.op_as::<ElementWiseOp>()
        .with_context(|| format!("{} is not element-wise", node.name))
}

fn dump_quantize(ast: &mut IntoAst, node: &TypedNode) -> TractResult<Option<Arc<RValue>>> {
    let ElementWiseOp(op, None) = element_wise(node)? else {
        return Ok(None);
    };
    let (scale, zero_point, signed) = if let Some(q) = op.downcast_ref::<QuantizeLinearI8>() {
        (q.scale, q.zero_point as i64, 1)
    } else if let Some(q) = op.downcast_ref::<QuantizeLinearU8>() {
        (q.scale, q.zero_point as i64, 0)
    } else {
        return Ok(None);
    };
    let args = [
        ("scale_bits", numeric(scale.to_bits())),
        ("zero_point", numeric(zero_point)),
        ("signed", numeric(signed)),
    ];
    unary(ast, node, "edgevlm_quantize_linear", &args)
}

fn load_quantize(b: &mut ModelBuilder, i: &ResolvedInvocation) -> TractResult<Value> {
    let input: OutletId = i.named_arg_as(b, "input")?;
    let scale = f32::from_bits(i.named_arg_as::<i64>(b, "scale_bits")? as u32);
    let zero_point = i.named_arg_as::<i64>(b, "zero_point")?;
    let op: Box<dyn ElementWiseMiniOp> = if i.named_arg_as::<i64>(b, "signed")? != 0 {
        Box::new(QuantizeLinearI8 {
            scale,
            zero_point: zero_point as i8,
        })
    } else {
        Box::new(QuantizeLinearU8 {
            scale,
            zero_point: zero_point as u8,
        })
    };
    b.wire(ElementWiseOp(op, None), &[input])
}

fn dump_lookup_table(ast: &mut IntoAst, node: &TypedNode) -> TractResult<Option<Arc<RValue>>> {
    let ElementWiseOp(op, None) = element_wise(node)? else {
        return Ok(None);
    };
    let Some(op) = op.downcast_ref::<LookupTable>() else {
        return Ok(None);
    };
    let input = ast.mapping[&node.inputs[0]].clone();
    let table = ast.konst_variable(format!("{}.table", node.name), &rctensor1(op.table.table()))?;
    Ok(Some(invocation(
        "edgevlm_lookup_table",
        &[input, table],
        &[],
    )))
}

fn load_lookup_table(b: &mut ModelBuilder, i: &ResolvedInvocation) -> TractResult<Value> {
    let input: OutletId = i.named_arg_as(b, "input")?;
    let table: Arc<Tensor> = i.named_arg_as(b, "table")?;
    let table = tract_linalg::routines::lut_u8(table.try_as_plain_ram()?.as_slice::<u8>()?)?;
    b.wire(
        ElementWiseOp(Box::new(LookupTable { table }), None),
        &[input],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar archive of `tensors` as tract writes them, mapped.
    fn mapped_archive(tensors: &[(&str, Tensor)]) -> Arc<MappedFile> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, tensor) in tensors {
            let mut data = vec![];
            tract_nnef::tensors::write_tensor(&mut data, tensor).unwrap();
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            builder.append_data(&mut header, path, &*data).unwrap();
        }
        let bytes = builder.into_inner().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&bytes).unwrap();
        MappedFile::open(&file, bytes.len() as u64).unwrap()
    }

    /// Constants whose labels start with `/` (named after an ONNX node, as real exports name
    /// them), short and past the tar header's 100 bytes, come back from the archive under
    /// their labels, and the model runs.
    #[test]
    fn labels_from_onnx_node_names_round_trip() {
        // Large enough to be written as a tensor of its own, not inlined in the text.
        let n = 300;
        let long = format!("/model/{}/MatMul/folded", "layers.0".repeat(15));
        let values: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([n])).unwrap();
        let c = model
            .add_const("/model/layers.0/MatMul/folded", tensor1(&values))
            .unwrap();
        let c2 = model.add_const(&*long, tensor1(&values)).unwrap();
        let add = tract_onnx::tract_core::ops::math::add;
        let y = model.wire_node("/model/Add", add(), &[x, c]).unwrap()[0];
        let y = model.wire_node("/model/Add_1", add(), &[y, c2]).unwrap()[0];
        model.select_output_outlets(&[y]).unwrap();
        let mut bytes = vec![];
        nnef().write_to_tar(&model, &mut bytes).unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&bytes).unwrap();
        let map = MappedFile::open(&file, bytes.len() as u64).unwrap();
        let proto = read_proto(&map).unwrap();
        assert!(proto
            .tensors
            .contains_key(&Identifier("/model/layers.0/MatMul/folded".into())));
        let read = nnef_reader().model_for_proto_model(&proto).unwrap();
        let out = read
            .into_runnable()
            .unwrap()
            .run(tvec!(tensor1(&vec![1f32; n]).into_tvalue()))
            .unwrap();
        let want: Vec<f32> = values.iter().map(|v| 1.0 + v + v).collect();
        let got = out[0].try_as_plain_ram().unwrap();
        assert_eq!(got.as_slice::<f32>().unwrap(), &want[..]);
    }

    #[test]
    fn f32_vectors_map_in_place_and_other_entries_are_refused() {
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.25 - 7.0).collect();
        let map = mapped_archive(&[
            ("a.dat", tensor1(&values)),
            ("b.dat", tensor1(&vec![3i32; 1000])),
            ("c.dat", tensor1(&values).into_shape(&[10, 100]).unwrap()),
            ("d.dat", tensor1(&[1.5f32])),
        ]);
        let mut archive = tar::Archive::new(std::io::Cursor::new(map.bytes()));
        let read: Vec<_> = archive
            .entries_with_seek()
            .unwrap()
            .map(|e| mapped_f32(&map, &e.unwrap()))
            .collect();
        let a = read[0].as_ref().unwrap();
        assert_eq!(a.as_slice(), &values[..]);
        // In place: the values' address is inside the mapping.
        let bytes = map.bytes().as_ptr_range();
        assert!(bytes.contains(&a.as_slice().as_ptr().cast()));
        for (i, what) in [(1, "i32"), (2, "a matrix")] {
            let e = read[i].as_ref().unwrap_err().to_string();
            assert!(e.contains("not an f32 vector"), "{what}: {e}");
        }
        assert_eq!(read[3].as_ref().unwrap().as_slice(), &[1.5]);
    }

    /// An f32 product's packed panels go to the archive as an entry of their own and come
    /// back mapped in place, the same values (the kernel need not run: any CPU).
    #[test]
    fn f32_panels_round_trip_through_a_slot_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let graph = dir.path().join("g.onnx");
        std::fs::write(&graph, b"a graph").unwrap();
        let slot = Slot::new(
            &dir.path().join("cache"),
            &graph,
            &LoadOptions::default(),
            &[],
        )
        .unwrap();
        let (k, n) = (40, 70);
        let w: Vec<f32> = (0..k * n).map(|i| (i % 17) as f32 - 8.5).collect();
        let panels = F32Panels::pack(&w, k, n, true).unwrap();
        let (_, _, written) = panels.parts();
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([3, k])).unwrap();
        let op = F32MatMul {
            weight: Arc::new(panels),
        };
        let y = model.wire_node("y", op, &[x]).unwrap();
        model.select_output_outlets(&y).unwrap();
        slot.write(model, &["a note".into()]).unwrap();

        let (read, notes, mapped) = slot.read().unwrap();
        assert_eq!(notes, ["a note"]);
        assert_eq!(mapped, written.len() * 4);
        let products: Vec<&F32MatMul> = read.nodes().iter().filter_map(|n| n.op_as()).collect();
        assert_eq!(products.len(), 1);
        assert!(products[0].weight.is_mapped());
        let (rn, rk, values) = products[0].weight.parts();
        assert_eq!((rn, rk), (n, k));
        assert_eq!(values, written);
    }

    #[test]
    fn checksum_in_parts_is_the_whole_files() {
        let bytes: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for len in [0, 1, 1 << 20, (1 << 20) + 1, bytes.len()] {
            assert_eq!(
                checksum(&bytes[..len]),
                crc32fast::hash(&bytes[..len]),
                "{len}"
            );
        }
    }
}
