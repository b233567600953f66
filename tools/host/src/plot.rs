//! Comparison plots of benchmark runs, each as SVG (for reports and pull requests) and PNG (for
//! chat and issue trackers):
//!
//! - `latency_cdf`: empirical CDF of every timed iteration's latency, one line per run.
//! - `memory`: RSS over the run, one line per run (PSS dashed in the same colour when reported).
//! - `stages`: where an iteration's time goes, one stacked bar per run.
//!
//! Text is drawn with a TrueType font found on the system at run time (`EDGEVLM_FONT`, then
//! DejaVu Sans, then `fc-match sans`, then common paths); no font is shipped.
//!
//! plotters' ab_glyph renderer (0.3.7) drops each glyph's left side bearing, which makes PNG
//! text visibly uneven ("1 32.01 ms"). So this module draws all text itself: SVG text as whole
//! strings (the viewer lays them out), PNG text glyph by glyph at positions computed from the
//! font's own metrics (`hmtx` advances and bearings).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::ranged1d::{BoldPoints, Ranged};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::record::BenchRecord;
use crate::report::num;

/// Width and height of every plot, pixels (SVG user units).
pub const PLOT_SIZE: (u32, u32) = (1280, 720);

/// The environment variable naming a `.ttf` / `.otf` file to draw text with.
pub const FONT_ENV: &str = "EDGEVLM_FONT";

/// Width of the legend column on the right.
const LEGEND_WIDTH: u32 = 380;
/// Height of the title band.
const TITLE_HEIGHT: u32 = 52;
/// Axis tick labels asked of plotters (it picks round values up to this many).
const TICKS: usize = 10;

/// Why plots could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// No usable font for the plot text.
    #[error(
        "no TrueType font for plot text (tried {tried}): install fonts-dejavu-core \
         (Debian/Ubuntu; dejavu-sans-fonts on Fedora) or set {FONT_ENV} to a .ttf file"
    )]
    NoFont {
        /// The files tried, with why each failed.
        tried: String,
    },
    /// The output folder could not be created.
    #[error("creating plot folder {dir}: {source}")]
    CreateDir {
        /// The folder.
        dir: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Drawing failed.
    #[error("drawing {path}: {message}")]
    Draw {
        /// The plot file.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// PNG encoding failed.
    #[error("encoding {path}: {source}")]
    Encode {
        /// The plot file.
        path: PathBuf,
        /// Cause.
        source: edgevlm_runtime::Error,
    },
    /// Writing a plot file failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The plot file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// Writes `latency_cdf`, `memory` and `stages` as `.svg` and `.png` into `dir` (created if
/// needed) and returns the files written. A plot whose data no run has (memory samples of an
/// untraced run, say) is still written, with a note saying what is missing.
pub fn write_plots(records: &[BenchRecord], dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    let font = font()?;
    std::fs::create_dir_all(dir).map_err(|source| PlotError::CreateDir {
        dir: dir.to_owned(),
        source,
    })?;
    let runs = run_styles(records);
    let mut written = Vec::new();
    for kind in [Kind::LatencyCdf, Kind::Memory, Kind::Stages] {
        let svg_path = dir.join(format!("{}.svg", kind.file_stem()));
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, PLOT_SIZE).into_drawing_area();
            draw(kind, &runs, &root, Pen { glyphs: None })
                .and_then(|()| root.present())
                .map_err(|e| PlotError::Draw {
                    path: svg_path.clone(),
                    message: e.to_string(),
                })?;
        }
        write(&svg_path, without_empty_text(&svg).as_bytes())?;
        written.push(svg_path);

        let png_path = dir.join(format!("{}.png", kind.file_stem()));
        let (w, h) = PLOT_SIZE;
        let mut rgb = vec![0u8; w as usize * h as usize * 3];
        {
            let root = BitMapBackend::with_buffer(&mut rgb, PLOT_SIZE).into_drawing_area();
            draw(kind, &runs, &root, Pen::bitmap(font))
                .and_then(|()| root.present())
                .map_err(|e| PlotError::Draw {
                    path: png_path.clone(),
                    message: e.to_string(),
                })?;
        }
        let image = edgevlm_runtime::RgbImage {
            width: w,
            height: h,
            data: rgb,
        };
        let png = edgevlm_runtime::preprocess::encode_png(&image).map_err(|source| {
            PlotError::Encode {
                path: png_path.clone(),
                source,
            }
        })?;
        write(&png_path, &png)?;
        written.push(png_path);
    }
    Ok(written)
}

/// The SVG without the empty `<text>` elements plotters writes for the axis labels this module
/// draws itself.
fn without_empty_text(svg: &str) -> String {
    let mut out = String::with_capacity(svg.len());
    let mut rest = svg;
    while let Some(start) = rest.find("<text") {
        let Some(end) = rest[start..]
            .find("</text>")
            .map(|e| start + e + "</text>".len())
        else {
            break;
        };
        let element = &rest[start..end];
        let body = element
            .find('>')
            .map(|gt| &element[gt + 1..element.len() - "</text>".len()]);
        out.push_str(&rest[..start]);
        if body.is_some_and(|b| !b.trim().is_empty()) {
            out.push_str(element);
        } else if rest[end..].starts_with('\n') {
            rest = &rest[end + 1..];
            continue;
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), PlotError> {
    std::fs::write(path, bytes).map_err(|source| PlotError::Write {
        path: path.to_owned(),
        source,
    })
}

// ---------------------------------------------------------------------------------------------
// Font

/// The font plots draw with, registered with plotters as `sans-serif`.
struct Font {
    path: PathBuf,
    /// `None` when the file's tables could not be read: PNG text then falls back to plotters'
    /// own layout.
    metrics: Option<Metrics>,
}

/// The font file plots draw text with, found and registered with plotters on first use.
pub fn font_file() -> Result<&'static Path, PlotError> {
    font().map(|f| f.path.as_path())
}

fn font() -> Result<&'static Font, PlotError> {
    static FONT: OnceLock<Result<Font, String>> = OnceLock::new();
    match FONT.get_or_init(|| register_first_font(&font_candidates())) {
        Ok(font) => Ok(font),
        Err(tried) => Err(PlotError::NoFont {
            tried: tried.clone(),
        }),
    }
}

fn font_candidates() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(p) = std::env::var_os(FONT_ENV).filter(|p| !p.is_empty()) {
        paths.push(PathBuf::from(p));
    }
    paths.push("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf".into());
    if let Ok(out) = std::process::Command::new("fc-match")
        .args(["-f", "%{file}", "sans"])
        .stderr(std::process::Stdio::null())
        .output()
    {
        let file = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() && !file.is_empty() {
            paths.push(file.into());
        }
    }
    for p in [
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
        "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
        "/usr/share/fonts/noto/NotoSans-Regular.ttf",
        "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
        "/System/Library/Fonts/Supplemental/Arial.ttf",
        "/Library/Fonts/Arial.ttf",
    ] {
        paths.push(p.into());
    }
    let mut seen = std::collections::HashSet::new();
    paths.retain(|p| seen.insert(p.clone()));
    paths
}

/// Registers the first candidate that is a readable font; the error lists what was tried.
fn register_first_font(candidates: &[PathBuf]) -> Result<Font, String> {
    let mut tried = Vec::new();
    for path in candidates {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                tried.push(format!("{}: {}", path.display(), e.kind()));
                continue;
            }
        };
        // plotters keeps fonts for the life of the process; this happens once per process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        match plotters::style::register_font("sans-serif", FontStyle::Normal, bytes) {
            Ok(()) => {
                return Ok(Font {
                    path: path.clone(),
                    metrics: Metrics::parse(bytes),
                })
            }
            Err(_) => tried.push(format!("{}: not a TrueType/OpenType font", path.display())),
        }
    }
    Err(tried.join("; "))
}

/// Horizontal glyph metrics read from a TrueType/OpenType file (`cmap`, `hhea`, `hmtx`,
/// `OS/2`): enough to place glyphs the way a text renderer would.
struct Metrics {
    data: &'static [u8],
    /// Offset and format (4 or 12) of the Unicode `cmap` subtable.
    cmap: (usize, u16),
    hmtx: usize,
    long_metrics: usize,
    /// Ascender minus descender in font units: ab_glyph scales a font so this is the pixel size.
    height: f32,
}

fn be_u16(d: &[u8], at: usize) -> Option<u16> {
    d.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

fn be_i16(d: &[u8], at: usize) -> Option<i16> {
    be_u16(d, at).map(|v| v as i16)
}

fn be_u32(d: &[u8], at: usize) -> Option<u32> {
    d.get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

impl Metrics {
    fn parse(data: &'static [u8]) -> Option<Metrics> {
        // A collection (.ttc): its first font.
        let base = if data.get(0..4)? == b"ttcf" {
            be_u32(data, 12)? as usize
        } else {
            0
        };
        let tables = be_u16(data, base + 4)? as usize;
        let table = |tag: &[u8; 4]| {
            (0..tables).find_map(|i| {
                let record = base + 12 + 16 * i;
                (data.get(record..record + 4)? == tag)
                    .then(|| be_u32(data, record + 8))
                    .flatten()
                    .map(|o| o as usize)
            })
        };
        let hhea = table(b"hhea")?;
        let (mut ascender, mut descender) = (be_i16(data, hhea + 4)?, be_i16(data, hhea + 6)?);
        // The same choice as ttf-parser, which ab_glyph scales with.
        if let Some(os2) = table(b"OS/2") {
            let use_typo = be_u16(data, os2 + 62).is_some_and(|f| f & 0x80 != 0);
            if use_typo || (ascender == 0 && descender == 0) {
                ascender = be_i16(data, os2 + 68)?;
                descender = be_i16(data, os2 + 70)?;
            }
        }
        let height = f32::from(ascender) - f32::from(descender);
        if height <= 0.0 {
            return None;
        }
        let cmap = table(b"cmap")?;
        let mut best: Option<(u8, usize, u16)> = None;
        for i in 0..be_u16(data, cmap + 2)? as usize {
            let record = cmap + 4 + 8 * i;
            let platform = be_u16(data, record)?;
            let encoding = be_u16(data, record + 2)?;
            let sub = cmap + be_u32(data, record + 4)? as usize;
            let format = be_u16(data, sub)?;
            let unicode = platform == 0 || (platform == 3 && matches!(encoding, 1 | 10));
            let rank = match format {
                12 if unicode => 2,
                4 if unicode => 1,
                _ => continue,
            };
            if best.is_none_or(|(r, _, _)| rank > r) {
                best = Some((rank, sub, format));
            }
        }
        let (_, sub, format) = best?;
        let metrics = Metrics {
            data,
            cmap: (sub, format),
            hmtx: table(b"hmtx")?,
            long_metrics: be_u16(data, hhea + 34)? as usize,
            height,
        };
        // Fonts whose tables we misread would place text worse than plotters: check a glyph.
        metrics.glyph('H').filter(|&(advance, _)| advance > 0)?;
        Some(metrics)
    }

    fn glyph_id(&self, c: char) -> Option<u16> {
        let d = self.data;
        let c = c as u32;
        let (sub, format) = self.cmap;
        let id = if format == 4 {
            if c > 0xffff {
                return None;
            }
            let seg_x2 = be_u16(d, sub + 6)? as usize;
            let ends = sub + 14;
            let starts = ends + seg_x2 + 2;
            let deltas = starts + seg_x2;
            let ranges = deltas + seg_x2;
            let seg = (0..seg_x2 / 2)
                .find(|&i| be_u16(d, ends + 2 * i).is_some_and(|e| c <= u32::from(e)))?;
            let start = u32::from(be_u16(d, starts + 2 * seg)?);
            if c < start {
                return None;
            }
            let delta = be_u16(d, deltas + 2 * seg)?;
            let range = be_u16(d, ranges + 2 * seg)? as usize;
            if range == 0 {
                (c as u16).wrapping_add(delta)
            } else {
                let at = ranges + 2 * seg + range + 2 * (c - start) as usize;
                match be_u16(d, at)? {
                    0 => 0,
                    g => g.wrapping_add(delta),
                }
            }
        } else {
            let groups = be_u32(d, sub + 12)? as usize;
            let group = (0..groups).map(|i| sub + 16 + 12 * i).find(|&g| {
                be_u32(d, g).is_some_and(|s| s <= c) && be_u32(d, g + 4).is_some_and(|e| c <= e)
            })?;
            (be_u32(d, group + 8)? + (c - be_u32(d, group)?)) as u16
        };
        (id != 0).then_some(id)
    }

    /// Advance width and left side bearing of `c`, font units.
    fn glyph(&self, c: char) -> Option<(u16, i16)> {
        let id = self.glyph_id(c)? as usize;
        let d = self.data;
        let last = self.long_metrics.checked_sub(1)?;
        let advance = be_u16(d, self.hmtx + 4 * id.min(last))?;
        let lsb = if id < self.long_metrics {
            be_i16(d, self.hmtx + 4 * id + 2)?
        } else {
            be_i16(
                d,
                self.hmtx + 4 * self.long_metrics + 2 * (id - self.long_metrics),
            )?
        };
        Some((advance, lsb))
    }
}

// ---------------------------------------------------------------------------------------------
// Text

/// Draws text: whole strings for SVG, glyph by glyph for bitmaps.
#[derive(Clone, Copy)]
struct Pen {
    glyphs: Option<&'static Metrics>,
}

impl Pen {
    fn bitmap(font: &'static Font) -> Pen {
        Pen {
            glyphs: font.metrics.as_ref(),
        }
    }

    /// Width of `text`, pixels.
    fn width<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        text: &str,
        style: &TextStyle<'_>,
    ) -> i32 {
        match self.glyphs {
            Some(m) => self.advances(area, m, text, style).1.round() as i32,
            None => area
                .estimate_text_size(text, style)
                .map(|(w, _)| w as i32)
                .unwrap_or(0),
        }
    }

    /// Pen positions (and left side bearings), pixels, of each char, and the total advance.
    fn advances<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        m: &Metrics,
        text: &str,
        style: &TextStyle<'_>,
    ) -> (Vec<(char, f32, f32)>, f32) {
        let scale = style.font.get_size() as f32 / m.height;
        let mut x = 0f32;
        let mut out = Vec::with_capacity(text.len());
        for c in text.chars() {
            let (advance, lsb) = match m.glyph(c) {
                Some((a, l)) => (f32::from(a) * scale, f32::from(l) * scale),
                // Not in the cmap: plotters draws its fallback glyph; use its width.
                None => (
                    area.estimate_text_size(&c.to_string(), style)
                        .map(|(w, _)| w as f32)
                        .unwrap_or(0.0),
                    0.0,
                ),
            };
            out.push((c, x, lsb));
            x += advance;
        }
        (out, x)
    }

    fn text<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        text: &str,
        (x, y): (i32, i32),
        style: &TextStyle<'_>,
    ) -> DrawResult<DB> {
        let Some(m) = self.glyphs else {
            return area.draw(&Text::new(text.to_owned(), (x, y), style.clone()));
        };
        let (glyphs, width) = self.advances(area, m, text, style);
        let left = x as f32
            - match style.pos.h_pos {
                HPos::Left => 0.0,
                HPos::Center => width / 2.0,
                HPos::Right => width,
            };
        let glyph_style = style.pos(Pos::new(HPos::Left, style.pos.v_pos));
        for (c, at, lsb) in glyphs {
            if c.is_whitespace() {
                continue;
            }
            // plotters puts the glyph's ink box (whose sub-pixel offset it keeps) at the
            // position: give it the origin plus the whole pixels of the bearing it drops.
            let gx = (left + at).round() as i32 + lsb.floor() as i32;
            area.draw(&Text::new(c.to_string(), (gx, y), glyph_style.clone()))?;
        }
        Ok(())
    }

    /// `text`, shortened to fit `max` pixels by an ellipsis in the middle: run labels differ
    /// at their ends (`#12 ... int8 · 4 threads`), long model names in between.
    fn fit<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        text: &str,
        style: &TextStyle<'_>,
        max: i32,
    ) -> String {
        if self.width(area, text, style) <= max {
            return text.to_owned();
        }
        let chars: Vec<char> = text.chars().collect();
        // Keep slightly more of the end, where variants and settings are.
        for keep in (1..chars.len()).rev() {
            let tail = keep.div_ceil(2) + keep / 6;
            let head = keep.saturating_sub(tail);
            let candidate: String = chars[..head]
                .iter()
                .chain(&['…'])
                .chain(&chars[chars.len() - (keep - head)..])
                .collect();
            if self.width(area, &candidate, style) <= max {
                return candidate;
            }
        }
        "…".into()
    }
}

// ---------------------------------------------------------------------------------------------
// Drawing

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    LatencyCdf,
    Memory,
    Stages,
}

impl Kind {
    fn file_stem(self) -> &'static str {
        match self {
            Kind::LatencyCdf => "latency_cdf",
            Kind::Memory => "memory",
            Kind::Stages => "stages",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Kind::LatencyCdf => "Latency distribution (timed iterations)",
            Kind::Memory => "Memory during the run",
            Kind::Stages => "Where an iteration's time goes (mean per stage)",
        }
    }
}

/// Tableau 10, reordered so the first colours are the most distinct; yellow last.
const PALETTE: [RGBColor; 10] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0x9c, 0x75, 0x5f),
    RGBColor(0xff, 0x9d, 0xa7),
    RGBColor(0xba, 0xb0, 0xac),
    RGBColor(0xed, 0xc9, 0x48),
];

const INK: RGBColor = RGBColor(0x22, 0x22, 0x22);
const MUTED: RGBColor = RGBColor(0x6b, 0x6b, 0x6b);
const GRID_LIGHT: RGBColor = RGBColor(0xf0, 0xf0, 0xf0);
const GRID_BOLD: RGBColor = RGBColor(0xdc, 0xdc, 0xdc);

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

fn text_style(size: u32) -> TextStyle<'static> {
    ("sans-serif", size).into_font().color(&INK)
}

/// A run with its legend name and colour.
struct RunStyle<'a> {
    record: &'a BenchRecord,
    name: String,
    color: RGBColor,
}

/// Legend names are `#id label`, plus the board and thread count when those differ between
/// the runs (otherwise they would add noise to every entry).
fn run_styles(records: &[BenchRecord]) -> Vec<RunStyle<'_>> {
    let differ =
        |f: &dyn Fn(&BenchRecord) -> String| records.windows(2).any(|w| f(&w[0]) != f(&w[1]));
    let boards = differ(&|r| r.board.name.clone());
    let threads = differ(&|r| r.settings.threads.to_string());
    records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut name = format!("#{} {}", r.id, r.label());
            if boards {
                name += &format!(" · {}", r.board.name);
            }
            if threads {
                name += &format!(
                    " · {} thread{}",
                    r.settings.threads,
                    if r.settings.threads == 1 { "" } else { "s" }
                );
            }
            RunStyle {
                record: r,
                name,
                color: color(i),
            }
        })
        .collect()
}

enum Sample {
    Line,
    Dashed,
    Box,
}

struct LegendEntry {
    text: String,
    /// A second, smaller line (empty for none).
    detail: String,
    color: RGBColor,
    sample: Sample,
}

fn draw<DB: DrawingBackend>(
    kind: Kind,
    runs: &[RunStyle<'_>],
    root: &DrawingArea<DB, Shift>,
    pen: Pen,
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    pen.text(
        root,
        kind.title(),
        (PLOT_SIZE.0 as i32 / 2, TITLE_HEIGHT as i32 / 2 + 2),
        &text_style(24).pos(Pos::new(HPos::Center, VPos::Center)),
    )?;
    let (_, body) = root.split_vertically(TITLE_HEIGHT);
    let (plot, legend_area) = body.split_horizontally(PLOT_SIZE.0 - LEGEND_WIDTH);
    let (legend_title, entries) = match kind {
        Kind::LatencyCdf => ("Runs", draw_cdf(root, &plot, runs, pen)?),
        Kind::Memory => ("Runs", draw_memory(root, &plot, runs, pen)?),
        Kind::Stages => ("Stages", draw_stages(root, &plot, runs, pen)?),
    };
    draw_legend(&legend_area, legend_title, &entries, pen)
}

/// A note in the middle of an empty plot.
fn draw_note<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    note: &str,
    pen: Pen,
) -> DrawResult<DB> {
    let (w, h) = area.dim_in_pixel();
    pen.text(
        area,
        note,
        (w as i32 / 2, h as i32 / 2),
        &text_style(18)
            .color(&MUTED)
            .pos(Pos::new(HPos::Center, VPos::Center)),
    )
}

fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    entries: &[LegendEntry],
    pen: Pen,
) -> DrawResult<DB> {
    if entries.is_empty() {
        return Ok(());
    }
    const ROW: i32 = 28;
    const DETAIL: i32 = 18;
    const TOP: i32 = 20;
    let (width, height) = area.dim_in_pixel();
    pen.text(
        area,
        title,
        (12, TOP),
        &text_style(17).pos(Pos::new(HPos::Left, VPos::Center)),
    )?;
    let max_text = width as i32 - 60 - 20;
    let style = text_style(15).pos(Pos::new(HPos::Left, VPos::Center));
    let detail_style = text_style(13)
        .color(&MUTED)
        .pos(Pos::new(HPos::Left, VPos::Center));
    let bottom = height as i32 - ROW;
    let mut y = TOP + ROW;
    for (i, e) in entries.iter().enumerate() {
        let needed = if e.detail.is_empty() { 0 } else { DETAIL };
        // Keep a row for the "... more" line unless this is the last entry.
        let last = i + 1 == entries.len();
        if y + needed > bottom || (!last && y + needed + ROW > bottom) {
            pen.text(
                area,
                &format!("… and {} more", entries.len() - i),
                (60, y),
                &style.color(&MUTED),
            )?;
            break;
        }
        match e.sample {
            Sample::Line => area.draw(&PathElement::new(
                vec![(12, y), (48, y)],
                e.color.stroke_width(3),
            ))?,
            Sample::Dashed => {
                for x in [12, 26, 40] {
                    area.draw(&PathElement::new(
                        vec![(x, y), (x + 8, y)],
                        e.color.stroke_width(3),
                    ))?;
                }
            }
            Sample::Box => area.draw(&Rectangle::new(
                [(12, y - 8), (48, y + 8)],
                e.color.filled(),
            ))?,
        }
        pen.text(
            area,
            &pen.fit(area, &e.text, &style, max_text),
            (60, y),
            &style,
        )?;
        if !e.detail.is_empty() {
            let detail = pen.fit(area, &e.detail, &detail_style, max_text);
            pen.text(area, &detail, (60, y + DETAIL), &detail_style)?;
        }
        y += ROW + needed;
    }
    Ok(())
}

/// A 2-D chart with plotters' grid and axes but this module's text.
type Chart<'a, DB> = ChartContext<
    'a,
    DB,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// Margins and label space shared by the charts.
fn chart<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
    y_label_width: u32,
) -> Result<Chart<'a, DB>, DrawingAreaErrorKind<DB::ErrorType>> {
    ChartBuilder::on(area)
        .margin_top(34)
        .margin_left(12)
        .margin_right(28)
        .margin_bottom(8)
        .x_label_area_size(58)
        .y_label_area_size(y_label_width)
        .build_cartesian_2d(x, y)
}

/// Tick labels with as many decimals as the ticks need (all of them the same).
fn tick_labels(values: &[f64], factor: f64) -> Vec<String> {
    let scaled: Vec<f64> = values.iter().map(|v| v * factor).collect();
    let decimals = (0..4)
        .find(|&d| {
            let p = 10f64.powi(d);
            scaled
                .iter()
                .all(|v| ((v * p).round() - v * p).abs() < 1e-6 * p.max(v.abs()))
        })
        .unwrap_or(4) as usize;
    scaled.iter().map(|v| format!("{v:.decimals$}")).collect()
}

/// Grid, axes, tick labels and axis titles: x below, y above the axis, horizontal so it reads
/// easily. `y_factor` scales the y tick labels (100 for percent); `None` leaves y unlabelled.
fn axes<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    chart: &mut Chart<'_, DB>,
    pen: Pen,
    (x_desc, y_desc): (&str, &str),
    y_factor: Option<f64>,
) -> DrawResult<DB> {
    let mut mesh = chart.configure_mesh();
    mesh.x_labels(TICKS)
        .y_labels(if y_factor.is_some() { TICKS } else { 0 })
        .x_label_formatter(&|_| String::new())
        .y_label_formatter(&|_| String::new())
        .max_light_lines(4)
        .light_line_style(GRID_LIGHT)
        .bold_line_style(GRID_BOLD)
        .axis_style(MUTED);
    if y_factor.is_none() {
        mesh.disable_y_mesh();
    }
    mesh.draw()?;
    let (xs, ys) = chart.plotting_area().get_pixel_range();
    let labels = text_style(14).color(&INK);
    let y0 = chart.y_range().start;
    let xs_ticks = chart.as_coord_spec().x_spec().key_points(BoldPoints(TICKS));
    for (&v, label) in xs_ticks.iter().zip(tick_labels(&xs_ticks, 1.0)) {
        let (px, _) = chart.backend_coord(&(v, y0));
        pen.text(
            root,
            &label,
            (px, ys.end + 10),
            &labels.pos(Pos::new(HPos::Center, VPos::Top)),
        )?;
    }
    if let Some(factor) = y_factor {
        let x0 = chart.x_range().start;
        let ys_ticks = chart.as_coord_spec().y_spec().key_points(BoldPoints(TICKS));
        for (&v, label) in ys_ticks.iter().zip(tick_labels(&ys_ticks, factor)) {
            let (_, py) = chart.backend_coord(&(x0, v));
            pen.text(
                root,
                &label,
                (xs.start - 12, py),
                &labels.pos(Pos::new(HPos::Right, VPos::Center)),
            )?;
        }
    }
    let desc = text_style(16).color(&INK);
    pen.text(
        root,
        x_desc,
        ((xs.start + xs.end) / 2, ys.end + 36),
        &desc.pos(Pos::new(HPos::Center, VPos::Top)),
    )?;
    if !y_desc.is_empty() {
        pen.text(
            root,
            y_desc,
            (xs.start - 8, ys.start - 14),
            &desc.pos(Pos::new(HPos::Left, VPos::Bottom)),
        )?;
    }
    Ok(())
}

fn draw_cdf<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    area: &DrawingArea<DB, Shift>,
    runs: &[RunStyle<'_>],
    pen: Pen,
) -> Result<Vec<LegendEntry>, DrawingAreaErrorKind<DB::ErrorType>> {
    let sorted: Vec<Vec<u64>> = runs
        .iter()
        .map(|r| {
            let mut v = r.record.latencies_us.clone();
            v.sort_unstable();
            v
        })
        .collect();
    let ms = |us: u64| us as f64 / 1000.0;
    let lo = sorted.iter().filter_map(|v| v.first()).min().copied();
    let hi = sorted.iter().filter_map(|v| v.last()).max().copied();
    let (Some(lo), Some(hi)) = (lo.map(ms), hi.map(ms)) else {
        draw_note(area, "no per-iteration latencies in these runs", pen)?;
        return Ok(Vec::new());
    };
    let pad = ((hi - lo) * 0.04).max(hi * 0.01).max(0.001);
    let (x0, x1) = ((lo - pad).max(0.0), hi + pad);
    let mut chart = chart(area, x0..x1, 0f64..1.02, 64)?;
    axes(
        root,
        &mut chart,
        pen,
        ("latency (ms)", "iterations at or below (%)"),
        Some(100.0),
    )?;
    // p50 and p99 guides, labelled at the right end.
    let (xs, _) = chart.plotting_area().get_pixel_range();
    for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
        chart.draw_series(DashedLineSeries::new(
            [(x0, q), (x1, q)],
            6,
            6,
            MUTED.stroke_width(1),
        ))?;
        let (_, py) = chart.backend_coord(&(x1, q));
        pen.text(
            root,
            name,
            (xs.end - 4, py - 3),
            &text_style(13)
                .color(&MUTED)
                .pos(Pos::new(HPos::Right, VPos::Bottom)),
        )?;
    }
    let mut entries = Vec::new();
    for (run, values) in runs.iter().zip(&sorted) {
        if values.is_empty() {
            entries.push(LegendEntry {
                text: run.name.clone(),
                detail: "no per-iteration latencies".into(),
                color: run.color,
                sample: Sample::Dashed,
            });
            continue;
        }
        // A step function: the fraction jumps at each observed latency.
        let n = values.len() as f64;
        let mut points = Vec::with_capacity(values.len() * 2 + 1);
        points.push((ms(values[0]), 0.0));
        for (i, &v) in values.iter().enumerate() {
            points.push((ms(v), i as f64 / n));
            points.push((ms(v), (i + 1) as f64 / n));
        }
        chart.draw_series(LineSeries::new(points, run.color.stroke_width(2)))?;
        let p50 = crate::record::percentile(values, 50.0);
        entries.push(LegendEntry {
            text: run.name.clone(),
            detail: format!(
                "p50 {} ms, p99 {} ms",
                num(ms(p50)),
                num(ms(crate::record::percentile(values, 99.0)))
            ),
            color: run.color,
            sample: Sample::Line,
        });
    }
    Ok(entries)
}

fn draw_memory<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    area: &DrawingArea<DB, Shift>,
    runs: &[RunStyle<'_>],
    pen: Pen,
) -> Result<Vec<LegendEntry>, DrawingAreaErrorKind<DB::ErrorType>> {
    if runs.iter().all(|r| r.record.memory.is_empty()) {
        draw_note(
            area,
            "no memory samples in these runs (bench samples memory when tracing is on)",
            pen,
        )?;
        return Ok(Vec::new());
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let at = |p: &crate::record::MemoryPoint| p.t_us as f64 / 1000.0;
    let points = runs.iter().flat_map(|r| r.record.memory.iter());
    let (t_max, m_max) = points.fold((0f64, 0f64), |(t, m), p| {
        (t.max(at(p)), m.max(mib(p.rss_kib.max(p.pss_kib))))
    });
    let t_max = t_max.max(1.0);
    let m_max = (m_max * 1.08).max(1.0);
    let mut chart = chart(area, 0f64..t_max, 0f64..m_max, 64)?;
    axes(
        root,
        &mut chart,
        pen,
        ("time since the run started (ms)", "memory (MiB)"),
        Some(1.0),
    )?;
    let mut entries = Vec::new();
    for run in runs {
        let memory = &run.record.memory;
        if memory.is_empty() {
            entries.push(LegendEntry {
                text: run.name.clone(),
                detail: "no memory samples".into(),
                color: run.color,
                sample: Sample::Box,
            });
            continue;
        }
        // A single sample draws nothing as a line: mark it.
        if memory.len() == 1 {
            chart.draw_series(
                memory
                    .iter()
                    .map(|p| Circle::new((at(p), mib(p.rss_kib)), 4, run.color.filled())),
            )?;
        }
        chart.draw_series(LineSeries::new(
            memory.iter().map(|p| (at(p), mib(p.rss_kib))),
            run.color.stroke_width(2),
        ))?;
        let peak = memory.iter().map(|p| p.rss_kib).max().unwrap_or(0);
        entries.push(LegendEntry {
            text: format!("{} RSS", run.name),
            detail: format!("peak {} MiB", num(mib(peak))),
            color: run.color,
            sample: Sample::Line,
        });
        if memory.iter().any(|p| p.pss_kib > 0) {
            chart.draw_series(DashedLineSeries::new(
                memory
                    .iter()
                    .filter(|p| p.pss_kib > 0)
                    .map(|p| (at(p), mib(p.pss_kib))),
                8,
                5,
                run.color.stroke_width(2),
            ))?;
            let peak = memory.iter().map(|p| p.pss_kib).max().unwrap_or(0);
            entries.push(LegendEntry {
                text: format!("{} PSS", run.name),
                detail: format!("peak {} MiB", num(mib(peak))),
                color: run.color,
                sample: Sample::Dashed,
            });
        }
    }
    Ok(entries)
}

fn draw_stages<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    area: &DrawingArea<DB, Shift>,
    runs: &[RunStyle<'_>],
    pen: Pen,
) -> Result<Vec<LegendEntry>, DrawingAreaErrorKind<DB::ErrorType>> {
    let mut stages: Vec<&str> = Vec::new();
    for r in runs {
        for s in &r.record.stages {
            if !stages.contains(&s.stage.as_str()) {
                stages.push(&s.stage);
            }
        }
    }
    if stages.is_empty() {
        draw_note(
            area,
            "no stage spans in these runs (bench records them when tracing is on)",
            pen,
        )?;
        return Ok(Vec::new());
    }
    let totals: Vec<f64> = runs
        .iter()
        .map(|r| r.record.stages.iter().map(|s| s.mean_us).sum::<f64>() / 1000.0)
        .collect();
    let x_max = totals.iter().copied().fold(0.0, f64::max).max(0.001) * 1.15;
    let name_style = text_style(15).pos(Pos::new(HPos::Right, VPos::Center));
    let (area_w, _) = area.dim_in_pixel();
    let max_name = (area_w / 3) as i32;
    let names: Vec<String> = runs
        .iter()
        .map(|r| pen.fit(root, &r.name, &name_style, max_name))
        .collect();
    let name_width = names
        .iter()
        .map(|n| pen.width(root, n, &name_style))
        .max()
        .unwrap_or(0)
        .max(40) as u32
        + 22;
    let n = runs.len();
    // At least four bands so one or two runs get bars, not slabs; centred vertically.
    let bands = n.max(4);
    let offset = (bands - n) as f64 / 2.0;
    let mut chart = chart(area, 0f64..x_max, 0f64..bands as f64, name_width)?;
    axes(
        root,
        &mut chart,
        pen,
        ("mean time per timed iteration (ms)", ""),
        None,
    )?;
    // The first run on top: run i occupies the band starting at offset + n-1-i.
    let band = |i: usize| offset + (n - 1 - i) as f64;
    let mut entries = Vec::new();
    for (k, &stage) in stages.iter().enumerate() {
        let color = color(k);
        chart.draw_series(runs.iter().enumerate().filter_map(|(i, r)| {
            let pos = r.record.stages.iter().position(|s| s.stage == stage)?;
            let before: f64 = r.record.stages[..pos].iter().map(|s| s.mean_us).sum();
            let x0 = before / 1000.0;
            let x1 = x0 + r.record.stages[pos].mean_us / 1000.0;
            let y = band(i);
            Some(Rectangle::new(
                [(x0, y + 0.2), (x1, y + 0.8)],
                color.filled(),
            ))
        }))?;
        entries.push(LegendEntry {
            text: stage.to_owned(),
            detail: String::new(),
            color,
            sample: Sample::Box,
        });
    }
    // Shares inside the segments wide enough to hold them.
    let share_style = text_style(13)
        .color(&WHITE)
        .pos(Pos::new(HPos::Center, VPos::Center));
    for (i, r) in runs.iter().enumerate() {
        let y = band(i) + 0.5;
        let mut x = 0.0;
        for s in &r.record.stages {
            let x1 = x + s.mean_us / 1000.0;
            let (left, py) = chart.backend_coord(&(x, y));
            let (right, _) = chart.backend_coord(&(x1, y));
            let label = format!("{:.0}%", s.share * 100.0);
            if right - left >= pen.width(root, &label, &share_style) + 12 {
                pen.text(root, &label, ((left + right) / 2, py), &share_style)?;
            }
            x = x1;
        }
    }
    // Totals at the end of each bar, run names left of the axis, centred on the bars.
    for (i, (name, total)) in names.iter().zip(&totals).enumerate() {
        let y = band(i) + 0.5;
        let (end, py) = chart.backend_coord(&(*total, y));
        pen.text(
            root,
            &format!("{} ms", num(*total)),
            (end + 6, py),
            &text_style(14).pos(Pos::new(HPos::Left, VPos::Center)),
        )?;
        let (axis, _) = chart.backend_coord(&(0.0, y));
        pen.text(root, name, (axis - 10, py), &name_style)?;
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_share_the_decimals_they_need() {
        assert_eq!(tick_labels(&[0.0, 50.0, 100.0], 1.0), ["0", "50", "100"]);
        assert_eq!(
            tick_labels(&[11.0, 11.5, 12.0], 1.0),
            ["11.0", "11.5", "12.0"]
        );
        assert_eq!(tick_labels(&[0.0, 0.2, 0.4], 100.0), ["0", "20", "40"]);
        assert_eq!(tick_labels(&[0.25, 0.5], 1.0), ["0.25", "0.50"]);
    }

    #[test]
    fn empty_text_elements_are_dropped() {
        let svg =
            "<svg>\n<text x=\"1\">\n\n</text>\n<text x=\"2\">\nkeep\n</text>\n<line/>\n</svg>";
        assert_eq!(
            without_empty_text(svg),
            "<svg>\n<text x=\"2\">\nkeep\n</text>\n<line/>\n</svg>"
        );
    }

    #[test]
    fn missing_fonts_are_listed_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let not_font = dir.path().join("notes.ttf");
        std::fs::write(&not_font, b"this is not a font").unwrap();
        let missing = dir.path().join("missing.ttf");
        let err = register_first_font(&[missing.clone(), not_font.clone()])
            .err()
            .unwrap();
        assert!(
            err.contains(&format!("{}: entity not found", missing.display()))
                && err.contains(&format!(
                    "{}: not a TrueType/OpenType font",
                    not_font.display()
                )),
            "{err}"
        );
        let message = PlotError::NoFont { tried: err }.to_string();
        assert!(message.contains("fonts-dejavu-core") && message.contains(FONT_ENV));
    }

    #[test]
    fn system_font_metrics_are_read() {
        let font = font().expect("a system font (install fonts-dejavu-core)");
        let m = font.metrics.as_ref().expect("metrics of the system font");
        assert!(m.height > 0.0);
        let (h_advance, h_lsb) = m.glyph('H').unwrap();
        let (i_advance, _) = m.glyph('i').unwrap();
        assert!(
            h_advance > i_advance && h_lsb > 0,
            "{h_advance} {i_advance}"
        );
        // Tabular digits: one advance for all of them.
        let digits: std::collections::BTreeSet<u16> =
            ('0'..='9').map(|c| m.glyph(c).unwrap().0).collect();
        assert_eq!(digits.len(), 1, "{digits:?}");
        assert_eq!(m.glyph('\u{10ffff}'), None);
    }

    /// Columns holding dark pixels, as runs of (first, last) column.
    fn ink_runs(rgb: &[u8], width: usize) -> Vec<(usize, usize)> {
        let inked: Vec<bool> = (0..width)
            .map(|x| {
                rgb.chunks_exact(3)
                    .skip(x)
                    .step_by(width)
                    .any(|p| p[0] < 128)
            })
            .collect();
        let mut runs = Vec::new();
        let mut start = None;
        for (x, &on) in inked.iter().chain([&false]).enumerate() {
            match (start, on) {
                (None, true) => start = Some(x),
                (Some(s), false) => {
                    runs.push((s, x - 1));
                    start = None;
                }
                _ => {}
            }
        }
        runs
    }

    #[test]
    fn bitmap_glyphs_sit_at_their_bearings() {
        let font = font().unwrap();
        let m = font.metrics.as_ref().unwrap();
        let (w, h) = (200u32, 40u32);
        let mut rgb = vec![255u8; (w * h * 3) as usize];
        let size = 30.0;
        {
            let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
            let style = ("sans-serif", size).into_font().color(&BLACK);
            Pen::bitmap(font)
                .text(
                    &root,
                    "1 1",
                    (20, 20),
                    &style.pos(Pos::new(HPos::Left, VPos::Center)),
                )
                .unwrap();
            root.present().unwrap();
        }
        // Both ones start at the pen position plus the bearing: 20 + lsb, and one space and
        // one digit further along.
        let scale = size as f32 / m.height;
        let (one, lsb) = m.glyph('1').unwrap();
        let (space, _) = m.glyph(' ').unwrap();
        let first = 20.0 + f32::from(lsb) * scale;
        let second = first + f32::from(one + space) * scale;
        let runs = ink_runs(&rgb, w as usize);
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert!(
            (runs[0].0 as f32 - first).abs() <= 1.0,
            "{runs:?} vs {first}"
        );
        assert!(
            (runs[1].0 as f32 - second).abs() <= 1.0,
            "{runs:?} vs {second}"
        );
    }
}
