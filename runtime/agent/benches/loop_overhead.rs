//! What the inspection loop itself costs, on the simulated board with the demo model:
//! trigger-to-pin latency minus the model's own stages (decode, preprocess, infer,
//! postprocess), as p50 / p99 and as a ratio to the model time measured in the same run;
//! and the loop's CPU use while no trigger comes.
//!
//! `cargo bench -p edgevlm-agent --bench loop_overhead`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use edgevlm_agent::config::{
    AgentConfig, BoardKind, BoardSection, ModelSection, OutputsSection, SimSection,
};
use edgevlm_agent::{sim, Event};
use edgevlm_board_sim::ScheduleTrigger;

fn config(triggers: usize, period_ms: u64) -> AgentConfig {
    let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models");
    AgentConfig {
        board: BoardSection {
            kind: BoardKind::Sim,
            profile: None,
        },
        model: ModelSection {
            package: models.join("demo"),
            threads: 1,
            cache_dir: None,
        },
        sim: Some(SimSection {
            images: models.join("demo/samples"),
            triggers,
            period_ms,
            script: None,
            stdin: false,
        }),
        outputs: OutputsSection {
            pulse_ms: 1,
            ..Default::default()
        },
        queue: Default::default(),
        camera: Default::default(),
        ng_images: None,
    }
}

fn percentile(v: &mut [u64], p: f64) -> f64 {
    v.sort_unstable();
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize - 1;
    v[rank.min(v.len() - 1)] as f64 / 1000.0
}

/// CPU time (user + system) of this process so far.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split(' ')
        .skip(11)
        .take(2)
        .map(|x| x.parse().unwrap())
        .collect();
    let ticks = 100; // USER_HZ on Linux
    Duration::from_millis((f[0] + f[1]) * 1000 / ticks)
}

fn main() {
    // 1. Overhead per part: 400 triggers, 10 ms apart (no queueing).
    let (station, trigger, _pins) = sim::build(&config(400, 10)).unwrap();
    let (mut overhead, mut model, mut latency) = (vec![], vec![], vec![]);
    station.run(trigger, |e| {
        if let Event::Part(p) = e {
            let model_us = p.trace.as_ref().map_or(0, |t| t.total_us());
            latency.push(p.latency_us);
            model.push(model_us);
            overhead.push(p.latency_us.saturating_sub(model_us));
        }
    });
    let (o50, o99) = (
        percentile(&mut overhead, 50.0),
        percentile(&mut overhead, 99.0),
    );
    let (m50, l50, l99) = (
        percentile(&mut model, 50.0),
        percentile(&mut latency, 50.0),
        percentile(&mut latency, 99.0),
    );
    println!("parts: {}", latency.len());
    println!("trigger->pin latency   p50 {l50:.3} ms  p99 {l99:.3} ms");
    println!("model stages           p50 {m50:.3} ms");
    println!(
        "loop overhead          p50 {o50:.3} ms  p99 {o99:.3} ms  (overhead / model p50 = {:.2})",
        o50 / m50
    );

    // 2. Idle: the loop waits 3 s for a trigger that comes at the end.
    let (station, _trigger, _pins) = sim::build(&config(1, 1)).unwrap();
    let idle = Duration::from_secs(3);
    let trigger = ScheduleTrigger::new(vec![idle]);
    let (cpu0, wall0) = (cpu_time(), Instant::now());
    station.run(trigger, |_| {});
    let (cpu, wall) = (cpu_time() - cpu0, wall0.elapsed());
    println!(
        "idle: {:.1} ms CPU over {:.2} s wall = {:.3}% of one core (includes the one part at the end)",
        cpu.as_secs_f64() * 1e3,
        wall.as_secs_f64(),
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
    );
}
