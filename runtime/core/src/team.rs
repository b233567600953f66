//! Inference-time splits of edgevlm's kernels over the plan's threads: the calling thread
//! takes a share itself, and up to `threads - 1` workers that spin for a while after each
//! split take the rest.
//!
//! tract's executor is a rayon pool. A split handed to it from the thread running the plan
//! parks that thread until the pool's workers are done and wakes it again, and the workers
//! fall asleep between splits: ~10-20 µs per split, which is as long as a decode step's
//! products take (a 768 x 768 int8 product is ~20 µs), so with two threads a decode step was
//! no faster than with one. ONNX Runtime's pool spins the same way. The number of threads is
//! still the plan's (`--threads`, tract's executor for the running plan).

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, TryLockError};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// How long an idle worker spins for the next split before it parks: longer than the gaps
/// between one decode step's products (element-wise ops, attention), shorter than anything
/// a person would notice as a busy core after a run.
const SPIN: Duration = Duration::from_micros(500);

/// Below this many multiply-adds a product with a smaller weight stays on one thread.
const SPLIT_MACS: usize = 1 << 22;
/// From this many bytes of weight a product splits even for one row: a decode step's
/// products stream their weight from L3 or memory, and two cores stream it about twice as
/// fast (int8, one row, 768 x 768 in a loop over 64 MiB of weights: 24.5 µs on one thread,
/// 13.6 µs on two; 768 x 128: 4.2 and 3.3 µs; 256 x 256 on 4 rows: 3.5 and 4.9 µs).
const SPLIT_WEIGHT_BYTES: usize = 128 << 10;

/// Is a product of `macs` multiply-adds over a weight of `weight_bytes` worth splitting
/// over threads?
pub(crate) fn worth_splitting(macs: usize, weight_bytes: usize) -> bool {
    macs >= SPLIT_MACS || weight_bytes >= SPLIT_WEIGHT_BYTES
}

/// Threads for such a product: the plan's when [`worth_splitting`], else 1.
pub(crate) fn threads_for(macs: usize, weight_bytes: usize) -> usize {
    if worth_splitting(macs, weight_bytes) {
        threads()
    } else {
        1
    }
}

/// `f` over `0..units` cut into one run of consecutive units per thread (`threads` of
/// them, at least one unit each), through [`for_each_part`].
pub(crate) fn for_each_run(
    units: usize,
    threads: usize,
    f: impl Fn(std::ops::Range<usize>) + Sync,
) {
    let per = units.div_ceil(threads.max(1)).max(1);
    for_each_part(units.div_ceil(per), |part| {
        f(part * per..((part + 1) * per).min(units))
    });
}

/// An element-wise pass over `xs`: cut into one piece per thread of the plan when its bytes
/// are [`worth_splitting`] (pieces 16-element aligned), `f(first element, piece)` on each.
pub(crate) fn for_each_piece(xs: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
    for_each_piece_of(xs, 16, f)
}

/// [`for_each_piece`] with every piece a whole number of `unit`s (a row-wise pass gives its
/// row length; the last piece may end on a partial unit only if `xs` does).
pub(crate) fn for_each_piece_of(xs: &mut [f32], unit: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let unit = unit.max(1);
    let threads = threads_for(0, std::mem::size_of_val(xs));
    let per = xs.len().div_ceil(threads).next_multiple_of(unit).max(unit);
    let pieces: Vec<_> = xs
        .chunks_mut(per)
        .enumerate()
        .map(|(p, piece)| Mutex::new((p * per, piece)))
        .collect();
    for_each_part(pieces.len(), |p| {
        let mut piece = pieces[p].lock().unwrap_or_else(|e| e.into_inner());
        let (at, ref mut piece) = *piece;
        f(at, piece);
    });
}

/// Threads the running plan may use: its tract executor's, 1 outside a multi-threaded plan.
pub(crate) fn threads() -> usize {
    match tract_linalg::multithread::current_tract_executor() {
        tract_linalg::multithread::Executor::MultiThread(pool) => pool.current_num_threads(),
        _ => 1,
    }
}

/// `f(i)` for every `i` in `0..parts`, each once, on this thread and up to `threads() - 1`
/// workers (no more threads than cores, less one per graph load in progress: a spinning
/// worker on a core another one needs would hold up the split it waits for), parts taken
/// in order by whichever thread is free.
/// Returns when all are done; a panic in any part is resumed here. Runs everything here
/// when one thread is asked for, or when the team is busy with another split (a split
/// inside a split, or a second plan running on another thread at the same time).
pub(crate) fn for_each_part(parts: usize, f: impl Fn(usize) + Sync) {
    if parts < 2 {
        return (0..parts).for_each(f);
    }
    static CORES: OnceLock<usize> = OnceLock::new();
    let cores = *CORES.get_or_init(crate::par::cores);
    // A graph load keeps its core busy (parsing, decluttering and optimizing run on its
    // thread), and a part handed to that core would hold up the split: `edgevlm generate`
    // encodes the image while the decoder loads, and on two cores and two threads that
    // encode took longer than on one (256M per-channel int8 package, cold start from the
    // ONNX files: 2.25 s on two threads, 2.03 s on one).
    let free = cores
        .saturating_sub(crate::alloc::loads_in_progress())
        .max(1);
    let helpers = threads().min(free).min(parts).saturating_sub(1);
    if helpers == 0 {
        return (0..parts).for_each(f);
    }
    let team = team();
    let mut workers = match team.lock.try_lock() {
        Ok(workers) => Some(workers),
        Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    };
    let Some(workers) = workers.as_mut() else {
        (0..parts).for_each(f);
        return;
    };
    while workers.len() < helpers {
        let index = workers.len();
        match spawn_worker(index) {
            Some(worker) => workers.push(worker),
            None => break,
        }
    }
    let helpers = helpers.min(workers.len());
    let job = Job {
        parts,
        next: AtomicUsize::new(0),
        f: &f,
        panic: Mutex::new(None),
    };
    // SAFETY: `Published`'s drop (below, also on unwinding) clears the slot and waits until
    // no worker is inside the job before `job` and `f` go out of scope.
    let erased: &'static Job<'static> = unsafe { std::mem::transmute(&job) };
    *team.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Slot {
        job: erased,
        helpers,
    });
    let published = Published(team);
    team.epoch.fetch_add(1, Ordering::SeqCst);
    for worker in &workers[..helpers] {
        if worker.sleeping.swap(false, Ordering::SeqCst) {
            worker.thread.unpark();
        }
    }
    job.work();
    drop(published);
    let panic = job.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(panic) = panic {
        resume_unwind(panic);
    }
}

/// One split: its parts, the next one to take, and the first panic.
struct Job<'a> {
    parts: usize,
    next: AtomicUsize,
    f: &'a (dyn Fn(usize) + Sync),
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Job<'_> {
    /// Takes parts until none is left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.parts {
                return;
            }
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| (self.f)(i))) {
                self.next.store(self.parts, Ordering::Relaxed);
                self.panic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(panic);
            }
        }
    }
}

/// The split workers may join: set while its caller is inside [`for_each_part`].
#[derive(Clone, Copy)]
struct Slot {
    job: &'static Job<'static>,
    helpers: usize,
}

struct Team {
    /// Held by the thread whose split the team works on; the workers started so far.
    lock: Mutex<Vec<Arc<Worker>>>,
    /// The current split, `None` between splits.
    slot: Mutex<Option<Slot>>,
    /// Bumped when a split is published.
    epoch: AtomicUsize,
    /// Workers inside the current split.
    inside: AtomicUsize,
}

struct Worker {
    thread: Thread,
    /// Parked or about to park: the publisher unparks it.
    sleeping: AtomicBool,
}

fn team() -> &'static Team {
    static TEAM: OnceLock<Team> = OnceLock::new();
    TEAM.get_or_init(|| Team {
        lock: Mutex::new(Vec::new()),
        slot: Mutex::new(None),
        epoch: AtomicUsize::new(0),
        inside: AtomicUsize::new(0),
    })
}

/// Clears the slot, then waits for the workers still inside the split.
struct Published(&'static Team);

impl Drop for Published {
    fn drop(&mut self) {
        *self.0.slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
        while self.0.inside.load(Ordering::Acquire) > 0 {
            std::hint::spin_loop();
        }
    }
}

fn spawn_worker(index: usize) -> Option<Arc<Worker>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = thread::Builder::new()
        .name(format!("edgevlm-team-{index}"))
        .spawn(move || {
            let me = Arc::new(Worker {
                thread: thread::current(),
                sleeping: AtomicBool::new(false),
            });
            if tx.send(me.clone()).is_ok() {
                serve(index, &me);
            }
        });
    spawned.ok()?;
    rx.recv().ok()
}

/// A worker's life: wait for a split, join it if it wants this many helpers, repeat.
fn serve(index: usize, me: &Worker) {
    let team = team();
    let mut seen = team.epoch.load(Ordering::SeqCst);
    loop {
        seen = wait_for_split(team, me, seen);
        // Enter under the slot's lock, so the publisher's clear-then-wait sees this one.
        let slot = {
            let slot = team.slot.lock().unwrap_or_else(|e| e.into_inner());
            match *slot {
                Some(s) if index < s.helpers => {
                    team.inside.fetch_add(1, Ordering::AcqRel);
                    Some(s)
                }
                _ => None,
            }
        };
        if let Some(slot) = slot {
            slot.job.work();
            team.inside.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Spins until the epoch moves past `seen`, parking after [`SPIN`]; the new epoch.
fn wait_for_split(team: &Team, me: &Worker, seen: usize) -> usize {
    let mut since = Instant::now();
    let mut spins = 0u32;
    loop {
        let now = team.epoch.load(Ordering::SeqCst);
        if now != seen {
            return now;
        }
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(1024) && since.elapsed() > SPIN {
            me.sleeping.store(true, Ordering::SeqCst);
            if team.epoch.load(Ordering::SeqCst) == seen {
                thread::park();
            }
            me.sleeping.store(false, Ordering::SeqCst);
            since = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn on_threads<R>(threads: usize, f: impl FnOnce() -> R) -> R {
        tract_linalg::multithread::multithread_tract_scope(
            crate::int8mm::tests::executor(threads),
            f,
        )
    }

    #[test]
    fn every_part_runs_once_on_up_to_the_plans_threads() {
        for threads in [1, 2, 3] {
            for parts in [0, 1, 2, 7, 100] {
                let counts: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
                let names = std::sync::Mutex::new(std::collections::BTreeSet::new());
                on_threads(threads, || {
                    super::for_each_part(parts, |i| {
                        counts[i].fetch_add(1, Ordering::Relaxed);
                        let name = std::thread::current().name().map(str::to_owned);
                        names.lock().unwrap().insert(name);
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    })
                });
                assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
                let names = names.into_inner().unwrap();
                assert!(names.len() <= threads.min(parts.max(1)), "{names:?}");
            }
        }
    }

    /// While a graph loads, a split leaves it a core: on every core but one it runs on
    /// fewer threads than the plan's, each part still once.
    #[test]
    fn a_split_leaves_a_loading_graph_its_core() {
        let cores = crate::par::cores();
        let parts = 4 * cores;
        let counts: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
        let names = std::sync::Mutex::new(std::collections::BTreeSet::new());
        crate::alloc::while_loading(|| {
            on_threads(cores.max(2), || {
                super::for_each_part(parts, |i| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                    let name = std::thread::current().name().map(str::to_owned);
                    names.lock().unwrap().insert(name);
                    std::thread::sleep(std::time::Duration::from_millis(5));
                })
            })
        });
        assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
        let names = names.into_inner().unwrap();
        assert!(
            names.len() <= (cores - 1).max(1),
            "{names:?} on {cores} cores"
        );
    }

    #[test]
    fn a_split_inside_a_split_runs_on_its_caller() {
        let total = AtomicUsize::new(0);
        on_threads(2, || {
            super::for_each_part(4, |_| {
                super::for_each_part(3, |j| {
                    total.fetch_add(j + 1, Ordering::Relaxed);
                })
            })
        });
        assert_eq!(total.into_inner(), 4 * 6);
    }

    #[test]
    #[should_panic(expected = "part 5")]
    fn a_panic_in_a_part_is_resumed_on_the_caller() {
        on_threads(2, || {
            super::for_each_part(8, |i| {
                if i == 5 {
                    panic!("part 5");
                }
            })
        });
    }

    #[test]
    fn the_team_survives_a_panic_and_many_splits() {
        let _ = std::panic::catch_unwind(|| {
            on_threads(2, || super::for_each_part(2, |_| panic!("boom")))
        });
        let sum = AtomicUsize::new(0);
        on_threads(2, || {
            for _ in 0..2000 {
                super::for_each_part(2, |i| {
                    sum.fetch_add(i, Ordering::Relaxed);
                })
            }
        });
        assert_eq!(sum.into_inner(), 2000);
    }
}
