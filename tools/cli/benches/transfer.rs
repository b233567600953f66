//! What the host protocol costs against the raw channel it runs on, and what trace collection
//! costs a benchmarked model.
//!
//! - Push throughput over SSH on loopback (a real `sshd` on 127.0.0.1, `edgevlm agent --stdio`
//!   behind it) against plain `scp` of the same files through the same server.
//! - Push throughput over a paced pty serial line at 115200 and 921600 baud (`edgevlm agent
//!   --serial` on the far end) against raw bytes written through the same kind of line.
//! - A local agent benchmarking the demo model with every trace on (spans, 10 ms memory
//!   samples, a top-10 node profile) against every trace off, runs interleaved.
//!
//! Every figure is a ratio against a reference measured in the same process, since this machine
//! is noisy. `cargo bench -p edgevlm --bench transfer [-- --quick]`

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use edgevlm_board_sim::serial_line::{SerialConfig, SerialLine};
use edgevlm_e2e::agent::SerialAgent;
use edgevlm_e2e::sshd::Sshd;
use edgevlm_host::client::{Client, ClientOptions, PushOptions};
use edgevlm_host::inventory::{Board, Endpoint};
use edgevlm_host::package::LocalPackage;
use edgevlm_proto as proto;

const EDGEVLM: &str = env!("CARGO_BIN_EXE_edgevlm");

fn demo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/demo")
}

/// The demo package plus `payload.bin`: `payload` incompressible bytes (xorshift).
fn package_with_payload(dir: &Path, payload: usize) -> LocalPackage {
    std::fs::create_dir_all(dir).unwrap();
    for file in ["model.toml", "model.onnx"] {
        std::fs::copy(demo().join(file), dir.join(file)).unwrap();
    }
    std::fs::write(
        dir.join("payload.bin"),
        noise(payload, 0x9e37_79b9_7f4a_7c15),
    )
    .unwrap();
    LocalPackage::scan(dir).unwrap()
}

fn noise(len: usize, mut state: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Connects, pushes `package` into an empty store, and returns (push time, connect + push time).
fn timed_push(board: &Board, package: &LocalPackage) -> (Duration, Duration) {
    let start = Instant::now();
    let mut client = Client::open(board, ClientOptions::default()).expect("connects");
    let report = client
        .push(package, &PushOptions { activate: false }, |_| {})
        .expect("push succeeds");
    let total = start.elapsed();
    assert!(!report.skipped && report.retransmits == 0, "{report:?}");
    assert_eq!(report.bytes_sent, package.total_bytes());
    (report.elapsed, total)
}

struct Row {
    channel: String,
    bytes: u64,
    raw: f64,
    push: f64,
    push_connect: f64,
    /// ssh: a login alone (`ssh host true`), s.
    login: Option<f64>,
}

impl Row {
    fn print(&self) {
        let mb = |secs: f64| self.bytes as f64 / 1e6 / secs;
        println!(
            "| {} | {:.2} MB | {:.3} s ({:.2} MB/s) | {:.3} s ({:.2} MB/s) | {:.3} s | {:.3} | {:.3} |",
            self.channel,
            self.bytes as f64 / 1e6,
            self.raw,
            mb(self.raw),
            self.push,
            mb(self.push),
            self.push_connect,
            self.raw / self.push,
            self.raw / self.push_connect,
        );
    }
}

fn ssh_row(work: &Path, payload: usize, reps: usize) -> Option<Row> {
    let sshd = match Sshd::start() {
        Ok(sshd) => sshd,
        Err(e) => {
            eprintln!("ssh: skipped ({e})");
            return None;
        }
    };
    let package = package_with_payload(&work.join("ssh-package"), payload);
    let files: Vec<PathBuf> = package
        .files
        .iter()
        .map(|f| package.dir.join(&f.path))
        .collect();
    // scp takes the port as -P; everything else as ssh.
    let scp_options: Vec<OsString> = sshd
        .ssh_options()
        .into_iter()
        .map(|o| if o == "-p" { "-P".into() } else { o })
        .collect();
    let (mut raw, mut push, mut push_connect) = (Vec::new(), Vec::new(), Vec::new());
    let mut login = Vec::new();
    for rep in 0..reps {
        // What an ssh login alone costs, part of both scp's time and the push's connect.
        let start = Instant::now();
        let status = sshd.ssh_command("true").status().expect("ssh runs");
        login.push(start.elapsed().as_secs_f64());
        assert!(status.success(), "ssh failed: {}", sshd.log());

        let dest = work.join(format!("scp-{rep}"));
        std::fs::create_dir_all(&dest).unwrap();
        let start = Instant::now();
        let status = Command::new("scp")
            .arg("-q")
            .args(&scp_options)
            .args(&files)
            .arg(format!("{}@127.0.0.1:{}/", sshd.user(), dest.display()))
            .status()
            .expect("scp runs");
        raw.push(start.elapsed().as_secs_f64());
        assert!(status.success(), "scp failed: {}", sshd.log());
        std::fs::remove_dir_all(&dest).unwrap();

        let mut board = Board::new(
            "loopback",
            Endpoint::Ssh {
                user: Some(sshd.user().to_owned()),
                host: "127.0.0.1".into(),
                port: sshd.port(),
            },
        );
        board.agent = EDGEVLM.to_owned();
        let store = work.join(format!("ssh-store-{rep}"));
        board.store = Some(store.display().to_string());
        board.identity = Some(sshd.identity_file());
        board.known_hosts = Some(sshd.known_hosts_file());
        let (p, total) = timed_push(&board, &package);
        push.push(p.as_secs_f64());
        push_connect.push(total.as_secs_f64());
        std::fs::remove_dir_all(&store).unwrap();
    }
    Some(Row {
        login: Some(median(login)),
        channel: "ssh loopback (vs scp)".into(),
        bytes: package.total_bytes(),
        raw: median(raw),
        push: median(push),
        push_connect: median(push_connect),
    })
}

/// Seconds to carry `len` bytes from end A to end B of a fresh line at `baud`.
fn raw_serial(baud: u32, len: usize) -> f64 {
    let line = SerialLine::open(SerialConfig::at(baud)).unwrap();
    let mut a = edgevlm_board_linux::serial::open(line.a_path(), baud).unwrap();
    let mut b = edgevlm_board_linux::serial::open(line.b_path(), baud).unwrap();
    let data = noise(len, 7);
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; len];
        b.read_exact(&mut got).unwrap();
        got
    });
    let start = Instant::now();
    a.write_all(&data).unwrap();
    let got = reader.join().unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(got == data, "the line changed bytes");
    secs
}

fn serial_row(work: &Path, baud: u32, payload: usize) -> Row {
    let package = package_with_payload(&work.join(format!("serial-package-{baud}")), payload);
    let raw = raw_serial(baud, package.total_bytes() as usize);

    let line = SerialLine::open(SerialConfig::at(baud)).unwrap();
    let store = work.join(format!("serial-store-{baud}"));
    let _agent = SerialAgent::start(EDGEVLM, line.b_path(), baud, &store);
    let board = Board::new(
        "serial",
        Endpoint::Serial {
            device: line.a_path().to_owned(),
            baud,
        },
    );
    let (push, total) = timed_push(&board, &package);
    Row {
        channel: format!("pty serial {baud} baud (vs raw bytes)"),
        bytes: package.total_bytes(),
        raw,
        push: push.as_secs_f64(),
        push_connect: total.as_secs_f64(),
        login: None,
    }
}

/// One benchmark request's timed latency (p50 and mean, µs) and its wall time (s).
fn bench_once(client: &mut Client, spec: &proto::BenchSpec) -> (f64, f64, f64) {
    let start = Instant::now();
    let run = client.bench(spec, |_| {}).expect("bench runs");
    let wall = start.elapsed().as_secs_f64();
    let l = &run.summary.latency;
    (l.p50_us as f64, l.mean_us as f64, wall)
}

fn tracing_rows(work: &Path, iterations: u32, rounds: usize) {
    let mut board = Board::new("local", Endpoint::Local);
    let store = work.join("trace-store");
    board.agent_command = vec![
        EDGEVLM.into(),
        "agent".into(),
        "--stdio".into(),
        "--store".into(),
        store.into_os_string(),
    ];
    let mut client = Client::open(&board, ClientOptions::default()).expect("local agent");
    let package = LocalPackage::scan(&demo()).unwrap();
    client
        .push(&package, &PushOptions { activate: false }, |_| {})
        .unwrap();
    let on = proto::TraceOptions::default();
    let off = proto::TraceOptions {
        spans: false,
        tokens: false,
        memory_interval_ms: 0,
        top_nodes: 0,
    };
    println!();
    println!(
        "Trace collection overhead, demo model, {iterations} timed iterations per run, \
         {rounds} runs each way interleaved (medians; on = spans + memory every \
         {} ms + top-{} node profile):",
        on.memory_interval_ms, on.top_nodes
    );
    println!();
    println!(
        "| input | p50 off | p50 on | p50 ratio | mean off | mean on | mean ratio | request wall off | on | wall ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (label, input) in [
        ("synthetic tensor", proto::BenchInput::Synthetic { seed: 1 }),
        (
            "image, full pipeline",
            proto::BenchInput::PackageFile(proto::bounded("samples/scratch_01.png")),
        ),
    ] {
        let spec = |trace| proto::BenchSpec {
            model: package.model_ref(),
            warmup: 20,
            iterations,
            min_duration_ms: 0,
            threads: 1,
            input: input.clone(),
            prompt: Default::default(),
            max_new_tokens: 0,
            trace,
        };
        let (spec_off, spec_on) = (spec(off), spec(on));
        let (mut a, mut b) = (Vec::new(), Vec::new());
        // Interleaved, and the order swapped every round, so warm-up and drift hit both.
        for round in 0..rounds {
            if round % 2 == 0 {
                a.push(bench_once(&mut client, &spec_off));
                b.push(bench_once(&mut client, &spec_on));
            } else {
                b.push(bench_once(&mut client, &spec_on));
                a.push(bench_once(&mut client, &spec_off));
            }
        }
        let pick = |v: &[(f64, f64, f64)], f: fn(&(f64, f64, f64)) -> f64| {
            median(v.iter().map(f).collect())
        };
        let (p50_off, p50_on) = (pick(&a, |x| x.0), pick(&b, |x| x.0));
        let (mean_off, mean_on) = (pick(&a, |x| x.1), pick(&b, |x| x.1));
        let (wall_off, wall_on) = (pick(&a, |x| x.2), pick(&b, |x| x.2));
        println!(
            "| {label} | {p50_off:.0} µs | {p50_on:.0} µs | {:.3} | {mean_off:.0} µs | \
             {mean_on:.0} µs | {:.3} | {wall_off:.3} s | {wall_on:.3} s | {:.3} |",
            p50_on / p50_off,
            mean_on / mean_off,
            wall_on / wall_off
        );
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let work = tempfile::tempdir().unwrap();
    let (ssh_payload, ssh_reps) = if quick { (4 << 20, 1) } else { (64 << 20, 3) };
    let serial = if quick {
        [(115_200, 8 << 10), (921_600, 64 << 10)]
    } else {
        [(115_200, 96 << 10), (921_600, 768 << 10)]
    };

    println!(
        "Push throughput against the raw channel (package = demo model + incompressible \
         payload; efficiency = raw time / push time, 1.0 = as fast as the raw channel). \
         scp includes its ssh login, so over ssh compare with push incl. connect; raw \
         serial bytes have no handshake, so there compare with the push alone:"
    );
    println!();
    println!(
        "| channel | package | raw channel | edgevlm push | push incl. connect | raw / push | raw / push incl. connect |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut rows: Vec<Row> = ssh_row(work.path(), ssh_payload, ssh_reps)
        .into_iter()
        .collect();
    for (baud, payload) in serial {
        rows.push(serial_row(work.path(), baud, payload));
    }
    for row in &rows {
        row.print();
    }
    for row in &rows {
        if let Some(login) = row.login {
            println!();
            println!(
                "{}: an ssh login alone (`ssh host true`) takes {login:.3} s; it is part of \
                 both scp's time and the push's connect.",
                row.channel
            );
        }
    }
    let (iterations, rounds) = if quick { (50, 2) } else { (2000, 9) };
    tracing_rows(work.path(), iterations, rounds);
}
