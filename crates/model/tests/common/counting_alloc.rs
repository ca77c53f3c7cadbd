//! A global allocator that counts live heap bytes and their peak, for tests that compare real
//! allocations with `plan::cpu_runtime`'s predictions. Include it in a test binary with
//! `#[path = ".../counting_alloc.rs"] mod counting_alloc;` (it installs itself as the binary's
//! global allocator, so it counts every thread of that binary: keep one #[test] per binary).
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering::SeqCst};

struct Counting;
static LIVE: AtomicI64 = AtomicI64::new(0);
static PEAK: AtomicI64 = AtomicI64::new(0);

fn add(bytes: usize) {
    let now = LIVE.fetch_add(bytes as i64, SeqCst) + bytes as i64;
    PEAK.fetch_max(now, SeqCst);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            add(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            add(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        System.dealloc(p, layout);
        LIVE.fetch_sub(layout.size() as i64, SeqCst);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Heap bytes live now.
pub fn live() -> i64 {
    LIVE.load(SeqCst)
}

/// The most heap bytes live at once since the last [`reset_peak`].
pub fn peak() -> i64 {
    PEAK.load(SeqCst)
}

/// Starts a new peak measurement from the bytes live now.
pub fn reset_peak() {
    PEAK.store(live(), SeqCst);
}
