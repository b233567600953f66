//! Comparison tables of benchmark runs: Markdown for people (and pull requests), CSV for
//! spreadsheets, JSON for scripts.
//!
//! One row per run with what ML engineers weigh against each other: model size, load time,
//! first-run cost, latency percentiles, time to first token and token throughput for language
//! models, peak memory. Markdown also shows where the time goes (per-stage means and shares),
//! each run against the first one, and the slowest graph nodes when they were profiled.

use std::fmt::Write as _;

use serde::Serialize;

use crate::record::BenchRecord;

/// Output format of [`compare`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Aligned Markdown tables.
    Markdown,
    /// RFC 4180 CSV with a header row, one row per run.
    Csv,
    /// A JSON array of per-run summaries.
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Format, String> {
        match s.to_ascii_lowercase().as_str() {
            "md" | "markdown" => Ok(Format::Markdown),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            other => Err(format!(
                "unknown table format {other:?} (expected md, csv or json)"
            )),
        }
    }
}

/// The figures of one run that tables compare, in display units.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Run id in the results database.
    pub id: i64,
    /// Start, seconds since the Unix epoch.
    pub started_at: i64,
    /// [`BenchRecord::label`].
    pub label: String,
    /// Model name.
    pub model: String,
    /// Model version.
    pub version: String,
    /// Model variant, empty if none.
    pub variant: String,
    /// Model task.
    pub task: String,
    /// Installed package size, MB (10^6 bytes).
    pub size_mb: f64,
    /// Board inventory name.
    pub board: String,
    /// Board profile.
    pub profile: String,
    /// CPU architecture.
    pub arch: String,
    /// tract release on the board.
    pub tract_version: String,
    /// Intra-op threads.
    pub threads: u16,
    /// Timed iterations.
    pub iterations: u32,
    /// Model load and optimization, ms.
    pub load_ms: f64,
    /// Where that load read the model from: `onnx`, `cache`, `onnx-uncached` (empty for
    /// runs recorded before agents said).
    pub load_source: String,
    /// First iteration after load, ms.
    pub first_run_ms: f64,
    /// Mean latency, ms.
    pub mean_ms: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 90th percentile latency, ms.
    pub p90_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Slowest iteration, ms.
    pub max_ms: f64,
    /// Median time to first token, ms (language models only).
    pub ttft_ms: Option<f64>,
    /// Prefill throughput, prompt tokens/s (language models only).
    pub prefill_tok_s: Option<f64>,
    /// Decode throughput, tokens/s (language models only).
    pub decode_tok_s: Option<f64>,
    /// Peak resident set size, MiB.
    pub peak_rss_mib: f64,
    /// Peak proportional set size, MiB (`None` where the board does not report it).
    pub peak_pss_mib: Option<f64>,
    /// Trace events the agent dropped (stage and memory figures are incomplete if > 0).
    pub dropped_events: u32,
}

impl Summary {
    /// The summary of one run.
    pub fn of(r: &BenchRecord) -> Summary {
        let ms = |us: u64| us as f64 / 1000.0;
        let mib = |kib: u64| kib as f64 / 1024.0;
        Summary {
            id: r.id,
            started_at: r.started_at,
            label: r.label(),
            model: r.model.name.clone(),
            version: r.model.version.clone(),
            variant: r.model.variant.clone(),
            task: r.model.task.clone(),
            size_mb: r.model.bytes as f64 / 1e6,
            board: r.board.name.clone(),
            profile: r.board.profile.clone(),
            arch: r.board.arch.clone(),
            tract_version: r.board.tract_version.clone(),
            threads: r.settings.threads,
            iterations: r.iterations,
            load_ms: ms(r.load_us),
            load_source: r.load_source.clone(),
            first_run_ms: ms(r.first_run_us),
            mean_ms: ms(r.latency.mean_us),
            p50_ms: ms(r.latency.p50_us),
            p90_ms: ms(r.latency.p90_us),
            p99_ms: ms(r.latency.p99_us),
            max_ms: ms(r.latency.max_us),
            ttft_ms: r.tokens.map(|t| ms(t.ttft_p50_us)),
            prefill_tok_s: r.tokens.map(|t| t.prefill_tok_s),
            decode_tok_s: r.tokens.map(|t| t.decode_tok_s),
            peak_rss_mib: mib(r.peak_rss_kib),
            peak_pss_mib: (r.peak_pss_kib > 0).then(|| mib(r.peak_pss_kib)),
            dropped_events: r.dropped_events,
        }
    }
}

/// One table of runs in `format`. The first record is the baseline of the Markdown ratios.
pub fn compare(records: &[BenchRecord], format: Format) -> String {
    match format {
        Format::Markdown => markdown(records),
        Format::Csv => csv(records),
        Format::Json => json(records),
    }
}

const COLUMNS: [&str; 16] = [
    "run",
    "model",
    "variant",
    "size MB",
    "board",
    "threads",
    "load ms",
    "load from",
    "first run ms",
    "p50 ms",
    "p99 ms",
    "TTFT ms",
    "prefill tok/s",
    "decode tok/s",
    "peak RSS MiB",
    "PSS MiB",
];

/// Fixed precision for a figure: enough digits to tell runs apart, not more.
pub(crate) fn num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The main table's cells of one run; `missing` stands for a figure the run does not have.
fn cells(s: &Summary, missing: &str) -> [String; 16] {
    let opt = |v: Option<f64>| v.map(num).unwrap_or_else(|| missing.to_owned());
    [
        s.id.to_string(),
        format!("{} {}", s.model, s.version),
        if s.variant.is_empty() {
            missing.to_owned()
        } else {
            s.variant.clone()
        },
        num(s.size_mb),
        s.board.clone(),
        s.threads.to_string(),
        num(s.load_ms),
        if s.load_source.is_empty() {
            missing.to_owned()
        } else {
            s.load_source.clone()
        },
        num(s.first_run_ms),
        num(s.p50_ms),
        num(s.p99_ms),
        opt(s.ttft_ms),
        opt(s.prefill_tok_s),
        opt(s.decode_tok_s),
        num(s.peak_rss_mib),
        opt(s.peak_pss_mib),
    ]
}

/// Columns whose cells are text, left-aligned; the others are numbers, right-aligned.
fn is_text(column: usize) -> bool {
    matches!(column, 1 | 2 | 4 | 7)
}

/// An aligned Markdown table.
fn md_table(
    out: &mut String,
    header: &[String],
    rows: &[Vec<String>],
    text: impl Fn(usize) -> bool,
) {
    let width = |c: usize| {
        rows.iter()
            .map(|r| r[c].chars().count())
            .chain([header[c].chars().count(), 3])
            .max()
            .unwrap_or(3)
    };
    let widths: Vec<usize> = (0..header.len()).map(width).collect();
    let line = |out: &mut String, cells: &[String]| {
        out.push('|');
        for (c, cell) in cells.iter().enumerate() {
            let cell = md_escape(cell);
            let w = widths[c];
            if text(c) {
                let _ = write!(out, " {cell:<w$} |");
            } else {
                let _ = write!(out, " {cell:>w$} |");
            }
        }
        out.push('\n');
    };
    line(out, header);
    out.push('|');
    for (c, w) in widths.iter().enumerate() {
        if text(c) {
            let _ = write!(out, " {:-<w$} |", ":");
        } else {
            let _ = write!(out, " {:->w$} |", ":");
        }
    }
    out.push('\n');
    for row in rows {
        line(out, row);
    }
}

/// A `|` inside a cell would end it.
fn md_escape(cell: &str) -> String {
    cell.replace('|', "\\|")
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "-".into()
    }
}

fn markdown(records: &[BenchRecord]) -> String {
    let mut out = String::new();
    let summaries: Vec<Summary> = records.iter().map(Summary::of).collect();
    let header: Vec<String> = COLUMNS.iter().map(|c| c.to_string()).collect();
    let rows: Vec<Vec<String>> = summaries.iter().map(|s| cells(s, "-").to_vec()).collect();
    md_table(&mut out, &header, &rows, is_text);

    for s in summaries.iter().filter(|s| s.dropped_events > 0) {
        let _ = writeln!(
            out,
            "\n> run {} dropped {} trace events (slow link): its stage and memory figures are incomplete.",
            s.id, s.dropped_events
        );
    }

    if let [base, rest @ ..] = summaries.as_slice() {
        if !rest.is_empty() {
            let _ = writeln!(
                out,
                "\n### Against run {} ({}, baseline)\n\nBelow 1.00× is faster or smaller than the baseline.\n",
                base.id, base.label
            );
            let header: Vec<String> = ["run", "model", "size", "load", "p50", "p99", "peak RSS"]
                .iter()
                .map(|c| c.to_string())
                .collect();
            let rows: Vec<Vec<String>> = summaries
                .iter()
                .map(|s| {
                    vec![
                        s.id.to_string(),
                        s.label.clone(),
                        ratio(s.size_mb, base.size_mb),
                        ratio(s.load_ms, base.load_ms),
                        ratio(s.p50_ms, base.p50_ms),
                        ratio(s.p99_ms, base.p99_ms),
                        ratio(s.peak_rss_mib, base.peak_rss_mib),
                    ]
                })
                .collect();
            md_table(&mut out, &header, &rows, |c| c == 1);
        }
    }

    stage_table(&mut out, records);
    node_tables(&mut out, records);
    out
}

/// Stages as rows, runs as columns: `mean ms (share)`.
fn stage_table(out: &mut String, records: &[BenchRecord]) {
    let mut stages: Vec<&str> = Vec::new();
    for r in records {
        for s in &r.stages {
            if !stages.contains(&s.stage.as_str()) {
                stages.push(&s.stage);
            }
        }
    }
    if stages.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n### Stages (mean ms per timed iteration, share of the run's stage time)\n"
    );
    let mut header = vec!["stage".to_string()];
    header.extend(records.iter().map(|r| format!("#{} {}", r.id, r.label())));
    let mut rows: Vec<Vec<String>> =
        stages
            .iter()
            .map(|&stage| {
                let mut row = vec![stage.to_string()];
                row.extend(records.iter().map(
                    |r| match r.stages.iter().find(|s| s.stage == stage) {
                        Some(s) => format!("{} ({:.0}%)", num(s.mean_us / 1000.0), s.share * 100.0),
                        None => "-".into(),
                    },
                ));
                row
            })
            .collect();
    let mut total = vec!["total".to_string()];
    total.extend(records.iter().map(|r| {
        if r.stages.is_empty() {
            "-".into()
        } else {
            num(r.stages.iter().map(|s| s.mean_us).sum::<f64>() / 1000.0)
        }
    }));
    rows.push(total);
    md_table(out, &header, &rows, |c| c == 0);
}

/// The slowest nodes of each profiled run.
fn node_tables(out: &mut String, records: &[BenchRecord]) {
    const TOP: usize = 5;
    for r in records.iter().filter(|r| !r.nodes.is_empty()) {
        let _ = writeln!(out, "\n### Slowest nodes of run {} ({})\n", r.id, r.label());
        let header: Vec<String> = ["graph", "node", "op", "mean ms", "share"]
            .iter()
            .map(|c| c.to_string())
            .collect();
        let rows: Vec<Vec<String>> = r
            .nodes
            .iter()
            .take(TOP)
            .map(|n| {
                vec![
                    n.graph.clone(),
                    n.node.clone(),
                    n.op.clone(),
                    num(n.mean_us / 1000.0),
                    format!("{:.1}%", n.share * 100.0),
                ]
            })
            .collect();
        md_table(out, &header, &rows, |c| c < 3);
    }
}

/// RFC 4180: quote a field holding a comma, quote, CR or LF (or edge spaces), doubling quotes.
fn csv_field(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) || field.starts_with(' ') || field.ends_with(' ') {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_owned()
    }
}

fn csv(records: &[BenchRecord]) -> String {
    let header = [
        "run",
        "model",
        "version",
        "variant",
        "size_mb",
        "board",
        "threads",
        "iterations",
        "load_ms",
        "load_source",
        "first_run_ms",
        "mean_ms",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "max_ms",
        "ttft_ms",
        "prefill_tok_s",
        "decode_tok_s",
        "peak_rss_mib",
        "peak_pss_mib",
        "dropped_events",
    ];
    let mut out = header.join(",");
    out.push_str("\r\n");
    // Full precision and empty cells for missing figures: spreadsheets do the rounding.
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_default();
    for s in records.iter().map(Summary::of) {
        let row = [
            s.id.to_string(),
            s.model,
            s.version,
            s.variant,
            format!("{:.3}", s.size_mb),
            s.board,
            s.threads.to_string(),
            s.iterations.to_string(),
            format!("{:.3}", s.load_ms),
            s.load_source,
            format!("{:.3}", s.first_run_ms),
            format!("{:.3}", s.mean_ms),
            format!("{:.3}", s.p50_ms),
            format!("{:.3}", s.p90_ms),
            format!("{:.3}", s.p99_ms),
            format!("{:.3}", s.max_ms),
            opt(s.ttft_ms),
            opt(s.prefill_tok_s),
            opt(s.decode_tok_s),
            format!("{:.3}", s.peak_rss_mib),
            opt(s.peak_pss_mib),
            s.dropped_events.to_string(),
        ];
        let row: Vec<String> = row.iter().map(|f| csv_field(f)).collect();
        out.push_str(&row.join(","));
        out.push_str("\r\n");
    }
    out
}

/// A stage of a run in the JSON summary.
#[derive(Serialize)]
struct StageSummary<'a> {
    stage: &'a str,
    mean_ms: f64,
    share: f64,
}

#[derive(Serialize)]
struct JsonRun<'a> {
    #[serde(flatten)]
    summary: Summary,
    stages: Vec<StageSummary<'a>>,
}

fn json(records: &[BenchRecord]) -> String {
    let runs: Vec<JsonRun> = records
        .iter()
        .map(|r| JsonRun {
            summary: Summary::of(r),
            stages: r
                .stages
                .iter()
                .map(|s| StageSummary {
                    stage: &s.stage,
                    mean_ms: s.mean_us / 1000.0,
                    share: s.share,
                })
                .collect(),
        })
        .collect();
    // Serializing plain structs of strings and finite numbers cannot fail; NaN becomes null.
    let mut text = serde_json::to_string_pretty(&runs).unwrap_or_else(|_| "[]".into());
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_only_when_needed() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_field(" pad"), "\" pad\"");
    }

    #[test]
    fn numbers_keep_three_significant_digits_or_more() {
        assert_eq!(num(1234.56), "1235");
        assert_eq!(num(12.345), "12.3");
        assert_eq!(num(1.2345), "1.23");
        assert_eq!(num(0.0), "0.00");
    }

    #[test]
    fn format_names() {
        assert_eq!("md".parse::<Format>(), Ok(Format::Markdown));
        assert_eq!("CSV".parse::<Format>(), Ok(Format::Csv));
        assert_eq!("json".parse::<Format>(), Ok(Format::Json));
        assert!("xml"
            .parse::<Format>()
            .unwrap_err()
            .contains("md, csv or json"));
    }
}
