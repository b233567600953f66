//! Flashable Raspberry Pi images for edgevlm, built without loop mounts.
//!
//! [`build`] takes an arm64 Debian bookworm root filesystem (a tarball made once by `mmdebstrap`
//! with qemu-user-static and cached, see [`base_rootfs`]; a Raspberry Pi 5's has the kernel from
//! trixie-backports, see [`PI5_KERNEL_SUITE`]), adds the edgevlm binary, the agent's
//! systemd unit and config, a preinstalled and active model package, a login user with the
//! given ssh keys, the hostname, optional Wi-Fi, networking by DHCP, and a first-boot unit
//! (fresh ssh host keys and machine id, root partition grown to the card). The boot partition
//! (FAT32: Pi firmware from `raspi-firmware`, Debian's arm64 kernel and initrd, device trees,
//! `config.txt`, `cmdline.txt`) is made with `mkfs.vfat` + `mcopy`, the root partition with
//! `mkfs.ext4 -d`, the partition table with `sfdisk`; the result flashes with `dd` or
//! Raspberry Pi Imager.
//!
//! Building needs root (the rootfs keeps its owners) and the tools named in [`REQUIRED_TOOLS`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{chown, symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use edgevlm_agent::store::ModelStore;

/// External programs [`build`] runs (Debian packages: tar, e2fsprogs, dosfstools, mtools, fdisk).
pub const REQUIRED_TOOLS: &[(&str, &str)] = &[
    ("tar", "tar"),
    ("mkfs.ext4", "e2fsprogs"),
    ("mkfs.vfat", "dosfstools"),
    ("mcopy", "mtools"),
    ("sfdisk", "fdisk"),
];

/// Debian packages of the base root filesystem, on top of `minbase`.
pub const BASE_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "kmod",
    "openssh-server",
    "sudo",
    "linux-image-arm64",
    "raspi-firmware",
    "firmware-brcm80211",
    "wpasupplicant",
    "cloud-guest-utils",
    "e2fsprogs",
    "iproute2",
    "ca-certificates",
];

/// Label of the root partition (`root=LABEL=...` on the kernel command line, `/etc/fstab`).
pub const ROOT_LABEL: &str = "EDGEVLM_ROOT";
/// Label of the boot partition (FAT: at most 11 characters).
pub const BOOT_LABEL: &str = "EDGEVLMBOOT";
/// The login user (uid 1000) the agent runs as and ssh logs in as.
pub const USER: &str = "edgevlm";
/// Where the model store lives on the board (`edgevlm agent --store` default).
pub const STORE: &str = "var/lib/edgevlm/store";

const MIB: u64 = 1 << 20;
const BOOT_OFFSET: u64 = 4 * MIB;
const BOOT_SIZE: u64 = 256 * MIB;
const UID: u32 = 1000;

/// The board an image is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Board {
    /// Raspberry Pi 4 (BCM2711).
    Rpi4,
    /// Raspberry Pi 5 (BCM2712).
    Rpi5,
}

impl Board {
    /// The board profile name the agent uses (`[board] profile`).
    pub fn profile(self) -> &'static str {
        match self {
            Board::Rpi4 => "rpi4",
            Board::Rpi5 => "rpi5",
        }
    }

    fn dtb(self) -> &'static str {
        match self {
            Board::Rpi4 => "bcm2711-rpi-4-b.dtb",
            Board::Rpi5 => "bcm2712-rpi-5-b.dtb",
        }
    }
}

/// The suite a Raspberry Pi 5 image takes its kernel from. Bookworm's 6.1 has no BCM2712
/// device tree; the 6.12 kernels of bookworm-backports and trixie have one, but build neither
/// the SD card controller's driver (`MMC_SDHCI_BRCMSTB`) nor RP1's (the south bridge behind
/// the GPIO header, Ethernet and USB), so the root filesystem would not even be found.
/// trixie-backports' 7.x kernels have both, and a device tree with RP1's GPIO, Ethernet and
/// USB nodes. Only the kernel packages come from it (apt pinning, [`PI5_KERNEL_PIN`]).
pub const PI5_KERNEL_SUITE: &str = "trixie-backports";

/// apt preferences of a Raspberry Pi 5 rootfs: the kernel and linux-base from
/// [`PI5_KERNEL_SUITE`], everything else from bookworm.
pub const PI5_KERNEL_PIN: &str = include_str!("rpi5/kernel.pref");

/// Runs the kernel's hook directories through bookworm's one-directory run-parts (installed
/// over linux-base's `linux-run-hooks`, which is diverted).
const PI5_RUN_HOOKS: &str = include_str!("rpi5/linux-run-hooks");

/// Kernel and initramfs hook that keeps the boot partition's kernel, initrd and device trees
/// current on the board, in place of raspi-firmware's (diverted), which rewrites config.txt
/// for a Pi 4.
const PI5_BOOT_HOOK: &str = include_str!("rpi5/update-boot-firmware");

/// Wi-Fi credentials written to the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wifi {
    /// Network name.
    pub ssid: String,
    /// WPA passphrase (8 to 63 characters).
    pub psk: String,
}

/// The protocol agent on a serial line of the board.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialAgent {
    /// Device name under /dev: `ttyAMA0` (the Pi's GPIO UART), `ttyUSB0`, `ttyGS0`, `hvc0`.
    pub device: String,
    /// Line speed.
    pub baud: u32,
}

/// What to put in an image.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Target board.
    pub board: Board,
    /// The arm64 root filesystem tarball (see [`base_rootfs`]).
    pub base: PathBuf,
    /// The aarch64 `edgevlm` executable (`ci/cross.sh` builds it).
    pub agent_binary: PathBuf,
    /// A model package to preinstall and activate.
    pub model: Option<PathBuf>,
    /// OpenSSH public key lines authorized for [`USER`].
    pub ssh_keys: Vec<String>,
    /// Hostname.
    pub hostname: String,
    /// Optional Wi-Fi.
    pub wifi: Option<Wifi>,
    /// A serial line for `edgevlm push` / `bench` without a network: the protocol agent is
    /// started on it at boot (and the kernel console and login prompt kept off it).
    pub serial_agent: Option<SerialAgent>,
    /// The image file to write (`.img`, or `.img.xz` to compress it).
    pub out: PathBuf,
}

/// What [`build`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The image written.
    pub image: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Size of the root partition in bytes.
    pub root_bytes: u64,
    /// The kernel version booted (`6.1.0-...-arm64`).
    pub kernel: String,
    /// The preinstalled model, `name version`.
    pub model: Option<String>,
    /// What will not work on the board with this kernel (also logged as `warning: ...`).
    pub warnings: Vec<String>,
}

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A required program is missing.
    #[error("{tool} not found: apt-get install {package}")]
    MissingTool {
        /// The program.
        tool: String,
        /// The Debian package that has it.
        package: String,
    },
    /// A program failed.
    #[error("{what} failed ({status}): {stderr}")]
    ToolFailed {
        /// What was run.
        what: String,
        /// Its exit status.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
    /// An input is unusable.
    #[error("{field}: {reason}")]
    BadInput {
        /// The option or file.
        field: String,
        /// Why.
        reason: String,
    },
    /// File I/O failed.
    #[error("{action} {path}")]
    Io {
        /// What was done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Installing the model package into the image's store failed.
    #[error("preinstalling the model package {path}")]
    Model {
        /// The package.
        path: PathBuf,
        /// The cause.
        #[source]
        source: edgevlm_agent::store::Error,
    },
}

type Result<T> = std::result::Result<T, ImageError>;

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

fn bad(field: &str, reason: impl Into<String>) -> ImageError {
    ImageError::BadInput {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// Runs `cmd` (with `stdin` fed to it), failing with its stderr.
fn run(mut cmd: Command, what: &str, stdin: Option<&str>) -> Result<()> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ImageError::MissingTool {
            package: REQUIRED_TOOLS
                .iter()
                .find(|(t, _)| *t == program)
                .map_or(program.clone(), |(_, p)| (*p).to_owned()),
            tool: program.clone(),
        },
        _ => ImageError::Io {
            action: "starting",
            path: program.clone().into(),
            source: e,
        },
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(io_err("writing to", Path::new(&program)))?;
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    let status = child
        .wait()
        .map_err(io_err("waiting for", Path::new(&program)))?;
    if status.success() {
        return Ok(());
    }
    let tail: String = {
        let lines: Vec<&str> = stderr.trim_end().lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    };
    Err(ImageError::ToolFailed {
        what: what.to_owned(),
        status: status.to_string(),
        stderr: tail,
    })
}

/// Checks that every program of [`REQUIRED_TOOLS`] is on `PATH`.
pub fn check_tools() -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for (tool, package) in REQUIRED_TOOLS {
        if !std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()) {
            return Err(ImageError::MissingTool {
                tool: (*tool).to_owned(),
                package: (*package).to_owned(),
            });
        }
    }
    Ok(())
}

/// The cached base rootfs tarball for `board` in `cache`, made by `mmdebstrap` (arm64,
/// bookworm, minbase plus [`BASE_PACKAGES`], from `mirror`) when it is not there yet. The name
/// carries a digest of what goes in, so changing the list makes a new tarball. The first run
/// downloads about 250 MB and configures the packages under qemu-user-static (mkinitramfs is
/// the slow step).
///
/// A Raspberry Pi 5's rootfs also has [`PI5_KERNEL_SUITE`] as an apt source, pinned to the
/// kernel packages, and two changes that make that kernel install and update on bookworm:
/// linux-base's `linux-run-hooks` diverted to a version for bookworm's run-parts, and
/// raspi-firmware's kernel hooks diverted to one that leaves the Pi 5's config.txt alone.
pub fn base_rootfs(
    board: Board,
    cache: &Path,
    mirror: &str,
    log: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let base = BASE_PACKAGES.join(",");
    let (name, packages) = match board {
        Board::Rpi4 => (
            format!("rootfs-bookworm-arm64-{:016x}", fnv1a(base.as_bytes())),
            base,
        ),
        Board::Rpi5 => {
            // The 7.x kernel asks for `dracut | initramfs-tools`, and apt would take dracut,
            // which runs no /etc/initramfs/post-update.d hooks: initramfs-tools, as on a Pi 4.
            let packages = format!("{base},initramfs-tools");
            let inputs = [
                packages.as_str(),
                PI5_KERNEL_SUITE,
                PI5_KERNEL_PIN,
                PI5_RUN_HOOKS,
                PI5_BOOT_HOOK,
            ];
            let name = format!(
                "rootfs-bookworm-arm64-rpi5-{:016x}",
                fnv1a(inputs.join("\0").as_bytes())
            );
            (name, packages)
        }
    };
    let tar = cache.join(format!("{name}.tar"));
    if tar.is_file() {
        log(&format!("base rootfs: cached {}", tar.display()));
        return Ok(tar);
    }
    fs::create_dir_all(cache).map_err(io_err("creating", cache))?;
    // mmdebstrap picks its output format from the name: it must end in .tar.
    let tmp = cache.join(format!("{name}.partial.tar"));
    let hooks = cache.join(format!("{name}.hooks"));
    for stale in [&tar, &tmp, &hooks] {
        // A partial file from an interrupted run, or anything else in the way.
        if fs::symlink_metadata(stale).is_ok_and(|m| m.is_dir()) {
            fs::remove_dir_all(stale).map_err(io_err("removing", stale))?;
        } else if fs::symlink_metadata(stale).is_ok() {
            fs::remove_file(stale).map_err(io_err("removing", stale))?;
        }
    }
    log(&format!(
        "base rootfs: mmdebstrap arm64 bookworm{} into {} (several minutes)",
        match board {
            Board::Rpi4 => String::new(),
            Board::Rpi5 => format!(", kernel from {PI5_KERNEL_SUITE}"),
        },
        tar.display()
    ));
    let mut cmd = Command::new("mmdebstrap");
    cmd.args([
        "--arch=arm64",
        "--variant=minbase",
        "--components=main,contrib,non-free-firmware",
    ])
    .arg(format!("--include={packages}"));
    if board == Board::Rpi5 {
        cmd.args(pi5_hooks(&hooks)?);
    }
    cmd.arg("bookworm").arg(&tmp).arg(mirror);
    if board == Board::Rpi5 {
        cmd.arg(format!("deb {mirror} {PI5_KERNEL_SUITE} main"));
    }
    let made = run(
        cmd,
        "mmdebstrap (needs mmdebstrap, qemu-user-static, binfmt-support)",
        None,
    );
    if hooks.exists() {
        fs::remove_dir_all(&hooks).map_err(io_err("removing", &hooks))?;
    }
    made?;
    fs::rename(&tmp, &tar).map_err(io_err("renaming", &tmp))?;
    Ok(tar)
}

/// mmdebstrap hook options for a Raspberry Pi 5 rootfs, with their files written to `dir`.
/// The pin is in place before apt resolves anything; the diversions and scripts before the
/// kernel, linux-base and raspi-firmware are unpacked (after the essential packages, which
/// bring dpkg-divert).
fn pi5_hooks(dir: &Path) -> Result<Vec<String>> {
    let pin = dir.join("kernel.pref");
    let run_hooks = dir.join("linux-run-hooks");
    let boot_hook = dir.join("update-boot-firmware");
    write(&pin, PI5_KERNEL_PIN, 0o644)?;
    write(&run_hooks, PI5_RUN_HOOKS, 0o755)?;
    write(&boot_hook, PI5_BOOT_HOOK, 0o755)?;
    let divert = |path: &str| {
        format!(
            "--essential-hook=chroot \"$1\" dpkg-divert --quiet --local --rename \
             --divert {path}.distrib --add {path}"
        )
    };
    let mut hooks = vec![
        format!(
            "--setup-hook=install -D -m 644 {} \"$1/etc/apt/preferences.d/edgevlm-kernel.pref\"",
            sh_quote(&pin)
        ),
        divert("/usr/bin/linux-run-hooks"),
        format!(
            "--essential-hook=install -D -m 755 {} \"$1/usr/bin/linux-run-hooks\"",
            sh_quote(&run_hooks)
        ),
        format!(
            "--essential-hook=install -D -m 755 {} \"$1/usr/lib/edgevlm/update-boot-firmware\"",
            sh_quote(&boot_hook)
        ),
    ];
    for hook_dir in [
        "/etc/kernel/postinst.d",
        "/etc/kernel/postrm.d",
        "/etc/initramfs/post-update.d",
    ] {
        // Under the diverted hook's own name: raspi-firmware's postinst runs it by that path.
        hooks.push(divert(&format!("{hook_dir}/z50-raspi-firmware")));
        hooks.push(format!(
            "--essential-hook=mkdir -p \"$1{hook_dir}\" && \
             ln -sf /usr/lib/edgevlm/update-boot-firmware \"$1{hook_dir}/z50-raspi-firmware\""
        ));
    }
    Ok(hooks)
}

/// `path` as one word for sh.
fn sh_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Builds the image described by `spec`, reporting each step to `log`.
pub fn build(spec: &ImageSpec, log: &mut dyn FnMut(&str)) -> Result<Report> {
    validate(spec)?;
    check_tools()?;
    let out_dir = match spec.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&out_dir).map_err(io_err("creating", &out_dir))?;
    let work = tempfile::Builder::new()
        .prefix(".edgevlm-image-")
        .tempdir_in(&out_dir)
        .map_err(io_err("creating a work directory in", &out_dir))?;
    let root = work.path().join("root");
    fs::create_dir(&root).map_err(io_err("creating", &root))?;

    log(&format!("extracting {}", spec.base.display()));
    let mut tar = Command::new("tar");
    tar.arg("-xpf")
        .arg(&spec.base)
        .args(["--numeric-owner", "-C"])
        .arg(&root);
    run(tar, "extracting the base rootfs", None)?;

    let kernel = find_kernel(&root)?;
    log(&format!("kernel {kernel}"));
    let warnings = match spec.board {
        Board::Rpi4 => Vec::new(),
        Board::Rpi5 => pi5_support(&root, &kernel, spec.serial_agent.as_ref())?,
    };
    for warning in &warnings {
        log(&format!("warning: {warning}"));
    }
    let model = configure_root(spec, &root, log)?;

    log("boot partition (FAT32)");
    let boot_dir = work.path().join("boot");
    stage_boot(
        spec.board,
        spec.serial_agent.as_ref(),
        &root,
        &kernel,
        &boot_dir,
    )?;
    let boot_img = work.path().join("boot.vfat");
    make_vfat(&boot_dir, &boot_img)?;

    log("root partition (ext4)");
    let root_img = work.path().join("root.ext4");
    let root_bytes = make_ext4(&root, &root_img)?;

    let img = work.path().join("disk.img");
    assemble(&boot_img, &root_img, root_bytes, &img)?;
    let (image, bytes) = finish(&img, &spec.out, log)?;
    log(&format!("wrote {} ({bytes} bytes)", image.display()));
    Ok(Report {
        image,
        bytes,
        root_bytes,
        kernel,
        model,
        warnings,
    })
}

fn validate(spec: &ImageSpec) -> Result<()> {
    let host_ok = !spec.hostname.is_empty()
        && spec.hostname.len() <= 63
        && spec
            .hostname
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !spec.hostname.starts_with('-')
        && !spec.hostname.ends_with('-');
    if !host_ok {
        return Err(bad(
            "--hostname",
            format!(
                "{:?} is not a hostname (letters, digits and inner '-', at most 63)",
                spec.hostname
            ),
        ));
    }
    if let Some(w) = &spec.wifi {
        if w.ssid.is_empty() || w.ssid.len() > 32 || w.ssid.contains(['"', '\n']) {
            return Err(bad(
                "--wifi",
                "the SSID must be 1 to 32 characters, no quotes",
            ));
        }
        if !(8..=63).contains(&w.psk.len()) || w.psk.contains(['"', '\n']) {
            return Err(bad(
                "--wifi",
                "the passphrase must be 8 to 63 characters, no quotes",
            ));
        }
    }
    if let Some(serial) = &spec.serial_agent {
        let name_ok = !serial.device.is_empty()
            && serial
                .device
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !name_ok {
            return Err(bad(
                "--serial-agent",
                format!(
                    "{:?} is not a device name under /dev (ttyAMA0, ttyUSB0, hvc0)",
                    serial.device
                ),
            ));
        }
        if !edgevlm_board_linux::serial::BAUD_RATES.contains(&serial.baud) {
            return Err(bad(
                "--serial-agent",
                format!("{} baud is not a supported rate", serial.baud),
            ));
        }
    }
    for key in &spec.ssh_keys {
        let kind = key.split_whitespace().next().unwrap_or("");
        if !(kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-")) {
            return Err(bad(
                "--ssh-key",
                format!("not an OpenSSH public key line: {:.40}", key),
            ));
        }
    }
    // An ELF for aarch64: e_ident "\x7fELF", 64-bit, e_machine 183 (EM_AARCH64) at 18..20.
    let mut head = [0u8; 20];
    File::open(&spec.agent_binary)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(io_err("reading the agent binary", &spec.agent_binary))?;
    if &head[..4] != b"\x7fELF" || head[4] != 2 || u16::from_le_bytes([head[18], head[19]]) != 183 {
        return Err(bad(
            "--agent-binary",
            format!(
                "{} is not an aarch64 Linux executable (build one with ci/cross.sh)",
                spec.agent_binary.display()
            ),
        ));
    }
    if !spec.base.is_file() {
        return Err(bad(
            "base rootfs",
            format!("{} is not a file", spec.base.display()),
        ));
    }
    Ok(())
}

/// A part of the Raspberry Pi 5 and what the kernel needs to drive it: driver modules
/// (built in or as files) and a device tree node, found by one of `nodes` (a compatible
/// string or a node name) in the board's tree.
struct Pi5Part {
    what: &'static str,
    modules: &'static [&'static str],
    nodes: &'static [&'static str],
}

/// The SD card, without which nothing boots.
const PI5_SD: Pi5Part = Pi5Part {
    what: "the SD card",
    modules: &["sdhci-brcmstb"],
    nodes: &["brcm,bcm2712-sdhci"],
};

/// The parts behind RP1 (the south bridge on PCIe) and the fan: an image boots without them.
const PI5_PARTS: &[Pi5Part] = &[
    Pi5Part {
        what: "the 40-pin GPIO header (trigger and result pins)",
        modules: &["rp1_pci", "clk-rp1", "pinctrl-rp1"],
        nodes: &["raspberrypi,rp1-gpio"],
    },
    Pi5Part {
        what: "Ethernet",
        modules: &["rp1_pci", "clk-rp1", "macb"],
        nodes: &["raspberrypi,rp1-gem"],
    },
    Pi5Part {
        what: "the USB ports (USB cameras)",
        modules: &["rp1_pci", "clk-rp1", "dwc3"],
        nodes: &["snps,dwc3"],
    },
    Pi5Part {
        what: "the 40-pin header's UART (ttyAMA0)",
        modules: &["rp1_pci"],
        nodes: &["serial@40030000", "arm,pl011-axi"],
    },
    Pi5Part {
        what: "the fan connector (the active cooler stays off)",
        modules: &["pwm-fan"],
        nodes: &["pwm-fan"],
    },
];

/// Checks the rootfs kernel against the Raspberry Pi 5's parts: an error when it cannot boot
/// from the SD card, and one warning per part it will not drive.
fn pi5_support(
    root: &Path,
    kernel: &str,
    serial_agent: Option<&SerialAgent>,
) -> Result<Vec<String>> {
    let dtb_path = root.join(format!(
        "usr/lib/linux-image-{kernel}/broadcom/{}",
        Board::Rpi5.dtb()
    ));
    let dtb = fs::read(&dtb_path).map_err(|_| {
        bad(
            "base rootfs",
            format!(
                "the kernel {kernel} has no device tree {} (a Raspberry Pi 5 needs the kernel \
                 from {PI5_KERNEL_SUITE}: leave out --base to build that rootfs)",
                Board::Rpi5.dtb()
            ),
        )
    })?;
    let modules = kernel_modules(root, kernel);
    let missing = |part: &Pi5Part| -> Option<String> {
        let mut why: Vec<String> = part
            .modules
            .iter()
            .filter(|m| !modules.contains(&m.replace('-', "_")))
            .map(|m| format!("no {m} driver"))
            .collect();
        if !part.nodes.iter().any(|n| contains(&dtb, n.as_bytes())) {
            why.push(format!(
                "no {} node in {}",
                part.nodes[0],
                Board::Rpi5.dtb()
            ));
        }
        (!why.is_empty()).then(|| {
            format!(
                "{} will not work on a Raspberry Pi 5 with Linux {kernel}: {}",
                part.what,
                why.join(", ")
            )
        })
    };
    if let Some(why) = missing(&PI5_SD) {
        return Err(bad(
            "base rootfs",
            format!("{why} (the board would not find its root filesystem)"),
        ));
    }
    let mut warnings: Vec<String> = PI5_PARTS.iter().filter_map(missing).collect();
    if let Some(serial) = serial_agent {
        if serial.device == "ttyAMA0" && missing(&PI5_PARTS[3]).is_some() {
            warnings.push(
                "--serial-agent ttyAMA0: the agent will not start on a Raspberry Pi 5 with \
                 this kernel; ttyAMA10 is the 3-pin debug UART connector"
                    .to_owned(),
            );
        }
    }
    Ok(warnings)
}

/// Names of the kernel's modules, built in or as files (`-` written `_`, as modprobe does).
fn kernel_modules(root: &Path, kernel: &str) -> std::collections::BTreeSet<String> {
    fn walk(dir: &Path, names: &mut std::collections::BTreeSet<String>) {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, names);
            } else if let Some(name) = module_name(&entry.file_name().to_string_lossy()) {
                names.insert(name);
            }
        }
    }
    fn module_name(file: &str) -> Option<String> {
        let (stem, _) = file.split_once(".ko")?;
        Some(stem.replace('-', "_"))
    }
    let dir = root.join(format!("usr/lib/modules/{kernel}"));
    let mut names = std::collections::BTreeSet::new();
    walk(&dir.join("kernel"), &mut names);
    let builtin = fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    names.extend(
        builtin
            .lines()
            .filter_map(|l| module_name(l.rsplit('/').next().unwrap_or(l))),
    );
    names
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The newest `boot/vmlinuz-VERSION` with its `boot/initrd.img-VERSION`.
fn find_kernel(root: &Path) -> Result<String> {
    let boot = root.join("boot");
    let mut versions: Vec<String> = fs::read_dir(&boot)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_owned)
        })
        .filter(|v| boot.join(format!("initrd.img-{v}")).is_file())
        .collect();
    versions.sort();
    versions.pop().ok_or_else(|| {
        bad(
            "base rootfs",
            "no boot/vmlinuz-VERSION with its boot/initrd.img-VERSION (is linux-image-arm64 installed?)",
        )
    })
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    }
    fs::write(path, text).map_err(io_err("writing", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(io_err("opening", path))?;
    writeln!(f, "{line}").map_err(io_err("writing", path))
}

/// Adds `user` to the member list of `group` in an /etc/group-style file, creating the group
/// with `gid` when it is missing.
fn add_to_group(file: &Path, group: &str, gid: u32, user: &str) -> Result<()> {
    let text = fs::read_to_string(file).unwrap_or_default();
    let mut found = false;
    let mut out = String::new();
    for line in text.lines() {
        let mut fields: Vec<String> = line.split(':').map(str::to_owned).collect();
        if fields.first().map(String::as_str) == Some(group) && fields.len() >= 4 {
            found = true;
            let last = fields.len() - 1;
            if !fields[last].split(',').any(|m| m == user) {
                if !fields[last].is_empty() {
                    fields[last].push(',');
                }
                fields[last].push_str(user);
            }
        }
        out.push_str(&fields.join(":"));
        out.push('\n');
    }
    if !found {
        out.push_str(&format!("{group}:x:{gid}:{user}\n"));
    }
    fs::write(file, out).map_err(io_err("writing", file))
}

fn chown_tree(path: &Path, uid: u32) -> Result<()> {
    chown(path, Some(uid), Some(uid)).map_err(io_err("chown", path))?;
    if fs::symlink_metadata(path)
        .map_err(io_err("reading", path))?
        .is_dir()
    {
        for entry in fs::read_dir(path).map_err(io_err("listing", path))? {
            let entry = entry.map_err(io_err("listing", path))?;
            chown_tree(&entry.path(), uid)?;
        }
    }
    Ok(())
}

fn enable(root: &Path, unit_path: &str, unit: &str, target: &str) -> Result<()> {
    let dir = root
        .join("etc/systemd/system")
        .join(format!("{target}.wants"));
    fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    let link = dir.join(unit);
    let _ = fs::remove_file(&link);
    symlink(unit_path, &link).map_err(io_err("linking", &link))
}

/// Everything on the root filesystem: binary, unit, config, model, user, network, first boot.
fn configure_root(
    spec: &ImageSpec,
    root: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<Option<String>> {
    let bin = root.join("usr/bin/edgevlm");
    let bin_dir = root.join("usr/bin");
    fs::create_dir_all(&bin_dir).map_err(io_err("creating", &bin_dir))?;
    fs::copy(&spec.agent_binary, &bin).map_err(io_err("copying the agent binary to", &bin))?;
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).map_err(io_err("chmod", &bin))?;

    // The login user the agent runs as; ssh logins run `edgevlm agent --stdio` as it too.
    let etc = root.join("etc");
    let passwd = fs::read_to_string(etc.join("passwd")).unwrap_or_default();
    if !passwd.lines().any(|l| l.starts_with(&format!("{USER}:"))) {
        append_line(
            &etc.join("passwd"),
            &format!("{USER}:x:{UID}:{UID}:edgevlm agent:/home/{USER}:/bin/bash"),
        )?;
        append_line(&etc.join("shadow"), &format!("{USER}:*:19700:0:99999:7:::"))?;
        append_line(&etc.join("group"), &format!("{USER}:x:{UID}:"))?;
    }
    for (group, gid) in [("video", 44), ("gpio", 997), ("sudo", 27), ("dialout", 20)] {
        add_to_group(&etc.join("group"), group, gid, USER)?;
    }
    write(
        &etc.join("sudoers.d/edgevlm"),
        &format!("{USER} ALL=(ALL) NOPASSWD:ALL\n"),
        0o440,
    )?;
    // GPIO character devices for the gpio group (Debian leaves them root-only).
    write(
        &etc.join("udev/rules.d/60-edgevlm-gpio.rules"),
        "SUBSYSTEM==\"gpio\", KERNEL==\"gpiochip*\", GROUP=\"gpio\", MODE=\"0660\"\n",
        0o644,
    )?;
    let home = root.join("home").join(USER);
    let mut keys = spec.ssh_keys.join("\n");
    if !keys.is_empty() {
        keys.push('\n');
    }
    write(&home.join(".ssh/authorized_keys"), &keys, 0o600)?;
    fs::set_permissions(home.join(".ssh"), fs::Permissions::from_mode(0o700))
        .map_err(io_err("chmod", &home))?;
    chown_tree(&home, UID)?;

    write(
        &etc.join("hostname"),
        &format!("{}\n", spec.hostname),
        0o644,
    )?;
    write(
        &etc.join("hosts"),
        &format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{}\n::1\t\tlocalhost ip6-localhost ip6-loopback\n",
            spec.hostname
        ),
        0o644,
    )?;
    write(
        &etc.join("fstab"),
        &format!(
            "LABEL={ROOT_LABEL}\t/\text4\tdefaults,noatime\t0\t1\n\
             LABEL={BOOT_LABEL}\t/boot/firmware\tvfat\tdefaults,nofail\t0\t2\n"
        ),
        0o644,
    )?;
    fs::create_dir_all(root.join("boot/firmware")).map_err(io_err("creating", root))?;

    // DHCP on every wired interface (end0 on a Pi 4, eth0 elsewhere) and on Wi-Fi.
    write(
        &etc.join("systemd/network/80-edgevlm-wired.network"),
        "[Match]\nName=e*\n\n[Network]\nDHCP=yes\n",
        0o644,
    )?;
    enable(
        root,
        "/lib/systemd/system/systemd-networkd.service",
        "systemd-networkd.service",
        "multi-user.target",
    )?;
    if let Some(w) = &spec.wifi {
        write(
            &etc.join("wpa_supplicant/wpa_supplicant-wlan0.conf"),
            &format!(
                "ctrl_interface=DIR=/run/wpa_supplicant GROUP=netdev\nupdate_config=0\n\n\
                 network={{\n\tssid=\"{}\"\n\tpsk=\"{}\"\n}}\n",
                w.ssid, w.psk
            ),
            0o600,
        )?;
        write(
            &etc.join("systemd/network/80-edgevlm-wifi.network"),
            "[Match]\nName=wl*\n\n[Network]\nDHCP=yes\n",
            0o644,
        )?;
        enable(
            root,
            "/lib/systemd/system/wpa_supplicant@.service",
            "wpa_supplicant@wlan0.service",
            "multi-user.target",
        )?;
    }

    // Every board gets its own ssh host keys and machine id at first boot.
    for entry in fs::read_dir(etc.join("ssh"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with("ssh_host_"))
        {
            let _ = fs::remove_file(entry.path());
        }
    }
    write(&etc.join("machine-id"), "", 0o444)?;
    write(
        &root.join("usr/lib/edgevlm/firstboot"),
        FIRSTBOOT_SCRIPT,
        0o755,
    )?;
    write(
        &etc.join("systemd/system/edgevlm-firstboot.service"),
        FIRSTBOOT_UNIT,
        0o644,
    )?;
    enable(
        root,
        "/etc/systemd/system/edgevlm-firstboot.service",
        "edgevlm-firstboot.service",
        "multi-user.target",
    )?;

    if let Some(serial) = &spec.serial_agent {
        let unit = format!(
            "# edgevlm image: the protocol agent on /dev/{dev} (edgevlm push / bench over serial)\n\
             [Unit]\nDescription=edgevlm protocol agent on /dev/{dev}\nAfter=local-fs.target\n\n\
             [Service]\nExecStart=/usr/bin/edgevlm agent --serial /dev/{dev} --baud {baud} \
             --store /{STORE}\nUser={USER}\nRestart=always\nRestartSec=2\n\n\
             [Install]\nWantedBy=multi-user.target\n",
            dev = serial.device,
            baud = serial.baud
        );
        write(
            &etc.join("systemd/system/edgevlm-serial.service"),
            &unit,
            0o644,
        )?;
        enable(
            root,
            "/etc/systemd/system/edgevlm-serial.service",
            "edgevlm-serial.service",
            "multi-user.target",
        )?;
        // No login prompt on the line, and the agent's user may open it.
        let getty = etc.join(format!(
            "systemd/system/serial-getty@{}.service",
            serial.device
        ));
        let _ = fs::remove_file(&getty);
        symlink("/dev/null", &getty).map_err(io_err("masking", &getty))?;
        write(
            &etc.join("udev/rules.d/60-edgevlm-serial.rules"),
            &format!(
                "KERNEL==\"{}\", GROUP=\"dialout\", MODE=\"0660\"\n",
                serial.device
            ),
            0o644,
        )?;
    }

    // The agent: unit, config, state directory with the model store.
    write(
        &etc.join("systemd/system/edgevlm-agent.service"),
        AGENT_UNIT,
        0o644,
    )?;
    enable(
        root,
        "/etc/systemd/system/edgevlm-agent.service",
        "edgevlm-agent.service",
        "multi-user.target",
    )?;
    let state = root.join("var/lib/edgevlm");
    fs::create_dir_all(state.join("ng")).map_err(io_err("creating", &state))?;
    let mut model = None;
    let mut package = String::from("/var/lib/edgevlm/models/active");
    if let Some(dir) = &spec.model {
        let store_dir = root.join(STORE);
        let store = ModelStore::open(&store_dir).map_err(|source| ImageError::Model {
            path: dir.clone(),
            source,
        })?;
        let entry = store
            .install_dir(dir)
            .and_then(|e| store.activate(&e.name, &e.version).map(|()| e))
            .map_err(|source| ImageError::Model {
                path: dir.clone(),
                source,
            })?;
        log(&format!(
            "model {} {} preinstalled and active",
            entry.name, entry.version
        ));
        package = format!("/{STORE}/models/{}/{}", entry.name, entry.version);
        model = Some(format!("{} {}", entry.name, entry.version));
    }
    chown_tree(&state, UID)?;
    write(
        &etc.join("edgevlm/agent.toml"),
        &agent_config(spec.board, &package),
        0o644,
    )?;
    Ok(model)
}

/// The dist agent config with this board's profile and model package.
fn agent_config(board: Board, package: &str) -> String {
    AGENT_CONFIG
        .lines()
        .map(|line| {
            if line.starts_with("profile = ") {
                format!(
                    "profile = \"{}\"                # built-in: rpi4, rpi5, jetson-orin-nano; or a path to a profile TOML",
                    board.profile()
                )
            } else if line.starts_with("package = ") {
                format!("package = \"{package}\"")
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// Boot partition contents: Pi firmware (a Pi 4's; a Pi 5 has its own in EEPROM), kernel,
/// initrd, device trees, config.txt, cmdline.txt.
fn stage_boot(
    board: Board,
    serial_agent: Option<&SerialAgent>,
    root: &Path,
    kernel: &str,
    boot: &Path,
) -> Result<()> {
    fs::create_dir_all(boot).map_err(io_err("creating", boot))?;
    if board == Board::Rpi4 {
        let firmware = root.join("usr/lib/raspi-firmware");
        let mut copied = 0;
        for entry in fs::read_dir(&firmware).map_err(io_err(
            "listing the Pi firmware (raspi-firmware) in",
            &firmware,
        ))? {
            let entry = entry.map_err(io_err("listing", &firmware))?;
            if entry.path().is_file() {
                fs::copy(entry.path(), boot.join(entry.file_name()))
                    .map_err(io_err("copying", &entry.path()))?;
                copied += 1;
            }
        }
        if copied == 0 {
            return Err(bad(
                "base rootfs",
                "usr/lib/raspi-firmware holds no firmware",
            ));
        }
    }
    for (from, to) in [
        (format!("boot/vmlinuz-{kernel}"), "vmlinuz"),
        (format!("boot/initrd.img-{kernel}"), "initrd.img"),
    ] {
        let src = root.join(&from);
        fs::copy(&src, boot.join(to)).map_err(io_err("copying", &src))?;
    }
    let dtbs = root.join(format!("usr/lib/linux-image-{kernel}/broadcom"));
    let wanted = board.dtb();
    let family = match board {
        Board::Rpi4 => "bcm27",
        Board::Rpi5 => "bcm2712",
    };
    let mut found = false;
    for entry in fs::read_dir(&dtbs)
        .map_err(io_err("listing device trees in", &dtbs))?
        .flatten()
    {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(family) && name.ends_with(".dtb") {
            found |= name == wanted;
            fs::copy(entry.path(), boot.join(&*name)).map_err(io_err("copying", &entry.path()))?;
        }
    }
    if !found {
        return Err(bad(
            "base rootfs",
            format!(
                "the kernel has no device tree {wanted} in {}",
                dtbs.display()
            ),
        ));
    }
    match board {
        Board::Rpi4 => write(
            &boot.join("config.txt"),
            "# edgevlm image: Debian's arm64 kernel with the upstream device trees\n\
             arm_64bit=1\nupstream_kernel=1\nenable_uart=1\n\
             kernel=vmlinuz\ninitramfs initrd.img followkernel\n",
            0o644,
        )?,
        Board::Rpi5 => {
            // Boards with the D0 stepping of BCM2712 (2 GB, 16 GB, later 4 and 8 GB) need
            // its own tree; the firmware looks for it under Raspberry Pi OS's name.
            let d0 = dtbs.join("bcm2712-d-rpi-5-b.dtb");
            if d0.is_file() {
                fs::copy(&d0, boot.join("bcm2712d0-rpi-5-b.dtb"))
                    .map_err(io_err("copying", &d0))?;
            }
            write(&boot.join("config.txt"), PI5_CONFIG_TXT, 0o644)?;
        }
    }
    // The kernel console stays off the UART when the protocol agent has it. A Pi 5's
    // console UART is the 3-pin debug connector (ttyAMA10, serial10 in its device tree).
    let uart_console = match (board, serial_agent) {
        (Board::Rpi4, Some(s)) if matches!(s.device.as_str(), "ttyAMA0" | "ttyS0" | "serial0") => {
            ""
        }
        (Board::Rpi4, _) => "console=serial0,115200 ",
        (Board::Rpi5, Some(s)) if s.device == "ttyAMA10" => "",
        (Board::Rpi5, _) => "console=ttyAMA10,115200 ",
    };
    write(
        &boot.join("cmdline.txt"),
        &format!(
            "{uart_console}console=tty1 root=LABEL={ROOT_LABEL} rootfstype=ext4 \
             fsck.repair=yes rootwait\n"
        ),
        0o644,
    )
}

/// A Raspberry Pi 5's config.txt. The bootloader in the board's EEPROM reads it (a Pi 5 needs
/// no start*.elf) and picks the device tree by the board: bcm2712-rpi-5-b.dtb, or
/// bcm2712d0-rpi-5-b.dtb on D0-stepping boards. The image's kernel hook
/// (`/usr/lib/edgevlm/update-boot-firmware`) keeps the file names current and leaves this
/// file alone.
const PI5_CONFIG_TXT: &str = "\
# edgevlm image for a Raspberry Pi 5: Debian's arm64 kernel (from trixie-backports) with the
# upstream device trees. Kernel upgrades replace vmlinuz, initrd.img and the .dtb files only.
arm_64bit=1
upstream_kernel=1
enable_uart=1
kernel=vmlinuz
initramfs initrd.img followkernel
";

fn make_vfat(dir: &Path, img: &Path) -> Result<()> {
    let mut mkfs = Command::new("mkfs.vfat");
    mkfs.args(["-F", "32", "-n", BOOT_LABEL, "-C"])
        .arg(img)
        .arg((BOOT_SIZE / 1024).to_string());
    run(mkfs, "mkfs.vfat", None)?;
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err("listing", dir))?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    let mut mcopy = Command::new("mcopy");
    mcopy
        .args(["-s", "-p", "-i"])
        .arg(img)
        .args(&entries)
        .arg("::/");
    run(mcopy, "mcopy onto the boot partition", None)
}

/// Bytes the files below `dir` take in 4 KiB blocks, and their count.
fn tree_size(dir: &Path) -> Result<(u64, u64)> {
    let mut bytes = 0;
    let mut count = 0;
    for entry in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let entry = entry.map_err(io_err("listing", dir))?;
        let meta = fs::symlink_metadata(entry.path()).map_err(io_err("reading", &entry.path()))?;
        count += 1;
        bytes += meta.size().div_ceil(4096) * 4096;
        if meta.is_dir() {
            let (b, c) = tree_size(&entry.path())?;
            bytes += b;
            count += c;
        }
    }
    Ok((bytes, count))
}

fn make_ext4(root: &Path, img: &Path) -> Result<u64> {
    let (bytes, files) = tree_size(root)?;
    // Contents + a quarter + inode tables + 256 MiB free; the first boot grows it to the card.
    let size = (bytes + bytes / 4 + files * 512 + 256 * MIB).div_ceil(MIB) * MIB;
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-L", ROOT_LABEL, "-d"])
        .arg(root)
        .arg(img)
        .arg(format!("{}k", size / 1024));
    run(mkfs, "mkfs.ext4 -d", None)?;
    Ok(size)
}

/// The disk: an MBR (sfdisk), the boot partition at 4 MiB, the root partition after it.
fn assemble(boot: &Path, root: &Path, root_bytes: u64, img: &Path) -> Result<()> {
    let total = BOOT_OFFSET + BOOT_SIZE + root_bytes;
    let file = File::create(img).map_err(io_err("creating", img))?;
    file.set_len(total).map_err(io_err("sizing", img))?;
    drop(file);
    let script = format!(
        "label: dos\nunit: sectors\n\
         start={}, size={}, type=c, bootable\nstart={}, size={}, type=83\n",
        BOOT_OFFSET / 512,
        BOOT_SIZE / 512,
        (BOOT_OFFSET + BOOT_SIZE) / 512,
        root_bytes / 512
    );
    let mut sfdisk = Command::new("sfdisk");
    sfdisk
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(img);
    run(sfdisk, "sfdisk", Some(&script))?;
    let mut out = OpenOptions::new()
        .write(true)
        .open(img)
        .map_err(io_err("opening", img))?;
    for (part, offset) in [(boot, BOOT_OFFSET), (root, BOOT_OFFSET + BOOT_SIZE)] {
        let mut src = File::open(part).map_err(io_err("opening", part))?;
        out.seek(SeekFrom::Start(offset))
            .map_err(io_err("seeking in", img))?;
        io::copy(&mut src, &mut out).map_err(io_err("writing a partition into", img))?;
    }
    out.sync_all().map_err(io_err("syncing", img))
}

/// Moves the finished image to `out` (compressing with xz for `.xz`).
fn finish(img: &Path, out: &Path, log: &mut dyn FnMut(&str)) -> Result<(PathBuf, u64)> {
    if out.extension().is_some_and(|e| e == "xz") {
        log("compressing with xz");
        let mut xz = Command::new("xz");
        xz.args(["-T0", "-6", "-f"]).arg(img);
        run(xz, "xz", None)?;
        let compressed = PathBuf::from(format!("{}.xz", img.display()));
        fs::rename(&compressed, out).map_err(io_err("moving the image to", out))?;
    } else {
        fs::rename(img, out).map_err(io_err("moving the image to", out))?;
    }
    let bytes = fs::metadata(out).map_err(io_err("reading", out))?.len();
    Ok((out.to_owned(), bytes))
}

const AGENT_UNIT: &str = include_str!("../../../runtime/agent/dist/edgevlm-agent.service");
const AGENT_CONFIG: &str = include_str!("../../../runtime/agent/dist/agent.toml");

const FIRSTBOOT_UNIT: &str = "\
# edgevlm image: first-boot setup (ssh host keys, machine id, root partition grown to the card)
[Unit]
Description=edgevlm first-boot setup
DefaultDependencies=no
After=local-fs.target
Before=ssh.service sysinit.target
ConditionPathExists=/usr/lib/edgevlm/firstboot

[Service]
Type=oneshot
ExecStart=/usr/lib/edgevlm/firstboot
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
";

const FIRSTBOOT_SCRIPT: &str = r#"#!/bin/sh
# edgevlm image, first boot: fresh ssh host keys and machine id, then the root partition and
# filesystem grown to the whole card. Runs once: it disables itself at the end.
set -u
ssh-keygen -A
[ -s /etc/machine-id ] || systemd-machine-id-setup
root=$(findmnt -n -o SOURCE /)
disk=/dev/$(lsblk -n -o PKNAME "$root" 2>/dev/null | head -1)
part=$(cat "/sys/class/block/$(basename "$root")/partition" 2>/dev/null || echo 2)
if [ -b "$disk" ] && growpart "$disk" "$part"; then
  resize2fs "$root"
fi
systemctl disable edgevlm-firstboot.service
rm -f /usr/lib/edgevlm/firstboot
"#;
