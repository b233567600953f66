//! The load cache (`edgevlm_runtime::cache`): a graph read back from it runs bit for bit as
//! the same graph loaded from its ONNX file, with the same rewrites; a stale, truncated or
//! damaged entry is rebuilt and the notes say why.

mod common;

use std::path::{Path, PathBuf};

use edgevlm_runtime::{npy, LoadOptions, OnnxModel, Tensor};

use common::Fixture;

fn fixtures() -> Vec<Fixture> {
    common::index().fixture
}

fn fixture_dir() -> PathBuf {
    common::models().join("fixtures")
}

fn cached(dir: &Path, options: &LoadOptions) -> LoadOptions {
    LoadOptions {
        cache_dir: Some(dir.to_owned()),
        ..options.clone()
    }
}

/// The model's outputs on the fixture's inputs.
fn outputs(model: &OnnxModel, f: &Fixture) -> Vec<Tensor> {
    let inputs = model
        .inputs()
        .iter()
        .map(|spec| npy::read(&fixture_dir().join(&f.inputs[&spec.name])).unwrap())
        .collect();
    model
        .run(inputs)
        .unwrap_or_else(|e| panic!("{}: {e:#}", f.name))
}

/// The cache's own note (the one line starting with `cache:`).
fn cache_note(model: &OnnxModel) -> String {
    let notes: Vec<&String> = model
        .notes()
        .iter()
        .filter(|n| n.starts_with("cache:"))
        .collect();
    assert_eq!(notes.len(), 1, "{:?}", model.notes());
    notes[0].clone()
}

/// Every note but the cache's.
fn other_notes(model: &OnnxModel) -> Vec<String> {
    model
        .notes()
        .iter()
        .filter(|n| !n.starts_with("cache:"))
        .cloned()
        .collect()
}

fn load(path: &Path, options: &LoadOptions) -> OnnxModel {
    OnnxModel::load(path, options).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
}

/// Every fixture graph (fp32, dynamic int8, per-channel, QDQ, 4-bit, fp16, and one whose
/// declared output shape is wrong), with edgevlm's kernels and with tract's (the aarch64
/// path): written on the first cached load, read on the second, and then the same outputs
/// bit for bit, the same input and output names and the same load notes as from ONNX.
#[test]
fn fixtures_read_from_the_cache_run_as_from_onnx() {
    for avx512_kernels in [true, false] {
        let plain = LoadOptions {
            avx512_kernels,
            ..LoadOptions::default()
        };
        let dir = tempfile::tempdir().unwrap();
        for f in fixtures() {
            let path = fixture_dir().join(&f.model);
            let name = format!("{} (avx512_kernels {avx512_kernels})", f.name);
            let reference = load(&path, &plain);
            let first = load(&path, &cached(dir.path(), &plain));
            let note = cache_note(&first);
            assert!(
                note.starts_with("cache: none yet; decluttered model written to "),
                "{name}: {note}"
            );
            let second = load(&path, &cached(dir.path(), &plain));
            let note = cache_note(&second);
            assert!(
                note.starts_with("cache: decluttered model read from "),
                "{name}: {note}"
            );
            assert!(
                second.load_stages().iter().any(|(s, _)| *s == "read cache"),
                "{name}: {:?}",
                second.load_stages()
            );
            assert_eq!(other_notes(&second), other_notes(&reference), "{name}");
            // Packed f32 weights are read in place from the archive, not copied.
            let packed = other_notes(&second)
                .iter()
                .any(|n| n.starts_with("f32-avx512:") || n.starts_with("f32-avx2:"));
            assert_eq!(
                note.contains("of f32 weights mapped in place"),
                packed,
                "{name}: {note}"
            );
            let specs = |m: &OnnxModel| {
                let all = m.inputs().iter().chain(m.outputs());
                all.map(|s| format!("{} {:?} {}", s.name, s.datum_type, s.shape_string()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(specs(&second), specs(&reference), "{name}");
            assert_eq!(
                outputs(&second, &f),
                outputs(&reference, &f),
                "{name}: outputs differ from the ONNX load"
            );
        }
        graph_texts_read_as_tract_reads_them(dir.path());
    }
}

/// edgevlm's reader of the archives' NNEF text keeps to its fast subset on every fixture's
/// text and gives tract's parser's document.
fn graph_texts_read_as_tract_reads_them(dir: &Path) {
    use std::io::Read;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.to_string_lossy().ends_with(".nnef.tar") {
            continue;
        }
        let mut archive = tar::Archive::new(std::fs::File::open(&path).unwrap());
        let mut first = archive.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(first.path().unwrap().to_str(), Some("graph.nnef"));
        let mut text = String::new();
        first.read_to_string(&mut text).unwrap();
        let tract = tract_nnef::ast::parse::parse_document(&text).unwrap();
        let ours = edgevlm_runtime::nnef_text::parse_subset(&text);
        assert!(ours.is_some(), "{}: left to tract's parser", path.display());
        assert!(ours == Some(tract), "{}: another document", path.display());
    }
}

/// One archive of the slot in `dir` (there is one graph per test directory).
fn archive(dir: &Path) -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".nnef.tar"))
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found.remove(0)
}

/// Loads with the cache and checks the note starts with `expected`, the outputs are right,
/// and the next load reads the rebuilt entry.
fn rebuilt(path: &Path, options: &LoadOptions, f: &Fixture, reference: &[Tensor], expected: &str) {
    let model = load(path, options);
    let note = cache_note(&model);
    assert!(note.starts_with(expected), "{note}");
    assert!(
        note.contains("decluttered model written to"),
        "rebuilt: {note}"
    );
    assert_eq!(outputs(&model, f), reference, "{note}");
    let next = load(path, options);
    assert!(
        cache_note(&next).starts_with("cache: decluttered model read from"),
        "{:?}",
        next.notes()
    );
}

/// Damaged and stale entries never fail a load: each is rebuilt from the ONNX file, the note
/// naming the cause (truncated archive, flipped bit, unreadable stamp, another tract version,
/// a changed graph file), and the outputs stay right.
#[test]
fn stale_and_damaged_entries_are_rebuilt_and_say_why() {
    let f = fixtures().into_iter().find(|f| f.name == "q4").unwrap();
    let work = tempfile::tempdir().unwrap();
    // A copy of the graph, so the test can touch it.
    let graph = work.path().join("model.onnx");
    std::fs::copy(fixture_dir().join(&f.model), &graph).unwrap();
    let cache = work.path().join("cache");
    let options = cached(&cache, &LoadOptions::default());
    let reference = outputs(&load(&graph, &LoadOptions::default()), &f);
    rebuilt(&graph, &options, &f, &reference, "cache: none yet;");
    let tar = archive(&cache);
    let stamp = tar.with_file_name(
        tar.file_name()
            .unwrap()
            .to_string_lossy()
            .replace(".nnef.tar", ".json"),
    );

    // Truncated (a write cut short by a power loss on a board).
    let len = std::fs::metadata(&tar).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&tar)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    rebuilt(&graph, &options, &f, &reference, "cache: unreadable: ");

    // One flipped bit in the middle (a weight): same size, caught by the checksum.
    let mut bytes = std::fs::read(&tar).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&tar, &bytes).unwrap();
    let model = load(&graph, &options);
    assert!(
        cache_note(&model).contains("checksum"),
        "{:?}",
        model.notes()
    );
    assert_eq!(outputs(&model, &f), reference);

    // A stamp that is not JSON.
    std::fs::write(&stamp, "{ not json").unwrap();
    rebuilt(&graph, &options, &f, &reference, "cache: unreadable: ");

    // Written by another tract.
    let text = std::fs::read_to_string(&stamp).unwrap();
    let older = text.replace(
        &format!("\"tract\": \"{}\"", edgevlm_runtime::TRACT_VERSION),
        "\"tract\": \"0.23.8\"",
    );
    assert_ne!(older, text);
    std::fs::write(&stamp, older).unwrap();
    rebuilt(
        &graph,
        &options,
        &f,
        &reference,
        &format!(
            "cache: stale: tract 0.23.8 (now {});",
            edgevlm_runtime::TRACT_VERSION
        ),
    );

    // The graph file replaced by a new copy of itself (a reinstall): another inode/mtime.
    let again = work.path().join("model.onnx.new");
    std::fs::copy(&graph, &again).unwrap();
    std::fs::rename(&again, &graph).unwrap();
    rebuilt(
        &graph,
        &options,
        &f,
        &reference,
        "cache: stale: the graph or its data files changed since;",
    );

    // Other load options have their own entry: both stay.
    let other = LoadOptions {
        prefill_plans: false,
        ..options.clone()
    };
    rebuilt(&graph, &other, &f, &reference, "cache: none yet;");
    let next = load(&graph, &options);
    assert!(cache_note(&next).starts_with("cache: decluttered model read from"));

    // An entry whose graph is gone is removed when another is written.
    let gone = work.path().join("gone.onnx");
    std::fs::copy(&graph, &gone).unwrap();
    load(&gone, &options);
    let slots = |dir: &Path| std::fs::read_dir(dir).unwrap().count();
    let with_gone = slots(&cache);
    std::fs::remove_file(&gone).unwrap();
    let third = LoadOptions {
        fix_qdq_softmax: false,
        ..options.clone()
    };
    load(&graph, &third);
    assert_eq!(slots(&cache), with_gone, "one entry written, one removed");
    assert!(std::fs::read_dir(&cache).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("gone-")));

    // A cache directory that cannot be created: the load works and says so.
    let blocked = LoadOptions {
        cache_dir: Some(graph.join("cache")),
        ..LoadOptions::default()
    };
    let model = load(&graph, &blocked);
    assert!(
        cache_note(&model).contains("not written"),
        "{:?}",
        model.notes()
    );
    assert_eq!(outputs(&model, &f), reference);
}
