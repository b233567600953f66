//! Results database, comparison tables and plots on real files: records built by hand and from
//! synthetic agent events go into an SQLite file, come back equal, and feed the tables and plots.

use std::collections::BTreeSet;
use std::path::Path;

use edgevlm_host::db::{DbError, Filter, ResultsDb, SCHEMA_VERSION};
use edgevlm_host::plot::{write_plots, PLOT_SIZE};
use edgevlm_host::record::{
    BoardFacts, Latency, MemoryPoint, ModelFacts, NodeStat, RunSettings, StageStats,
};
use edgevlm_host::report::{compare, Format};
use edgevlm_host::BenchRecord;
use edgevlm_proto::{self as proto, bounded};

fn board(name: &str) -> BoardFacts {
    BoardFacts {
        name: name.into(),
        url: format!("ssh://pi@{name}:22"),
        profile: "rpi5".into(),
        arch: "aarch64".into(),
        cpu_model: "Cortex-A76".into(),
        cores: 4,
        ram_total_kib: 8 * 1024 * 1024,
        agent_version: "0.1.0".into(),
        tract_version: "0.23.9".into(),
    }
}

/// A vision run with every field filled, figures chosen so ratios are exact.
fn vision_run(variant: &str, p50_us: u64, rss_kib: u64) -> BenchRecord {
    BenchRecord {
        id: 0,
        started_at: 1_700_000_000,
        host_version: "0.1.0".into(),
        board: board("line3-pi5"),
        model: ModelFacts {
            name: "mobilenet-v3".into(),
            version: "1.2".into(),
            variant: variant.into(),
            task: "classify".into(),
            bytes: 4_000_000,
        },
        settings: RunSettings {
            warmup: 2,
            iterations: 4,
            min_duration_ms: 0,
            threads: 4,
            input: "synthetic seed=1".into(),
            traced: true,
        },
        run: 7,
        load_us: 120_000,
        first_run_us: 3 * p50_us,
        load_source: "onnx".into(),
        iterations: 4,
        latency: Latency {
            min_us: p50_us - 100,
            mean_us: p50_us + 50,
            p50_us,
            p90_us: p50_us + 200,
            p99_us: p50_us + 400,
            max_us: p50_us + 400,
        },
        tokens: None,
        peak_rss_kib: rss_kib,
        peak_pss_kib: rss_kib - 1024,
        dropped_events: 0,
        latencies_us: vec![p50_us - 100, p50_us, p50_us + 200, p50_us + 400],
        stages: vec![
            StageStats {
                stage: "preprocess".into(),
                mean_us: 0.25 * p50_us as f64,
                p50_us: p50_us / 4,
                share: 0.25,
            },
            StageStats {
                stage: "infer".into(),
                mean_us: 0.75 * p50_us as f64,
                p50_us: p50_us * 3 / 4,
                share: 0.75,
            },
        ],
        memory: (0..20)
            .map(|i| MemoryPoint {
                t_us: i * 5_000,
                rss_kib: rss_kib - 2048 + (i * 100).min(2048),
                pss_kib: rss_kib - 3072 + (i * 100).min(2048),
            })
            .collect(),
        nodes: vec![NodeStat {
            graph: "model".into(),
            node: "conv_17".into(),
            op: "Conv".into(),
            mean_us: 812.5,
            share: 0.4,
        }],
        token_timings: vec![],
    }
}

/// A VLM run built the way the client builds it: from the agent's summary and trace events.
fn vlm_run_from_events() -> BenchRecord {
    let span = |iteration, stage: &str, start_us, duration_us| {
        proto::TraceEvent::Span(proto::StageSpan {
            iteration,
            stage: bounded(stage),
            start_us,
            duration_us,
        })
    };
    let mut events = Vec::new();
    let mut t = 0;
    for iteration in 0..5u32 {
        let warmup = iteration == 0;
        let jitter = u64::from(iteration) * 1_013;
        for (stage, d) in [
            ("preprocess", 4_000 + jitter / 7),
            ("vision_encoder", 180_000 + jitter),
            ("prefill", 90_000 + jitter / 3),
            ("decode", 400_000 + jitter * 2),
        ] {
            events.push(span(iteration, stage, t, d));
            t += d;
        }
        for index in 0..16u32 {
            events.push(proto::TraceEvent::Token(proto::TokenTiming {
                iteration,
                index,
                start_us: t,
                duration_us: if index == 0 { 95_000 } else { 25_000 },
            }));
        }
        events.push(proto::TraceEvent::Memory(proto::MemorySample {
            t_us: t,
            rss_kib: 600_000 + u64::from(iteration) * 3_000,
            pss_kib: 0,
        }));
        events.push(proto::TraceEvent::Iteration(proto::IterationDone {
            iteration,
            warmup,
            duration_us: 674_000 + jitter * 3,
        }));
    }
    events.push(proto::TraceEvent::Node(proto::NodeTiming {
        rank: 0,
        graph: bounded("decoder"),
        node: bounded("layers.3.mlp.down_proj"),
        op: bounded("MatMatMulPack"),
        total_us: 1_000_003,
        iterations: 3,
        share_permille: 123,
    }));
    let summary = proto::BenchSummary {
        run: proto::RunId(42),
        model: bounded("smolvlm"),
        version: bounded("256m"),
        model_bytes: 180_123_456,
        threads: 4,
        warmup: 1,
        iterations: 4,
        load_us: 2_500_000,
        first_run_us: 900_000,
        latency: proto::LatencyStats {
            min_us: 675_013,
            mean_us: 681_000,
            p50_us: 680_078,
            p90_us: 686_156,
            p99_us: 686_156,
            max_us: 686_156,
        },
        tokens: Some(proto::TokenStats {
            prompt_tokens: 71,
            generated_tokens: 64,
            ttft_p50_us: 95_000,
            inter_token_p50_us: 25_000,
        }),
        peak_rss_kib: 612_000,
        peak_pss_kib: 0,
        dropped_events: 3,
        load_source: proto::LoadSource::Cache,
    };
    BenchRecord::from_run(
        board("bench-pi4"),
        ModelFacts {
            name: "smolvlm".into(),
            version: "256m".into(),
            variant: "q4".into(),
            task: "vqa".into(),
            bytes: 0,
        },
        RunSettings {
            warmup: 1,
            iterations: 4,
            min_duration_ms: 0,
            threads: 4,
            input: "image samples/ok_01.png".into(),
            traced: true,
        },
        &summary,
        &events,
    )
}

/// fp32 baseline, int8 (half the p50 and RSS) and a VLM, stored in a fresh database.
fn stored_runs(path: &Path) -> Vec<BenchRecord> {
    let mut db = ResultsDb::open(path).unwrap();
    let mut runs = vec![
        vision_run("fp32", 8_000, 204_800),
        vision_run("int8", 4_000, 102_400),
        vlm_run_from_events(),
    ];
    for r in &mut runs {
        db.insert(r).unwrap();
    }
    runs
}

#[test]
fn records_round_trip_through_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/results.sqlite");
    let runs = stored_runs(&path);
    assert_eq!(
        runs.iter().map(|r| r.id).collect::<Vec<_>>(),
        [1, 2, 3],
        "insert sets the ids"
    );
    // started_at is kept when given and set to now when 0.
    assert_eq!(runs[0].started_at, 1_700_000_000);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (now - runs[2].started_at).abs() < 60,
        "{}",
        runs[2].started_at
    );
    assert!(runs[2].tokens.is_some() && !runs[2].stages.is_empty());

    // A new connection reads back exactly what was stored.
    let db = ResultsDb::open_existing(&path).unwrap();
    for r in &runs {
        assert_eq!(db.get(r.id).unwrap().as_ref(), Some(r));
    }
    assert_eq!(db.get(99).unwrap(), None);
    assert_eq!(db.count().unwrap(), 3);
    assert_eq!(db.all().unwrap(), runs);
    assert_eq!(db.last(2).unwrap(), runs[1..], "last is oldest first");
    assert_eq!(db.last(10).unwrap(), runs);
    assert_eq!(
        db.get_many(&[3, 1]).unwrap(),
        [runs[2].clone(), runs[0].clone()]
    );
    let filtered = db
        .filter(&Filter {
            model: Some("mobilenet-v3".into()),
            last: Some(1),
            ..Filter::default()
        })
        .unwrap();
    assert_eq!(filtered, runs[1..2]);
    let by_board = db
        .filter(&Filter {
            board: Some("bench-pi4".into()),
            ..Filter::default()
        })
        .unwrap();
    assert_eq!(by_board, runs[2..]);

    let err = db.get_many(&[1, 17]).unwrap_err();
    assert!(matches!(err, DbError::UnknownRun { id: 17, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("no run 17") && msg.contains("1 to 3") && msg.contains("results.sqlite"),
        "{msg}"
    );

    // The summary columns are there for plain SQL, and the JSON column holds the whole record.
    let conn = rusqlite::Connection::open(&path).unwrap();
    let (variant, p50, rss, ttft, trace): (String, i64, i64, Option<i64>, String) = conn
        .query_row(
            "SELECT model_variant, latency_p50_us, peak_rss_kib, ttft_p50_us, trace FROM runs WHERE id = 3",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .unwrap();
    assert_eq!(
        (variant.as_str(), p50, rss, ttft),
        ("q4", 680_078, 612_000, Some(95_000))
    );
    let json: serde_json::Value = serde_json::from_str(&trace).unwrap();
    assert_eq!(json["id"], 3);
    assert_eq!(json["latencies_us"].as_array().unwrap().len(), 4);
    assert_eq!(
        json["token_timings"].as_array().unwrap().len(),
        runs[2].token_timings.len()
    );
}

/// Computed means and shares need 17 significant digits about half the time; serde_json parses
/// those exactly only with its `float_roundtrip` feature (without it ~13% come back 1 ULP off).
#[test]
fn computed_floats_come_back_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = ResultsDb::open(&dir.path().join("r.sqlite")).unwrap();
    let mut r = vision_run("fp32", 8_000, 204_800);
    r.stages = (1..200u32)
        .map(|i| StageStats {
            stage: format!("s{i}"),
            mean_us: f64::from(i * 7919) / 3.0 + 0.1,
            p50_us: 1,
            share: 1.0 / f64::from(i + 2),
        })
        .collect();
    db.insert(&mut r).unwrap();
    assert_eq!(db.get(r.id).unwrap().unwrap().stages, r.stages);
}

#[test]
fn a_newer_schema_is_refused_and_older_files_stay_readable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.sqlite");
    stored_runs(&path);
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
    }
    let err = ResultsDb::open(&path).unwrap_err();
    assert!(matches!(err, DbError::NewerSchema { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string())
            && msg.contains(&format!("schema version {}", SCHEMA_VERSION + 1))
            && msg.contains("upgrade edgevlm"),
        "{msg}"
    );
    // Nothing was touched: putting the version back makes it readable again.
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .unwrap();
    }
    assert_eq!(ResultsDb::open(&path).unwrap().count().unwrap(), 3);
}

#[test]
fn foreign_missing_and_corrupt_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();

    let foreign = dir.path().join("other.sqlite");
    rusqlite::Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE notes (text TEXT)")
        .unwrap();
    let err = ResultsDb::open(&foreign).unwrap_err();
    assert!(matches!(err, DbError::Foreign { .. }), "{err:?}");
    assert!(err.to_string().contains("other.sqlite"), "{err}");

    let missing = dir.path().join("nope/results.sqlite");
    let err = ResultsDb::open_existing(&missing).unwrap_err();
    assert!(
        matches!(err, DbError::Missing { .. }) && err.to_string().contains("nope/results.sqlite"),
        "{err}"
    );
    assert!(!missing.exists(), "open_existing must not create the file");

    let garbage = dir.path().join("garbage.sqlite");
    std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
    let err = ResultsDb::open(&garbage).unwrap_err().to_string();
    assert!(
        err.contains("garbage.sqlite") && err.contains("not a database"),
        "{err}"
    );
}

#[test]
fn concurrent_writers_both_land() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.sqlite");
    ResultsDb::open(&path).unwrap();
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut db = ResultsDb::open(&path).unwrap();
                for i in 0..10 {
                    let mut r = vision_run("int8", 4_000 + w * 100 + i, 102_400);
                    db.insert(&mut r).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let db = ResultsDb::open(&path).unwrap();
    let ids: BTreeSet<i64> = db.all().unwrap().iter().map(|r| r.id).collect();
    assert_eq!(ids, (1..=20).collect());
}

/// Minimal RFC 4180 reader, to check the writer's quoting independently.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = vec![];
    let mut row = vec![];
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(field.is_empty() && row.is_empty(), "CSV ends with CRLF");
    rows
}

#[test]
fn markdown_table_has_every_run_ratios_and_stages() {
    let dir = tempfile::tempdir().unwrap();
    let runs = stored_runs(&dir.path().join("r.sqlite"));
    let md = compare(&runs, Format::Markdown);
    let lines: Vec<&str> = md.lines().collect();
    assert!(
        lines[0].starts_with("| run |") && lines[0].contains("p50 ms"),
        "{md}"
    );
    assert!(
        lines[1].starts_with("| --: | :---"),
        "numbers right, text left:\n{md}"
    );
    // Rows in order, with the figures in display units.
    let row = |id: &str| {
        lines
            .iter()
            .find(|l| {
                l.trim_start_matches('|')
                    .trim_start()
                    .starts_with(&format!("{id} "))
            })
            .unwrap_or_else(|| panic!("no row for run {id}:\n{md}"))
            .split('|')
            .map(str::trim)
            .collect::<Vec<_>>()
    };
    let r1 = row("1");
    assert_eq!(
        &r1[1..17],
        [
            "1",
            "mobilenet-v3 1.2",
            "fp32",
            "4.00",
            "line3-pi5",
            "4",
            "120",
            "onnx",
            "24.0",
            "8.00",
            "8.40",
            "-",
            "-",
            "-",
            "200",
            "199"
        ]
    );
    let r3 = row("3");
    assert_eq!(r3[2], "smolvlm 256m");
    assert_eq!(r3[4], "180", "size MB: {r3:?}");
    assert_eq!(r3[8], "cache", "load from: {r3:?}");
    assert_eq!(r3[12], "95.0", "TTFT ms: {r3:?}");
    assert_eq!(r3[13], "747", "prefill tok/s = 71 / 0.095: {r3:?}");
    assert_eq!(r3[14], "40.0", "decode tok/s: {r3:?}");
    assert_eq!(r3[16], "-", "no PSS: {r3:?}");
    // Ratios against run 1: int8 has half the p50 and half the RSS.
    assert!(
        md.contains("### Against run 1 (mobilenet-v3 fp32, baseline)"),
        "{md}"
    );
    let ratio_row = lines
        .iter()
        .find(|l| l.contains("mobilenet-v3 int8") && l.contains('×'))
        .unwrap_or_else(|| panic!("{md}"));
    let cells: Vec<&str> = ratio_row.split('|').map(str::trim).collect();
    assert_eq!(
        cells[1..8],
        [
            "2",
            "mobilenet-v3 int8",
            "1.00×",
            "1.00×",
            "0.50×",
            "0.52×",
            "0.50×"
        ]
    );
    // Stage breakdown: both vision stages and the VLM's, with shares.
    assert!(md.contains("### Stages"), "{md}");
    let infer = lines.iter().find(|l| l.starts_with("| infer")).unwrap();
    assert!(
        infer.contains("6.00 (75%)") && infer.contains("3.00 (75%)"),
        "{infer}"
    );
    let decode = lines.iter().find(|l| l.starts_with("| decode")).unwrap();
    assert!(
        decode.contains("- ") && decode.contains("(59%)"),
        "{decode}"
    );
    assert!(md.contains("dropped 3 trace events"), "{md}");
    assert!(
        md.contains("### Slowest nodes of run 3") && md.contains("layers.3.mlp.down_proj"),
        "{md}"
    );
    // Every table line has the same number of columns as its header.
    for block in md.split("\n\n").filter(|b| b.starts_with('|')) {
        let counts: BTreeSet<usize> = block.lines().map(|l| l.matches(" |").count()).collect();
        assert_eq!(counts.len(), 1, "ragged table:\n{block}");
    }
}

#[test]
fn csv_is_quoted_and_json_is_a_summary_array() {
    let dir = tempfile::tempdir().unwrap();
    let mut runs = stored_runs(&dir.path().join("r.sqlite"));
    runs[0].model.name = "mobilenet, \"large\"".into();
    runs[0].board.name = "line 3\npi5".into();

    let rows = parse_csv(&compare(&runs, Format::Csv));
    assert_eq!(rows.len(), 4, "{rows:?}");
    let header = &rows[0];
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    assert!(rows.iter().all(|r| r.len() == header.len()), "{rows:?}");
    assert_eq!(rows[1][col("model")], "mobilenet, \"large\"");
    assert_eq!(rows[1][col("board")], "line 3\npi5");
    assert_eq!(rows[1][col("p50_ms")], "8.000");
    assert_eq!(rows[2][col("peak_rss_mib")], "100.000");
    assert_eq!(
        rows[1][col("ttft_ms")],
        "",
        "missing figures are empty cells"
    );
    assert_eq!(rows[3][col("ttft_ms")], "95.000");
    assert_eq!(rows[3][col("run")], "3");

    let json: serde_json::Value = serde_json::from_str(&compare(&runs, Format::Json)).unwrap();
    let array = json.as_array().unwrap();
    assert_eq!(array.len(), 3);
    assert_eq!(array[0]["model"], "mobilenet, \"large\"");
    assert_eq!(array[1]["p50_ms"], 4.0);
    assert_eq!(array[1]["peak_pss_mib"], 99.0);
    assert!(array[0]["ttft_ms"].is_null());
    assert_eq!(array[2]["ttft_ms"], 95.0);
    assert_eq!(array[2]["decode_tok_s"], 40.0);
    assert!(array[2]["peak_pss_mib"].is_null());
    assert_eq!(array[2]["stages"].as_array().unwrap().len(), 4);
    assert_eq!(array[0]["stages"][1]["stage"], "infer");
    assert_eq!(array[0]["stages"][1]["mean_ms"], 6.0);
    for run in array {
        assert!(
            run.get("latencies_us").is_none() && run.get("memory").is_none(),
            "{run}"
        );
    }
}

/// The contents of an SVG's `<text>` elements, checking the document is well formed enough.
fn svg_texts(svg: &str, name: &str) -> Vec<String> {
    let svg = svg.trim();
    assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"), "{name}");
    assert_eq!(
        svg.matches("<text").count(),
        svg.matches("</text>").count(),
        "{name}"
    );
    svg.split("<text")
        .skip(1)
        .map(|t| {
            let body =
                &t[t.find('>').expect("text element closes") + 1..t.find("</text>").unwrap()];
            body.trim()
                .replace("&apos;", "'")
                .replace("&quot;", "\"")
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&")
        })
        .collect()
}

/// Distinct colours in an RGB buffer.
fn colours(data: &[u8]) -> BTreeSet<[u8; 3]> {
    data.chunks_exact(3).map(|p| [p[0], p[1], p[2]]).collect()
}

#[test]
fn plots_are_written_as_svg_and_png() {
    let dir = tempfile::tempdir().unwrap();
    let runs = stored_runs(&dir.path().join("r.sqlite"));
    let out = dir.path().join("plots");
    let files = write_plots(&runs, &out).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "latency_cdf.svg",
            "latency_cdf.png",
            "memory.svg",
            "memory.png",
            "stages.svg",
            "stages.png"
        ]
    );
    for f in &files {
        assert!(f.starts_with(&out), "{}", f.display());
    }
    let svg = |name: &str| svg_texts(&std::fs::read_to_string(out.join(name)).unwrap(), name);
    let has = |texts: &[String], needle: &str| texts.iter().any(|t| t.contains(needle));
    for name in ["latency_cdf.svg", "memory.svg", "stages.svg"] {
        let texts = svg(name);
        assert!(
            has(&texts, "#1 mobilenet-v3 fp32"),
            "{name} lacks run 1: {texts:?}"
        );
        assert!(
            has(&texts, "#3 smolvlm q4"),
            "{name} lacks run 3: {texts:?}"
        );
    }
    let cdf = svg("latency_cdf.svg");
    for label in [
        "Latency distribution",
        "latency (ms)",
        "iterations at or below (%)",
        "p50",
        "p99",
    ] {
        assert!(has(&cdf, label), "latency_cdf.svg lacks {label:?}: {cdf:?}");
    }
    assert!(
        has(&cdf, "p50 8.00 ms, p99 8.40 ms"),
        "fp32's percentiles: {cdf:?}"
    );
    assert!(
        has(&cdf, "p50 4.00 ms, p99 4.40 ms"),
        "int8's percentiles: {cdf:?}"
    );
    assert!(
        !cdf.iter().any(|t| t.is_empty()),
        "empty text elements are dropped"
    );
    let memory = svg("memory.svg");
    for label in [
        "memory (MiB)",
        "time since the run started (ms)",
        "fp32 · line3-pi5 RSS",
        "peak 200 MiB",
        "fp32 · line3-pi5 PSS",
        "peak 199 MiB",
        "q4 · bench-pi4 RSS",
    ] {
        assert!(
            has(&memory, label),
            "memory.svg lacks {label:?}: {memory:?}"
        );
    }
    assert!(
        !has(&memory, "q4 · bench-pi4 PSS"),
        "no PSS line for a run without PSS"
    );
    let stages = svg("stages.svg");
    for label in [
        "preprocess",
        "infer",
        "vision_encoder",
        "prefill",
        "decode",
        "59%",
        "mean time per timed iteration (ms)",
    ] {
        assert!(
            stages.iter().any(|t| t == label),
            "stages.svg lacks {label:?}: {stages:?}"
        );
    }
    assert!(has(&stages, "8.00 ms"), "fp32's stage total: {stages:?}");

    for name in ["latency_cdf.png", "memory.png", "stages.png"] {
        let bytes = std::fs::read(out.join(name)).unwrap();
        let img = edgevlm_runtime::preprocess::decode_image(&bytes, name).unwrap();
        assert_eq!((img.width, img.height), PLOT_SIZE, "{name}");
        let seen = colours(&img.data);
        assert!(seen.len() > 16, "{name}: {} colours", seen.len());
        // The first run's colour is drawn (lines, bars or legend swatches).
        assert!(
            seen.contains(&[0x4e, 0x79, 0xa7]),
            "{name} lacks the first colour"
        );
        assert!(
            seen.contains(&[0xf2, 0x8e, 0x2b]),
            "{name} lacks the second colour"
        );
    }
}

#[test]
fn plots_without_data_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = vision_run("fp32", 8_000, 204_800);
    run.id = 5;
    run.memory.clear();
    run.stages.clear();
    run.latencies_us.clear();
    let files = write_plots(&[run], dir.path()).unwrap();
    assert_eq!(files.len(), 6);
    let memory = std::fs::read_to_string(dir.path().join("memory.svg")).unwrap();
    assert!(memory.contains("no memory samples"), "{memory}");
    let cdf = std::fs::read_to_string(dir.path().join("latency_cdf.svg")).unwrap();
    assert!(cdf.contains("no per-iteration latencies"), "{cdf}");
    let png = std::fs::read(dir.path().join("stages.png")).unwrap();
    let img = edgevlm_runtime::preprocess::decode_image(&png, "stages.png").unwrap();
    assert!(colours(&img.data).len() > 2, "title and note are drawn");
}
