//! Cost of `Tracker::record`, single-threaded and with 2 threads, next to a baseline measured
//! in the same run: one relaxed atomic add plus one HdrHistogram record on a thread-local
//! histogram. Targets: under 50 ns per record, within 3x of the baseline, and 2 threads at
//! least 1.6x the throughput of one.
//!
//! `cargo bench -p chaperone-audit --bench tracker` prints criterion's figures, then a summary
//! table with the ratios. Timings are never asserted.

use std::cell::RefCell;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use chaperone_audit::{BucketWidth, Latency, Tracker};
use criterion::Criterion;

static COUNTER: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static HIST: RefCell<Latency> = RefCell::new(Latency::new());
}

const BASE_MS: i64 = 1_764_067_200_000;

#[inline]
fn baseline(i: u64) {
    COUNTER.fetch_add(1, Ordering::Relaxed);
    HIST.with(|h| h.borrow_mut().record((i & 1023) as i64));
}

/// One acknowledged message: partitions change every 512 messages, as acks arrive per batch.
#[inline]
fn record(t: &Tracker, i: u64) {
    let partition = ((i >> 9) & 7) as i32;
    let event = BASE_MS + (i & 0xffff) as i64;
    t.record(
        "orders",
        Some(partition),
        event,
        100,
        event + (i & 1023) as i64,
    );
}

fn tracker() -> Tracker {
    Tracker::new(BucketWidth::default(), 10_000)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("record");
    g.bench_function("baseline atomic add + thread-local histogram", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            baseline(black_box(i));
        })
    });
    let t = tracker();
    g.bench_function("tracker 1 thread", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            record(&t, black_box(i));
        })
    });
    g.bench_function("tracker 2 threads (per record, wall time)", |b| {
        let t = Arc::new(tracker());
        b.iter_custom(|iters| parallel(2, iters, &t) / 2)
    });
    g.finish();
}

/// Runs `iters` records on each of `threads` threads; returns the wall time.
fn parallel(threads: usize, iters: u64, t: &Arc<Tracker>) -> Duration {
    let t = Arc::clone(t);
    parallel_with(threads, iters, move |i| record(&t, i))
}

/// Runs `iters` calls of `f` on each of `threads` threads; returns the wall time.
fn parallel_with<F: Fn(u64) + Send + Sync + 'static>(threads: usize, iters: u64, f: F) -> Duration {
    let f = Arc::new(f);
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|n| {
            let f = Arc::clone(&f);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                let offset = (n as u64) << 40;
                for i in 0..iters {
                    f(black_box(offset + i));
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for h in handles {
        h.join().expect("bench thread");
    }
    start.elapsed()
}

/// Throughput of 2 threads over 1 thread (best of 7 wall times each).
fn scaling<F: Fn(usize) -> Duration>(n: u64, run: F) -> (f64, f64) {
    let best = |threads| {
        (0..7)
            .map(|_| run(threads).as_nanos() as f64)
            .fold(f64::INFINITY, f64::min)
    };
    let (one, two) = (best(1), best(2));
    (
        two / (2 * n) as f64,
        (2 * n) as f64 / two / (n as f64 / one),
    )
}

/// Best of several timed loops of `n` calls, in ns per call.
fn best_of<F: FnMut(u64)>(n: u64, mut f: F) -> f64 {
    (0..7)
        .map(|_| {
            let start = Instant::now();
            for i in 0..n {
                f(black_box(i));
            }
            start.elapsed().as_nanos() as f64 / n as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn summary() {
    const N: u64 = 20_000_000;
    let base = best_of(N, baseline);
    let t = tracker();
    let one = best_of(N, |i| record(&t, i));
    let shared = Arc::new(tracker());
    let (two_per_record, scaling_tracker) = scaling(N, |threads| parallel(threads, N, &shared));
    // The same scaling for the baseline shows what this machine allows right now.
    let (_, scaling_base) = scaling(N, |threads| parallel_with(threads, N, baseline));
    println!();
    println!("tracker record() summary ({N} records per loop, best of 7)");
    println!("  baseline (atomic add + thread-local hdr): {base:6.1} ns/record");
    println!(
        "  Tracker::record, 1 thread:               {one:6.1} ns/record  ({:.2}x baseline; target < 50 ns, <= 3x)",
        one / base
    );
    println!(
        "  Tracker::record, 2 threads:              {two_per_record:6.1} ns/record of wall time  (throughput {scaling_tracker:.2}x one thread; target >= 1.6x)"
    );
    println!(
        "  baseline, 2 threads:                     throughput {scaling_base:.2}x one thread (what the machine allows)"
    );
}

fn main() {
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    bench(&mut c);
    c.final_summary();
    // `cargo test --benches` runs this binary without `--bench`: criterion then only checks
    // each benchmark once, and the timed summary is skipped.
    if std::env::args().any(|a| a == "--bench") {
        summary();
    }
}
