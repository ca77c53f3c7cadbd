//! Shared-memory transport: every rank of one host maps the same file in `/dev/shm` holding the
//! control block and one byte ring per ordered pair of ranks (layout in `ring`). A message costs a
//! copy into the ring and a copy (or a fused reduce) out of it, with rings small enough to stay in
//! cache, instead of the kernel's two copies and wake-ups per loopback TCP segment.
//!
//! ```text
//!  rank 0: create /dev/shm/scaletrain-<hash(MASTER_ADDR, MASTER_PORT)> (mode 0600),
//!          size it, write n, ring size, hash(token), then publish the magic
//!  rank r: open it (retrying until the deadline), wait for the magic, check n, ring size and the
//!          token hash (a mismatch is a rendezvous error), claim joined[r] with a compare-exchange
//!          (a slot of this job already taken by a live process: a duplicate rank, refused;
//!          of a previous job's file not yet unlinked: retry)
//!  all:    store pid; wait until every rank joined; rank 0 unlinks the file
//! ```
//! A peer is gone when its `closed` flag is set outside the final barrier or its pid is dead or a
//! zombie. The file's mode limits access to the job's user; the token keeps jobs apart.
use crate::comm::Comm;
use crate::error::{CommError, Result};
use crate::rendezvous::JobEnv;
use crate::ring::{Liveness, Region, RingLink, REGION_MAGIC};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn rdv(rank: usize, detail: impl Into<String>) -> CommError {
    CommError::Rendezvous {
        rank,
        detail: detail.into(),
    }
}

fn map(file: &std::fs::File, len: usize, rank: usize) -> Result<Region> {
    // SAFETY: mapping a regular file we hold open, shared, read-write, at a kernel-chosen address.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(CommError::Io {
            rank,
            op: "init",
            context: "mmap of the shared-memory file".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: a live mapping of `len` bytes owned by the returned Region from now on.
    Ok(unsafe { Region::mapped(ptr as *mut u8, len) })
}

/// The shared-memory file of the job whose rank 0 is at `master_addr:master_port`. Rank 0
/// unlinks it once every rank has joined; a launcher removes it after the job in case a rank
/// died before that.
pub fn job_file(master_addr: &str, master_port: u16) -> PathBuf {
    let job = fnv64(&[master_addr.as_bytes(), &master_port.to_le_bytes()]);
    PathBuf::from(format!("/dev/shm/scaletrain-{job:016x}"))
}

/// Join the job through shared memory (all ranks on this host).
pub fn connect(env: &JobEnv) -> Result<Comm> {
    let (me, n) = (env.rank, env.world_size);
    if env.local_world_size != n {
        return Err(rdv(me, format!("the shm transport needs every rank on one host, but LOCAL_WORLD_SIZE is {} and WORLD_SIZE {n} (use tcp across hosts)", env.local_world_size)));
    }
    let cfg = env.cfg.clone();
    let cap = crate::ring::ring_capacity(cfg.ring_bytes, n);
    let len = Region::bytes(n, cap);
    let deadline = Instant::now() + cfg.timeout;
    let token_hash = fnv64(&[&env.token]);
    let path = job_file(&env.master_addr, env.master_port);
    let io = |context: &str, source: std::io::Error| CommError::Io {
        rank: me,
        op: "init",
        context: format!("{context} {}", path.display()),
        source,
    };
    let region = if me == 0 {
        let _ = std::fs::remove_file(&path); // a stale file of a crashed job with the same token and port
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io("creating", e))?;
        file.set_len(len as u64).map_err(|e| io("sizing", e))?;
        let region = map(&file, len, me)?;
        region.word(1).store(n as u64, Ordering::Relaxed);
        region.word(2).store(cap as u64, Ordering::Relaxed);
        region.word(3).store(token_hash, Ordering::Relaxed);
        region.magic().store(REGION_MAGIC, Ordering::Release);
        region
    } else {
        loop {
            if Instant::now() >= deadline {
                return Err(rdv(
                    me,
                    format!(
                        "{} did not appear or was never initialised by rank 0",
                        path.display()
                    ),
                ));
            }
            let file = match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
            {
                Ok(f) => f,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
            };
            if file.metadata().map(|m| m.len()).unwrap_or(0) < len as u64 {
                // Not sized yet, or sized for a different world: retry until it settles.
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let region = map(&file, len, me)?;
            while region.magic().load(Ordering::Acquire) != REGION_MAGIC
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            if region.magic().load(Ordering::Acquire) != REGION_MAGIC {
                continue;
            }
            let (rn, rcap) = (
                region.word(1).load(Ordering::Relaxed),
                region.word(2).load(Ordering::Relaxed),
            );
            if rn != n as u64 || rcap != cap as u64 {
                return Err(rdv(me, format!("rank 0 set up {rn} ranks with {rcap}-byte rings, this rank expects {n} and {cap}")));
            }
            let stale = (0..n).all(|r| region.joined(r).load(Ordering::Acquire) != 0);
            if region.word(3).load(Ordering::Relaxed) != token_hash && !stale {
                return Err(rdv(me, "wrong job token"));
            }
            // Our slot of this job (same token, not every rank joined yet) held by another live
            // process: a second process was given our rank.
            let holder = region.pid(me).load(Ordering::Acquire);
            if !stale
                && region.joined(me).load(Ordering::Acquire) != 0
                && holder != 0
                && holder != std::process::id()
                && std::fs::read_to_string(format!("/proc/{holder}/stat")).is_ok_and(|st| {
                    !matches!(
                        st.rsplit(')')
                            .next()
                            .and_then(|x| x.split_whitespace().next()),
                        Some("Z" | "X" | "x")
                    )
                })
            {
                return Err(rdv(
                    me,
                    format!(
                        "rank {me} already joined (process {holder}): two processes were started \
                         with RANK={me}; give every process of the job its own rank"
                    ),
                ));
            }
            // Claim our slot (our pid is stored once it is ours, so a loser never overwrites
            // the holder's). A taken slot means a previous job's file that rank 0 has not
            // unlinked yet (e.g. the same ranks joining again on the same port): drop it and
            // wait for ours.
            if region
                .joined(me)
                .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                drop(region);
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            break region;
        }
    };
    region.pid(me).store(std::process::id(), Ordering::Release);
    if me == 0 {
        region.joined(0).store(1, Ordering::Release);
    }
    while (0..n).any(|r| region.joined(r).load(Ordering::Acquire) == 0) {
        if Instant::now() >= deadline {
            let missing: Vec<usize> = (0..n)
                .filter(|&r| region.joined(r).load(Ordering::Acquire) == 0)
                .collect();
            if me == 0 {
                let _ = std::fs::remove_file(&path);
            }
            return Err(rdv(
                me,
                format!("timed out waiting for rank(s) {missing:?} to join"),
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if me == 0 {
        let _ = std::fs::remove_file(&path);
    }
    let link = RingLink::new(Arc::new(region), me, n, cap, "shm", Liveness::Pids);
    Ok(Comm::new(Box::new(link), cfg))
}
