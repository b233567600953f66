//! `edgevlm image build`: a flashable Raspberry Pi image with the agent and a model.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use edgevlm_image::{Board, ImageSpec, SerialAgent, Wifi};

const FAILURES: &str = "\
Exit codes:
  0  the image was written
  2  error: a missing tool (named with its Debian package), not root, a bad option (hostname,
     Wi-Fi, ssh key, an agent binary that is not aarch64), an invalid model package, mmdebstrap
     or mkfs failing (their last lines are shown). Nothing is left at --out on failure.

Flash the image with `dd if=IMG of=/dev/sdX bs=4M conv=fsync` or Raspberry Pi Imager.";

/// Raspberry Pi images.
#[derive(Debug, clap::Args)]
pub struct Cmd {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    Build(Build),
}

/// Build a flashable image for a Raspberry Pi 4 or 5: Debian bookworm arm64 with Debian's
/// kernel (a Pi 5's from trixie-backports) and Pi firmware, the edgevlm agent as a systemd
/// service, an optional preinstalled model package, ssh login as user edgevlm with your key,
/// optional Wi-Fi; the first boot makes fresh ssh host keys and grows the root partition to
/// the card. Needs root. The base root filesystem is made once per board with mmdebstrap
/// (arm64, under qemu-user-static) and cached. Parts of the board the kernel will not drive
/// are printed as warnings.
#[derive(Debug, clap::Args)]
#[command(after_help = FAILURES)]
struct Build {
    /// The board.
    #[arg(long, value_parser = parse_board)]
    board: Board,
    /// A model package to preinstall and activate.
    #[arg(long, value_name = "PKG")]
    model: Option<PathBuf>,
    /// An OpenSSH public key file authorized for user edgevlm (repeatable).
    #[arg(long, value_name = "FILE")]
    ssh_key: Vec<PathBuf>,
    /// The board's hostname.
    #[arg(long, default_value = "edgevlm")]
    hostname: String,
    /// Wi-Fi network as SSID:PASSPHRASE.
    #[arg(long, value_name = "SSID:PSK", value_parser = parse_wifi)]
    wifi: Option<Wifi>,
    /// Also serve edgevlm push / bench on this serial line at boot, as DEV or DEV:BAUD
    /// (default 921600): ttyAMA0 (the GPIO UART; the kernel console then stays off it),
    /// ttyUSB0, ttyGS0, hvc0.
    #[arg(long, value_name = "DEV:BAUD", value_parser = parse_serial)]
    serial_agent: Option<SerialAgent>,
    /// The image to write; a name ending in .xz is compressed.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// The aarch64 edgevlm executable to install.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "target/aarch64-unknown-linux-gnu/release/edgevlm"
    )]
    agent_binary: PathBuf,
    /// Use this arm64 rootfs tarball instead of the cached mmdebstrap one.
    #[arg(long, value_name = "TAR")]
    base: Option<PathBuf>,
    /// Where the mmdebstrap tarball is cached (default: the edgevlm data directory).
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// The Debian mirror mmdebstrap downloads from.
    #[arg(long, default_value = "http://deb.debian.org/debian")]
    mirror: String,
}

fn parse_board(s: &str) -> Result<Board, String> {
    match s {
        "rpi4" => Ok(Board::Rpi4),
        "rpi5" => Ok(Board::Rpi5),
        _ => Err(format!("{s:?}: expected rpi4 or rpi5")),
    }
}

fn parse_serial(s: &str) -> Result<SerialAgent, String> {
    let (device, baud) = s.split_once(':').unwrap_or((s, "921600"));
    let baud = baud
        .parse()
        .map_err(|_| format!("{baud:?}: the baud rate must be a number"))?;
    Ok(SerialAgent {
        device: device.trim_start_matches("/dev/").to_owned(),
        baud,
    })
}

fn parse_wifi(s: &str) -> Result<Wifi, String> {
    match s.split_once(':') {
        Some((ssid, psk)) if !ssid.is_empty() => Ok(Wifi {
            ssid: ssid.to_owned(),
            psk: psk.to_owned(),
        }),
        _ => Err("expected SSID:PASSPHRASE".to_owned()),
    }
}

impl Cmd {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let Action::Build(b) = self.action;
        let mut ssh_keys = Vec::new();
        for file in &b.ssh_key {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading the ssh key {}", file.display()))?;
            ssh_keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned),
            );
        }
        let mut log = |line: &str| eprintln!("image: {line}");
        let base = match b.base {
            Some(base) => base,
            None => {
                let cache = match b.cache {
                    Some(dir) => dir,
                    None => edgevlm_host::inventory::data_dir()?.join("image-cache"),
                };
                edgevlm_image::base_rootfs(b.board, &cache, &b.mirror, &mut log)?
            }
        };
        let spec = ImageSpec {
            board: b.board,
            base,
            agent_binary: b.agent_binary,
            model: b.model,
            ssh_keys,
            hostname: b.hostname,
            wifi: b.wifi,
            serial_agent: b.serial_agent,
            out: b.out,
        };
        let report = edgevlm_image::build(&spec, &mut log)
            .with_context(|| format!("building {}", spec.out.display()))?;
        println!(
            "wrote {} ({:.1} MiB, kernel {}, model {})",
            report.image.display(),
            report.bytes as f64 / (1 << 20) as f64,
            report.kernel,
            report.model.as_deref().unwrap_or("none")
        );
        Ok(ExitCode::SUCCESS)
    }
}
