//! Load-time work spread over the CPU's cores: cold start (a fresh process to its first
//! result) is mostly graph loading and file hashing, independent jobs that a Raspberry Pi's
//! four cores can do side by side. Inference threads are set apart, by `LoadOptions::threads`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;

pub(crate) fn cores() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// `a()` on a second thread while `b()` runs on this one (both here on a one-core machine).
/// A panic in either is resumed here.
pub(crate) fn join<A: Send, B>(a: impl FnOnce() -> A + Send, b: impl FnOnce() -> B) -> (A, B) {
    if cores() < 2 {
        let a = a();
        return (a, b());
    }
    thread::scope(|s| {
        let a = s.spawn(a);
        let b = b();
        match a.join() {
            Ok(a) => (a, b),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// `f` over `items` on up to one thread per core; results in the items' order.
pub(crate) fn map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let workers = cores().min(items.len());
    if workers < 2 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
    thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            });
        }
    });
    results
        .into_iter()
        .map(|r| {
            r.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every item was taken by a worker")
        })
        .collect()
}

/// How many of `units` (`bytes` in all) each core takes when work on them is split into one
/// run per core ([`each`]): all of them below 1 MiB, where a thread costs more than it
/// saves; at least 1, so that chunking by it never takes zero-sized steps.
pub(crate) fn units_per_run(units: usize, bytes: usize) -> usize {
    let runs = if bytes >= 1 << 20 {
        cores().min(units)
    } else {
        1
    };
    units.div_ceil(runs.max(1)).max(1)
}

/// `f` on each of `items`, one thread per item (the first on this one): for work already cut
/// into one part per core. A panic in any is resumed here.
pub(crate) fn each<T: Send>(items: Vec<T>, f: impl Fn(T) + Sync) {
    let mut items = items.into_iter();
    let Some(first) = items.next() else { return };
    let f = &f;
    thread::scope(|s| {
        for item in items {
            s.spawn(move || f(item));
        }
        f(first);
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn map_keeps_the_order_and_join_returns_both() {
        let items: Vec<u64> = (0..100).collect();
        let squares = super::map(&items, |x| x * x);
        assert_eq!(squares, items.iter().map(|x| x * x).collect::<Vec<_>>());
        assert_eq!(super::join(|| 1, || "b"), (1, "b"));
    }

    #[test]
    fn each_runs_every_part() {
        let mut data = vec![0u32; 100];
        super::each(data.chunks_mut(30).enumerate().collect(), |(i, part)| {
            part.fill(i as u32 + 1)
        });
        assert_eq!((data[0], data[29], data[30], data[99]), (1, 1, 2, 4));
    }

    #[test]
    #[should_panic(expected = "from the second thread")]
    fn join_resumes_a_panic() {
        super::join(|| panic!("from the second thread"), || ());
    }
}
