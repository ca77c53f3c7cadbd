//! Persistent kernel worker threads, owned per calling thread.
//!
//! A parallel kernel call used to spawn its helper threads with `std::thread::scope` and join
//! them (75–165 µs per call on the development VM). Here each thread that makes a `Par::Threads`
//! call owns a small pool of workers (a thread-local, created on the first call and grown to the
//! largest `Par::Threads(n)` it has seen, `n − 1` workers); a call hands job `i ≥ 1` to worker
//! `i − 1`, runs job 0 itself and waits for the rest. Nothing is shared between calling threads:
//! data-parallel ranks run as threads in one process each get their own workers and never wait on
//! each other's, and the thread count is still the explicit `Par` argument of every call.
//!
//! Waking: an idle worker polls its slot for [`SPIN`] (50 µs), calling `yield_now` between
//! polls, then parks (`std::thread::park`); the caller waits for its last worker the same way.
//! Most kernel calls of a step follow each other within that window, so the hand-off costs
//! about a microsecond instead of a futex wake-up (~25 µs). Yielding rather than busy-spinning
//! matters when threads outnumber cores (two ranks × two threads on two cores: a pure 50 µs spin
//! was ~10% slower there than parking at once; the yielding poll was as fast as parking). Idle
//! workers (between steps, or in a process that stopped calling kernels) are parked and cost
//! nothing.
//!
//! Nested calls: a job that itself makes a `Par::Threads` call runs it on its own thread's pool
//! (a worker gets its own workers), or, on the caller's thread while its pool is busy, on scoped
//! threads as before. Neither waits on a pool that is waiting on it, so nesting cannot deadlock.
//!
//! The one `unsafe` of this crate's threading is here: jobs borrow the caller's stack (slices,
//! closures), and workers are `'static` threads. [`Pool::run`] erases the borrow's lifetime and
//! is sound because it does not return, normally or by unwinding, before every worker has
//! finished its job and dropped every reference to it (see the SAFETY comment there).

use std::any::Any;
use std::cell::{RefCell, UnsafeCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long an idle worker (and a caller waiting for its workers) polls before parking. A
/// futex wake-up costs ~25 µs on the development VM and most consecutive kernel calls of a step
/// are closer than this; 200 µs measured no better, 0 and 10 µs worse (default `train`).
const SPIN: Duration = Duration::from_micros(50);

/// Runs `f(job)` for every job, the first on the calling thread and the others on the calling
/// thread's persistent workers, and returns when all have finished. A panic in any job is
/// re-raised here after every job has finished (the calling thread's own panic first).
pub(crate) fn run_jobs<J: Send, F: Fn(J) + Sync>(jobs: Vec<J>, f: F) {
    let n = jobs.len();
    // Each job is taken exactly once, by the thread that runs its index.
    let cells: Vec<Mutex<Option<J>>> = jobs.into_iter().map(|j| Mutex::new(Some(j))).collect();
    let task = |i: usize| {
        let job = cells[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("each job index runs once");
        f(job)
    };
    if n <= 1 {
        if n == 1 {
            task(0);
        }
        return;
    }
    let ran = POOL.try_with(|p| match p.try_borrow_mut() {
        Ok(mut pool) => {
            pool.run(n, &task);
            true
        }
        // This thread's pool is running the call this one is nested in.
        Err(_) => false,
    });
    if ran != Ok(true) {
        scoped(n, &task);
    }
}

/// The fallback for nested calls (and calls from thread-local destructors): scoped threads, as
/// every call did before the pool.
fn scoped(n: usize, task: &(dyn Fn(usize) + Sync)) {
    std::thread::scope(|s| {
        for i in 1..n {
            s.spawn(move || task(i));
        }
        task(0);
    });
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::new());
}

/// A slot's states: no job, a job posted for the worker, or "exit".
const IDLE: u32 = 0;
const POSTED: u32 = 1;
const EXIT: u32 = 2;

/// One job handed to a worker: the caller's task (its borrow's lifetime erased) and the index.
#[derive(Clone, Copy)]
struct Job {
    task: *const (dyn Fn(usize) + Sync + 'static),
    index: usize,
}

/// The hand-off between the owning thread and one worker.
struct Slot {
    state: AtomicU32,
    /// Written by the owner only while `state` is `IDLE`, read by the worker only after it saw
    /// `POSTED` (the `Release`/`Acquire` pair on `state` orders the two).
    job: UnsafeCell<Option<Job>>,
}

// SAFETY: `job` is accessed by one thread at a time, as ordered by `state` (see the field). The
// pointer inside is only dereferenced while `Pool::run` keeps its referent alive.
unsafe impl Sync for Slot {}
unsafe impl Send for Slot {}

/// What every worker of one pool reports back to the owner.
struct Done {
    /// Workers still running the current call's jobs.
    pending: AtomicUsize,
    /// The first panic payload of a worker's job in the current call.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// The owning thread, unparked by the worker that finishes last.
    owner: Thread,
}

struct Worker {
    slot: Arc<Slot>,
    thread: JoinHandle<()>,
}

/// The calling thread's workers.
struct Pool {
    workers: Vec<Worker>,
    done: Arc<Done>,
}

impl Pool {
    fn new() -> Pool {
        Pool {
            workers: Vec::new(),
            done: Arc::new(Done {
                pending: AtomicUsize::new(0),
                panic: Mutex::new(None),
                owner: std::thread::current(),
            }),
        }
    }

    /// Runs `task(0..n)`: index 0 here, index `i ≥ 1` on worker `i − 1`; returns (or re-raises
    /// the first panic) only after every index has finished.
    fn run(&mut self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        while self.workers.len() < n - 1 {
            self.spawn_worker();
        }
        // SAFETY: the workers dereference `task` only between seeing their slot `POSTED` and
        // decrementing `done.pending`, and never afterwards. This function does not return
        // before `pending` is back to 0: job 0 runs under `catch_unwind`, the wait below cannot
        // panic (atomics, `park`), and only then is a panic re-raised. Workers catch their jobs'
        // panics too, so every posted job ends with the decrement. Hence `*task` (and everything
        // it borrows) outlives every use, though the type no longer says so.
        let task: *const (dyn Fn(usize) + Sync + 'static) = unsafe {
            std::mem::transmute::<
                *const (dyn Fn(usize) + Sync + '_),
                *const (dyn Fn(usize) + Sync + 'static),
            >(task)
        };
        self.done.pending.store(n - 1, Ordering::Relaxed);
        for (w, index) in self.workers.iter().zip(1..n) {
            // SAFETY: the slot is `IDLE` (the last call waited for every worker), so its worker
            // does not touch `job` until the `Release` store below.
            unsafe { *w.slot.job.get() = Some(Job { task, index }) };
            w.slot.state.store(POSTED, Ordering::Release);
            w.thread.thread().unpark();
        }
        // SAFETY: `task` points at the caller's live `&dyn Fn` (see above).
        let mine = catch_unwind(AssertUnwindSafe(|| unsafe { (*task)(0) }));
        wait_until(|| self.done.pending.load(Ordering::Acquire) == 0);
        let theirs = self
            .done
            .panic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if let Some(p) = theirs {
            resume_unwind(p);
        }
    }

    fn spawn_worker(&mut self) {
        let slot = Arc::new(Slot {
            state: AtomicU32::new(IDLE),
            job: UnsafeCell::new(None),
        });
        let (s, done) = (Arc::clone(&slot), Arc::clone(&self.done));
        let thread = std::thread::Builder::new()
            .name("kernels-worker".into())
            .spawn(move || worker(&s, &done))
            .expect("failed to spawn a kernel worker thread");
        self.workers.push(Worker { slot, thread });
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for w in &self.workers {
            w.slot.state.store(EXIT, Ordering::Release);
            w.thread.thread().unpark();
        }
        for w in self.workers.drain(..) {
            // A worker never panics (jobs' panics are caught); nothing to report if it did.
            let _ = w.thread.join();
        }
    }
}

/// A worker's life: wait for a job, run it, report, until told to exit.
fn worker(slot: &Slot, done: &Done) {
    loop {
        wait_until(|| slot.state.load(Ordering::Acquire) != IDLE);
        if slot.state.load(Ordering::Acquire) == EXIT {
            return;
        }
        // SAFETY: the state is `POSTED`, so the owner wrote `job` and will not touch it until
        // `pending` reaches 0, after our decrement below.
        let job = unsafe { (*slot.job.get()).take() }.expect("a posted slot holds a job");
        // SAFETY: `Pool::run` keeps `*job.task` alive until `pending` reaches 0.
        let result = catch_unwind(AssertUnwindSafe(|| unsafe { (*job.task)(job.index) }));
        if let Err(p) = result {
            let mut first = done.panic.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert(p);
        }
        slot.state.store(IDLE, Ordering::Relaxed);
        // The last use of the job: after this the owner may return and free what it borrowed.
        if done.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            done.owner.unpark();
        }
    }
}

/// Polls `ready()` for up to [`SPIN`], yielding the core between polls, then parks until it
/// holds (unparks can be spurious or left over from an earlier wake-up, so every wake-up
/// re-checks).
fn wait_until(ready: impl Fn() -> bool) {
    let start = Instant::now();
    while !ready() {
        if start.elapsed() < SPIN {
            std::thread::yield_now();
        } else {
            std::thread::park();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_job_runs_once_on_distinct_threads() {
        for n in [1, 2, 3, 5, 2, 8] {
            let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
            let ids = Mutex::new(Vec::new());
            run_jobs((0..n).collect(), |i: usize| {
                hits[i].fetch_add(1, Ordering::Relaxed);
                ids.lock().unwrap().push(std::thread::current().id());
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            let mut ids = ids.into_inner().unwrap();
            ids.sort_by_key(|id| format!("{id:?}"));
            ids.dedup();
            assert_eq!(ids.len(), n, "{n} jobs ran on {} threads", ids.len());
        }
    }

    #[test]
    fn workers_persist_across_calls() {
        let ids = Mutex::new(Vec::new());
        for _ in 0..5 {
            run_jobs(vec![0, 1], |i: usize| {
                if i == 1 {
                    ids.lock().unwrap().push(std::thread::current().id());
                }
            });
        }
        let ids = ids.into_inner().unwrap();
        assert_eq!(ids.len(), 5);
        assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    }

    #[test]
    fn a_panic_in_a_worker_job_reaches_the_caller_and_the_pool_still_works() {
        for bad in [0, 1, 2] {
            let r = catch_unwind(|| {
                run_jobs(vec![0, 1, 2], |i: usize| {
                    if i == bad {
                        panic!("job {i} failed");
                    }
                })
            });
            let msg = *r
                .expect_err("the panic propagates")
                .downcast::<String>()
                .unwrap();
            assert_eq!(msg, format!("job {bad} failed"));
        }
        let sum = AtomicU64::new(0);
        run_jobs(vec![1, 2, 3], |i: u64| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn nested_calls_finish() {
        let sum = AtomicU64::new(0);
        run_jobs(vec![0u64, 1, 2], |i| {
            run_jobs(vec![10 * i, 10 * i + 1], |j| {
                sum.fetch_add(j, Ordering::Relaxed);
            });
        });
        // (0 + 1) + (10 + 11) + (20 + 21)
        assert_eq!(sum.load(Ordering::Relaxed), 63);
    }

    #[test]
    fn concurrent_callers_use_their_own_workers() {
        let total = AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..3u64 {
                let total = &total;
                s.spawn(move || {
                    for _ in 0..200 {
                        run_jobs(vec![t, t, t], |x| {
                            total.fetch_add(x + 1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 200 * 3 * (1 + 2 + 3));
    }
}
