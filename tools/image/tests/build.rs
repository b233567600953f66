//! `edgevlm_image::build` through its real tools (tar, mkfs.vfat + mcopy, mkfs.ext4 -d, sfdisk)
//! on a small stand-in for the arm64 rootfs, then the image read back with mtools and debugfs:
//! partition table, boot files, and every file the builder adds to the root filesystem.
//! (`ci/emulated-board.sh` builds from the real mmdebstrap rootfs and boots it.)

use std::path::{Path, PathBuf};
use std::process::Command;

use edgevlm_image::{build, Board, ImageError, ImageSpec, SerialAgent, Wifi};

const KERNEL: &str = "6.1.0-99-arm64";
const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGVkZ2V2bG0tdGVzdC1rZXktbm90LXJlYWw test@host";

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

fn tools_present() -> bool {
    [
        "mkfs.vfat",
        "mcopy",
        "mdir",
        "mtype",
        "mkfs.ext4",
        "debugfs",
        "sfdisk",
    ]
    .iter()
    .all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Skips (returns false) only outside CI when root or a tool is missing.
fn can_run() -> bool {
    if is_root() && tools_present() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI must run the image builder test as root with dosfstools, mtools, e2fsprogs, fdisk"
    );
    eprintln!("skipped: needs root and dosfstools, mtools, e2fsprogs, fdisk");
    false
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A tarball with what the builder needs from the real rootfs.
fn base_tar(dir: &Path, with_kernel: bool) -> PathBuf {
    let root = dir.join("base");
    common_root(&root);
    write(
        &root.join("usr/lib/raspi-firmware/start4.elf"),
        &[0x5a; 4096],
    );
    write(
        &root.join("usr/lib/raspi-firmware/fixup4.dat"),
        &[0x11; 512],
    );
    if with_kernel {
        write(&root.join(format!("boot/vmlinuz-{KERNEL}")), &[0x4b; 8192]);
        write(
            &root.join(format!("boot/initrd.img-{KERNEL}")),
            &[0x49; 8192],
        );
    }
    for dtb in [
        "bcm2711-rpi-4-b.dtb",
        "bcm2712-rpi-5-b.dtb",
        "bcm2837-rpi-3-b.dtb",
    ] {
        write(
            &root.join(format!("usr/lib/linux-image-{KERNEL}/broadcom/{dtb}")),
            dtb.as_bytes(),
        );
    }
    let tar = dir.join(if with_kernel {
        "base.tar"
    } else {
        "nokernel.tar"
    });
    pack(&root, &tar)
}

/// What every stand-in rootfs has: the files of /etc the builder edits, ssh host keys and a
/// machine id it must remove.
fn common_root(root: &Path) {
    write(
        &root.join("etc/passwd"),
        b"root:x:0:0:root:/root:/bin/bash\n",
    );
    write(&root.join("etc/shadow"), b"root:*:19700:0:99999:7:::\n");
    write(
        &root.join("etc/group"),
        b"root:x:0:\nsudo:x:27:\nvideo:x:44:\n",
    );
    write(
        &root.join("etc/ssh/ssh_host_ed25519_key"),
        b"a host key every board must not share\n",
    );
    write(&root.join("etc/ssh/sshd_config"), b"# sshd\n");
    write(
        &root.join("etc/machine-id"),
        b"0123456789abcdef0123456789abcdef\n",
    );
}

/// `root` as a tarball at `tar` (the directory is removed).
fn pack(root: &Path, tar: &Path) -> PathBuf {
    let ok = Command::new("tar")
        .arg("-cf")
        .arg(tar)
        .args(["--numeric-owner", "-C"])
        .arg(root)
        .arg(".")
        .status()
        .unwrap();
    assert!(ok.success());
    std::fs::remove_dir_all(root).unwrap();
    tar.to_owned()
}

/// A Raspberry Pi 5 kernel's version, laid out as trixie-backports' 7.x packages lay it out
/// (dtbs under /usr/lib/modules/V/dtb, /usr/lib/linux-image-V a link to them).
const PI5_KERNEL: &str = "7.3.4+deb13-arm64";
/// Every module the builder looks for on a Pi 5.
const PI5_MODULES: &[&str] = &[
    "mmc/host/sdhci-brcmstb",
    "misc/rp1/rp1_pci",
    "clk/clk-rp1",
    "pinctrl/pinctrl-rp1",
    "net/ethernet/cadence/macb",
    "usb/dwc3/dwc3",
    "hwmon/pwm-fan",
];
/// Every device tree node the builder looks for on a Pi 5 (compatible strings, a node name).
const PI5_NODES: &[&str] = &[
    "brcm,bcm2712-sdhci",
    "raspberrypi,rp1-gpio",
    "raspberrypi,rp1-gem",
    "snps,dwc3",
    "serial@40030000",
    "pwm-fan",
];

/// A stand-in Pi 5 rootfs (no raspi-firmware blobs: a Pi 5 boots from its EEPROM) whose
/// kernel has the given modules and whose device tree has the given nodes.
fn pi5_base_tar(dir: &Path, name: &str, modules: &[&str], nodes: &[&str]) -> PathBuf {
    let root = dir.join(name);
    common_root(&root);
    write(
        &root.join(format!("boot/vmlinuz-{PI5_KERNEL}")),
        &[0x35; 8192],
    );
    write(
        &root.join(format!("boot/initrd.img-{PI5_KERNEL}")),
        &[0x49; 4096],
    );
    let modules_dir = root.join(format!("usr/lib/modules/{PI5_KERNEL}"));
    // One driver built in, the others as compressed module files.
    let (builtin, files) = modules
        .split_first()
        .map_or((None, modules), |(b, f)| (Some(b), f));
    write(
        &modules_dir.join("modules.builtin"),
        builtin
            .map(|b| format!("kernel/drivers/{b}.ko\n"))
            .unwrap_or_default()
            .as_bytes(),
    );
    for m in files {
        write(
            &modules_dir.join(format!("kernel/drivers/{m}.ko.xz")),
            b"xz",
        );
    }
    let mut tree = b"\xd0\x0d\xfe\xed model Raspberry Pi 5\0".to_vec();
    for n in nodes {
        tree.extend_from_slice(n.as_bytes());
        tree.push(0);
    }
    for (dtb, bytes) in [
        ("bcm2712-rpi-5-b.dtb", tree.clone()),
        ("bcm2712-d-rpi-5-b.dtb", [&tree[..], b"d0"].concat()),
        ("bcm2711-rpi-4-b.dtb", b"pi4".to_vec()),
    ] {
        write(&modules_dir.join(format!("dtb/broadcom/{dtb}")), &bytes);
    }
    std::os::unix::fs::symlink(
        format!("modules/{PI5_KERNEL}/dtb"),
        root.join(format!("usr/lib/linux-image-{PI5_KERNEL}")),
    )
    .unwrap();
    pack(&root, &dir.join(format!("{name}.tar")))
}

/// The first 64 bytes of an aarch64 ELF executable: all the builder checks.
fn fake_aarch64_elf(path: &Path) {
    let mut head = vec![0u8; 64];
    head[..4].copy_from_slice(b"\x7fELF");
    head[4] = 2; // 64-bit
    head[5] = 1; // little endian
    head[16] = 3; // ET_DYN
    head[18..20].copy_from_slice(&183u16.to_le_bytes());
    write(path, &head);
}

fn spec(dir: &Path) -> ImageSpec {
    let binary = dir.join("edgevlm-aarch64");
    fake_aarch64_elf(&binary);
    ImageSpec {
        board: Board::Rpi4,
        base: base_tar(dir, true),
        agent_binary: binary,
        model: Some(PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../models/demo"
        ))),
        ssh_keys: vec![KEY.to_owned()],
        hostname: "line3-cam".to_owned(),
        wifi: Some(Wifi {
            ssid: "factory".to_owned(),
            psk: "correct horse battery".to_owned(),
        }),
        serial_agent: Some(SerialAgent {
            device: "ttyAMA0".to_owned(),
            baud: 921_600,
        }),
        out: dir.join("out/edgevlm-rpi4.img"),
    }
}

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn image_has_partitions_boot_files_and_a_configured_root() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec(tmp.path());
    let mut lines = Vec::new();
    let report = build(&spec, &mut |l| lines.push(l.to_owned())).unwrap();
    assert_eq!(report.kernel, KERNEL);
    assert_eq!(report.model.as_deref(), Some("demo-parts 1.0.0"));
    let img = std::fs::read(&report.image).unwrap();
    assert_eq!(img.len() as u64, report.bytes);
    // No work directory is left beside the image.
    let left: Vec<_> = std::fs::read_dir(tmp.path().join("out"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("edgevlm-rpi4.img")],
        "{lines:?}"
    );

    // MBR: FAT32 (LBA) bootable at 4 MiB, Linux after it, the boot signature.
    assert_eq!(&img[510..512], &[0x55, 0xaa]);
    let entry = |i: usize| &img[446 + 16 * i..446 + 16 * (i + 1)];
    let lba = |e: &[u8]| u32::from_le_bytes(e[8..12].try_into().unwrap()) as u64;
    let sectors = |e: &[u8]| u32::from_le_bytes(e[12..16].try_into().unwrap()) as u64;
    assert_eq!(
        (entry(0)[0], entry(0)[4], lba(entry(0))),
        (0x80, 0x0c, 8192)
    );
    assert_eq!(entry(1)[4], 0x83);
    assert_eq!(lba(entry(1)), 8192 + sectors(entry(0)));
    assert_eq!((lba(entry(1)) + sectors(entry(1))) * 512, report.bytes);

    // Boot partition, read with mtools at its offset.
    let boot = format!("{}@@{}", report.image.display(), 8192 * 512);
    let listing = output(Command::new("mdir").args(["-b", "-i", &boot, "::/"]));
    for f in [
        "config.txt",
        "cmdline.txt",
        "vmlinuz",
        "initrd.img",
        "start4.elf",
        "fixup4.dat",
        "bcm2711-rpi-4-b.dtb",
        "bcm2712-rpi-5-b.dtb",
    ] {
        assert!(
            listing.contains(f),
            "{f} missing from the boot partition: {listing}"
        );
    }
    let cmdline = output(Command::new("mtype").args(["-i", &boot, "::/cmdline.txt"]));
    assert!(
        cmdline.contains("root=LABEL=EDGEVLM_ROOT") && cmdline.contains("rootwait"),
        "{cmdline}"
    );
    let config = output(Command::new("mtype").args(["-i", &boot, "::/config.txt"]));
    assert!(
        config.contains("arm_64bit=1") && config.contains("initramfs initrd.img followkernel"),
        "{config}"
    );
    let kernel = output(Command::new("mtype").args(["-i", &boot, "::/vmlinuz"]));
    assert_eq!(kernel.len(), 8192);

    // Root partition, cut out and read with debugfs.
    let root_img = tmp.path().join("root.ext4");
    let start = (lba(entry(1)) * 512) as usize;
    std::fs::write(&root_img, &img[start..]).unwrap();
    let debugfs =
        |request: &str| output(Command::new("debugfs").args(["-R", request]).arg(&root_img));
    assert_eq!(debugfs("cat /etc/hostname"), "line3-cam\n");
    assert!(debugfs("cat /etc/hosts").contains("127.0.1.1\tline3-cam"));
    assert!(debugfs("cat /etc/fstab").contains("LABEL=EDGEVLM_ROOT\t/\text4"));
    assert_eq!(
        debugfs("cat /home/edgevlm/.ssh/authorized_keys"),
        format!("{KEY}\n")
    );
    let keys = debugfs("stat /home/edgevlm/.ssh/authorized_keys");
    assert!(
        keys.contains("User:  1000") && keys.contains("Mode:  0600"),
        "{keys}"
    );
    assert!(debugfs("cat /etc/passwd").contains("edgevlm:x:1000:1000:"));
    let group = debugfs("cat /etc/group");
    for g in [
        "sudo:x:27:edgevlm",
        "video:x:44:edgevlm",
        "gpio:x:997:edgevlm",
        "edgevlm:x:1000:",
    ] {
        assert!(group.contains(g), "{g}: {group}");
    }
    let bin = debugfs("stat /usr/bin/edgevlm");
    assert!(
        bin.contains("Mode:  0755") && bin.contains("Size: 64"),
        "{bin}"
    );
    let agent = debugfs("cat /etc/edgevlm/agent.toml");
    assert!(agent.contains("profile = \"rpi4\""), "{agent}");
    assert!(
        agent.contains("package = \"/var/lib/edgevlm/store/models/demo-parts/1.0.0\""),
        "{agent}"
    );
    assert!(debugfs("cat /var/lib/edgevlm/store/active.toml").contains("demo-parts"));
    let onnx = debugfs("stat /var/lib/edgevlm/store/models/demo-parts/1.0.0/model.onnx");
    assert!(onnx.contains("User:  1000"), "{onnx}");
    let dumped = tmp.path().join("model.onnx");
    debugfs(&format!(
        "dump /var/lib/edgevlm/store/models/demo-parts/1.0.0/model.onnx {}",
        dumped.display()
    ));
    assert!(
        std::fs::read(&dumped).unwrap()
            == std::fs::read(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../models/demo/model.onnx"
            ))
            .unwrap(),
        "the preinstalled model differs from the package"
    );
    assert!(debugfs("cat /etc/systemd/system/edgevlm-agent.service")
        .contains("ExecStart=/usr/bin/edgevlm agent"));
    for unit in [
        "edgevlm-agent.service",
        "edgevlm-firstboot.service",
        "systemd-networkd.service",
        "wpa_supplicant@wlan0.service",
    ] {
        let link = debugfs(&format!(
            "stat /etc/systemd/system/multi-user.target.wants/{unit}"
        ));
        assert!(link.contains("Type: symlink"), "{unit} not enabled: {link}");
    }
    let wifi = debugfs("cat /etc/wpa_supplicant/wpa_supplicant-wlan0.conf");
    assert!(
        wifi.contains("ssid=\"factory\"") && wifi.contains("psk=\"correct horse battery\""),
        "{wifi}"
    );
    // Host keys and machine id are made per board at first boot, not shared by every flash.
    assert!(!debugfs("ls /etc/ssh").contains("ssh_host_"));
    assert_eq!(debugfs("cat /etc/machine-id"), "");
    assert!(debugfs("cat /usr/lib/edgevlm/firstboot").contains("growpart"));
    // The protocol agent on the Pi's UART, with no getty and no kernel console on it.
    let serial = debugfs("cat /etc/systemd/system/edgevlm-serial.service");
    assert!(
        serial.contains("ExecStart=/usr/bin/edgevlm agent --serial /dev/ttyAMA0 --baud 921600 --store /var/lib/edgevlm/store"),
        "{serial}"
    );
    assert!(
        debugfs("stat /etc/systemd/system/multi-user.target.wants/edgevlm-serial.service")
            .contains("Type: symlink")
    );
    let getty = debugfs("stat /etc/systemd/system/serial-getty@ttyAMA0.service");
    assert!(getty.contains("Fast link dest: \"/dev/null\""), "{getty}");
    assert!(debugfs("cat /etc/udev/rules.d/60-edgevlm-serial.rules")
        .contains("KERNEL==\"ttyAMA0\", GROUP=\"dialout\""));
    assert!(!cmdline.contains("console=serial0"), "{cmdline}");
}

#[test]
fn bad_inputs_are_named_and_leave_nothing() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let good = spec(tmp.path());
    let expect = |spec: &ImageSpec, field: &str, needle: &str| {
        let err = build(spec, &mut |_| {}).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(field) && text.contains(needle), "{text}");
        assert!(!spec.out.exists());
        err
    };

    let mut s = good.clone();
    s.agent_binary = PathBuf::from("/bin/sh");
    if std::env::consts::ARCH != "aarch64" {
        expect(&s, "--agent-binary", "not an aarch64 Linux executable");
    }
    let mut s = good.clone();
    s.hostname = "line 3".into();
    expect(&s, "--hostname", "not a hostname");
    let mut s = good.clone();
    s.wifi = Some(Wifi {
        ssid: "f".into(),
        psk: "short".into(),
    });
    expect(&s, "--wifi", "8 to 63");
    let mut s = good.clone();
    s.ssh_keys = vec!["-----BEGIN OPENSSH PRIVATE KEY-----".into()];
    expect(&s, "--ssh-key", "not an OpenSSH public key");
    let mut s = good.clone();
    s.serial_agent = Some(SerialAgent {
        device: "../sda".into(),
        baud: 921_600,
    });
    expect(&s, "--serial-agent", "not a device name");
    let mut s = good.clone();
    s.serial_agent = Some(SerialAgent {
        device: "ttyUSB0".into(),
        baud: 12_345,
    });
    expect(&s, "--serial-agent", "not a supported rate");
    let mut s = good.clone();
    s.base = base_tar(tmp.path(), false);
    expect(&s, "base rootfs", "vmlinuz");
    let mut s = good.clone();
    s.model = Some(tmp.path().join("no-such-package"));
    match build(&s, &mut |_| {}) {
        Err(ImageError::Model { path, .. }) => assert!(path.ends_with("no-such-package")),
        other => panic!("expected a model error, got {other:?}"),
    }
    assert!(!s.out.exists());
    // The work directory beside --out is gone too.
    let left = std::fs::read_dir(tmp.path().join("out")).map_or(0, |d| d.count());
    assert_eq!(left, 0);
}

/// The boot partition of `image` as an mtools image spec.
fn boot_of(image: &Path) -> String {
    format!("{}@@{}", image.display(), 8192 * 512)
}

#[test]
fn rpi5_image_boots_the_pi5_kernel_from_its_eeprom_bootloader() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = spec(tmp.path());
    spec.board = Board::Rpi5;
    spec.base = pi5_base_tar(tmp.path(), "pi5", PI5_MODULES, PI5_NODES);
    spec.serial_agent = None;
    spec.out = tmp.path().join("out/edgevlm-rpi5.img");
    let mut lines = Vec::new();
    let report = build(&spec, &mut |l| lines.push(l.to_owned())).unwrap();
    assert_eq!(report.kernel, PI5_KERNEL);
    // Every part is there: nothing to warn about.
    assert_eq!(report.warnings, Vec::<String>::new(), "{lines:?}");
    assert!(!lines.iter().any(|l| l.starts_with("warning")), "{lines:?}");

    let boot = boot_of(&report.image);
    let listing = output(Command::new("mdir").args(["-b", "-i", &boot, "::/"]));
    let mut names: Vec<&str> = listing
        .lines()
        .map(|l| l.trim_start_matches("::/").trim())
        .collect();
    names.sort();
    // Kernel, initrd, the Pi 5 trees (the D0 stepping's also under Raspberry Pi OS's name),
    // the two text files; no Pi 4 firmware or trees.
    assert_eq!(
        names,
        [
            "bcm2712-d-rpi-5-b.dtb",
            "bcm2712-rpi-5-b.dtb",
            "bcm2712d0-rpi-5-b.dtb",
            "cmdline.txt",
            "config.txt",
            "initrd.img",
            "vmlinuz"
        ],
        "{listing}"
    );
    let d0 = output(Command::new("mtype").args(["-i", &boot, "::/bcm2712d0-rpi-5-b.dtb"]));
    assert!(
        d0.ends_with("d0") && d0.contains("raspberrypi,rp1-gpio"),
        "{d0}"
    );
    let config = output(Command::new("mtype").args(["-i", &boot, "::/config.txt"]));
    let settings: Vec<&str> = config
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    assert_eq!(
        settings,
        [
            "arm_64bit=1",
            "upstream_kernel=1",
            "enable_uart=1",
            "kernel=vmlinuz",
            "initramfs initrd.img followkernel"
        ],
        "{config}"
    );
    let cmdline = output(Command::new("mtype").args(["-i", &boot, "::/cmdline.txt"]));
    assert!(
        cmdline.starts_with("console=ttyAMA10,115200 console=tty1 root=LABEL=EDGEVLM_ROOT ")
            && cmdline.contains("rootwait"),
        "{cmdline}"
    );
    let kernel = output(Command::new("mtype").args(["-i", &boot, "::/vmlinuz"]));
    assert_eq!(kernel.len(), 8192);

    // The agent runs with the Pi 5's board profile.
    let img = std::fs::read(&report.image).unwrap();
    let root_img = tmp.path().join("root.ext4");
    std::fs::write(&root_img, &img[((8192 + 256 * 2048) * 512) as usize..]).unwrap();
    let agent = output(
        Command::new("debugfs")
            .args(["-R", "cat /etc/edgevlm/agent.toml"])
            .arg(&root_img),
    );
    assert!(agent.contains("profile = \"rpi5\""), "{agent}");

    // The protocol agent on the debug UART: the kernel console leaves it.
    spec.serial_agent = Some(SerialAgent {
        device: "ttyAMA10".to_owned(),
        baud: 115_200,
    });
    std::fs::remove_file(&report.image).unwrap();
    let report = build(&spec, &mut |_| {}).unwrap();
    let cmdline =
        output(Command::new("mtype").args(["-i", &boot_of(&report.image), "::/cmdline.txt"]));
    assert!(
        cmdline.starts_with("console=tty1 root=LABEL=EDGEVLM_ROOT "),
        "{cmdline}"
    );
}

#[test]
fn rpi5_image_names_what_its_kernel_cannot_drive() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = spec(tmp.path());
    spec.board = Board::Rpi5;
    spec.out = tmp.path().join("out/edgevlm-rpi5.img");

    // A kernel with the SD card and USB but no RP1 GPIO or Ethernet, and a tree without the
    // header UART or the fan: the image is built, with one warning per part.
    spec.base = pi5_base_tar(
        tmp.path(),
        "no-rp1-gpio",
        &[
            "mmc/host/sdhci-brcmstb",
            "misc/rp1/rp1_pci",
            "clk/clk-rp1",
            "usb/dwc3/dwc3",
        ],
        &["brcm,bcm2712-sdhci", "snps,dwc3", "raspberrypi,rp1-gem"],
    );
    let mut lines = Vec::new();
    let report = build(&spec, &mut |l| lines.push(l.to_owned())).unwrap();
    let w = &report.warnings;
    assert_eq!(w.len(), 5, "{w:#?}");
    assert!(
        w[0].starts_with("the 40-pin GPIO header")
            && w[0].contains(&format!("Linux {PI5_KERNEL}"))
            && w[0].contains("no pinctrl-rp1 driver")
            && w[0].contains("no raspberrypi,rp1-gpio node"),
        "{w:#?}"
    );
    assert!(
        w[1].starts_with("Ethernet") && w[1].contains("no macb driver") && !w[1].contains("node"),
        "{w:#?}"
    );
    assert!(
        w[2].starts_with("the 40-pin header's UART (ttyAMA0)"),
        "{w:#?}"
    );
    assert!(w[3].starts_with("the fan connector"), "{w:#?}");
    // The spec's serial agent is on ttyAMA0, which this kernel does not make on a Pi 5.
    assert!(w[4].starts_with("--serial-agent ttyAMA0"), "{w:#?}");
    for warning in w {
        assert!(lines.contains(&format!("warning: {warning}")), "{lines:?}");
    }
    assert!(spec.out.exists());
    std::fs::remove_file(&spec.out).unwrap();

    // Without the SD card's driver the board would not find its root: no image.
    spec.base = pi5_base_tar(tmp.path(), "no-sd", &["misc/rp1/rp1_pci"], PI5_NODES);
    let err = build(&spec, &mut |_| {}).unwrap_err().to_string();
    assert!(
        err.contains("the SD card will not work") && err.contains("no sdhci-brcmstb driver"),
        "{err}"
    );
    assert!(!spec.out.exists());

    // A rootfs like bookworm's (6.1, none of the Pi 5's drivers) is refused too.
    spec.base = base_tar(tmp.path(), true);
    let err = build(&spec, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("sdhci-brcmstb"), "{err}");
}
