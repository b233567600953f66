//! What the board is: CPU and RAM facts for the handshake ([`edgevlm_proto::AgentHello`]).
//!
//! Read from `/proc` and `/sys`; every reader has a pure parser beside it so that the ARM
//! variants of `/proc/cpuinfo` are tested on any machine.

use std::fs;

use edgevlm_proto::{bounded, CpuInfo};

/// Longest architecture string of [`CpuInfo::arch`].
const MAX_ARCH: usize = 16;

/// Names of Arm Ltd. cores (implementer `0x41`) by `CPU part`, for the boards edgevlm targets
/// and their neighbours.
const ARM_PARTS: &[(u32, &str)] = &[
    (0xd03, "Cortex-A53"),
    (0xd04, "Cortex-A35"),
    (0xd05, "Cortex-A55"),
    (0xd07, "Cortex-A57"),
    (0xd08, "Cortex-A72"),
    (0xd09, "Cortex-A73"),
    (0xd0a, "Cortex-A75"),
    (0xd0b, "Cortex-A76"),
    (0xd0c, "Neoverse-N1"),
    (0xd0d, "Cortex-A77"),
    (0xd41, "Cortex-A78"),
    (0xd42, "Cortex-A78AE"),
    (0xd44, "Cortex-X1"),
    (0xd46, "Cortex-A510"),
    (0xd47, "Cortex-A710"),
    (0xd4b, "Cortex-A78C"),
];

/// The CPU of this machine: architecture, core model and online cores.
pub fn cpu_info() -> CpuInfo {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cores = fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| parse_cpu_list(&s))
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    CpuInfo {
        arch: bounded::<MAX_ARCH>(std::env::consts::ARCH),
        model: bounded(&cpu_model(&cpuinfo)),
        cores: u16::try_from(cores).unwrap_or(u16::MAX),
    }
}

/// `(MemTotal, MemAvailable)` in KiB from `/proc/meminfo`, 0 where unknown.
pub fn memory_kib() -> (u64, u64) {
    let text = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    (
        meminfo_field(&text, "MemTotal:").unwrap_or(0),
        meminfo_field(&text, "MemAvailable:").unwrap_or(0),
    )
}

/// The core model named by `/proc/cpuinfo`: its `model name` (x86, some ARM kernels), else the
/// Arm core names of its `CPU part` lines (`Cortex-A76`, or `Cortex-A55 + Cortex-A76` on
/// big.LITTLE chips; also preferred over 32-bit ARM's generic `ARMv7 Processor` model name),
/// else the board's `Model` line, else empty.
pub fn cpu_model(cpuinfo: &str) -> String {
    let model_name = field_values(cpuinfo, "model name")
        .next()
        .map(collapse_spaces);
    // 32-bit ARM kernels print a generic `ARMv7 Processor rev 3 (v7l)`: the part says more.
    match model_name {
        Some(name) if !name.starts_with("ARMv") => return name,
        _ => {}
    }
    let mut names: Vec<String> = Vec::new();
    let mut implementer = None;
    for line in cpuinfo.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key.trim() {
            "CPU implementer" => implementer = parse_hex(value.trim()),
            "CPU part" => {
                let Some(part) = parse_hex(value.trim()) else {
                    continue;
                };
                let name = match (implementer, ARM_PARTS.iter().find(|(p, _)| *p == part)) {
                    (Some(0x41) | None, Some((_, name))) => (*name).to_owned(),
                    (Some(imp), _) => format!("{imp:#04x}/{part:#05x}"),
                    (None, None) => format!("part {part:#05x}"),
                };
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            _ => {}
        }
    }
    if !names.is_empty() {
        return names.join(" + ");
    }
    model_name
        .or_else(|| field_values(cpuinfo, "Model").next().map(collapse_spaces))
        .unwrap_or_default()
}

/// Number of CPUs in a kernel CPU list such as `0-3,6,8-9` (`/sys/devices/system/cpu/online`).
pub fn parse_cpu_list(list: &str) -> Option<usize> {
    let mut count = 0usize;
    for range in list.trim().split(',') {
        let (lo, hi) = match range.split_once('-') {
            Some((lo, hi)) => (lo.trim().parse::<usize>().ok()?, hi.trim().parse().ok()?),
            None => {
                let n = range.trim().parse::<usize>().ok()?;
                (n, n)
            }
        };
        count += hi.checked_sub(lo)? + 1;
    }
    (count > 0).then_some(count)
}

/// The value of a `Name:   1234 kB` line of `/proc/meminfo`.
fn meminfo_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Values of every `key : value` line whose key is exactly `key`.
fn field_values<'a>(text: &'a str, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    text.lines().filter_map(move |line| {
        let (k, v) = line.split_once(':')?;
        let v = v.trim();
        (k.trim() == key && !v.is_empty()).then_some(v)
    })
}

fn parse_hex(s: &str) -> Option<u32> {
    u32::from_str_radix(s.strip_prefix("0x").unwrap_or(s), 16).ok()
}

fn collapse_spaces(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x86_model_name() {
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)  Platinum 8488C\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R)  Platinum 8488C\n";
        assert_eq!(cpu_model(text), "Intel(R) Xeon(R) Platinum 8488C");
    }

    #[test]
    fn raspberry_pi_5_cpu_part() {
        let core = |n: u32| {
            format!(
                "processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n"
            )
        };
        let text = (0..4).map(core).collect::<String>()
            + "Revision\t: d04170\nSerial\t\t: 1234\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n";
        assert_eq!(cpu_model(&text), "Cortex-A76");
    }

    #[test]
    fn big_little_and_other_parts() {
        let text = "CPU implementer\t: 0x41\nCPU part\t: 0xd05\nCPU implementer\t: 0x41\nCPU part\t: 0xd05\nCPU implementer\t: 0x41\nCPU part\t: 0xd0b\n";
        assert_eq!(cpu_model(text), "Cortex-A55 + Cortex-A76");
        for (part, name) in [
            ("0xd03", "Cortex-A53"),
            ("0xd08", "Cortex-A72"),
            ("0xd42", "Cortex-A78AE"),
        ] {
            let text = format!("CPU implementer\t: 0x41\nCPU part\t: {part}\n");
            assert_eq!(cpu_model(&text), name);
        }
        // Another implementer's part numbers mean something else: report the raw ids.
        assert_eq!(
            cpu_model("CPU implementer\t: 0x51\nCPU part\t: 0xd0b\n"),
            "0x51/0xd0b"
        );
    }

    #[test]
    fn raspberry_pi_4_on_a_32_bit_kernel() {
        let text = "processor\t: 0\nmodel name\t: ARMv7 Processor rev 3 (v7l)\nCPU implementer\t: 0x41\nCPU architecture: 7\nCPU part\t: 0xd08\n\nHardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n";
        assert_eq!(cpu_model(text), "Cortex-A72");
        assert_eq!(
            cpu_model("model name\t: ARMv7 Processor rev 3 (v7l)\n"),
            "ARMv7 Processor rev 3 (v7l)"
        );
    }

    #[test]
    fn falls_back_to_board_model_line_then_empty() {
        assert_eq!(
            cpu_model("processor\t: 0\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"),
            "Raspberry Pi 4 Model B Rev 1.4"
        );
        assert_eq!(cpu_model("processor\t: 0\n"), "");
        assert_eq!(cpu_model(""), "");
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3\n"), Some(4));
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-3,6,8-9"), Some(7));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn this_machine() {
        let cpu = cpu_info();
        assert_eq!(cpu.arch.as_str(), std::env::consts::ARCH);
        assert!(cpu.cores >= 1);
        let (total, available) = memory_kib();
        assert!(total > 0 && available > 0 && available <= total);
        assert_eq!(
            meminfo_field("MemTotal:  16 kB\nMemAvailable: 8 kB\n", "MemAvailable:"),
            Some(8)
        );
    }
}
