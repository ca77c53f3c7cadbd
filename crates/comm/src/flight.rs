//! Flight recorder: every rank keeps its last [`DEFAULT_CAPACITY`] communication calls (op, group,
//! the group's call number, bytes, peer, start and end times, outcome) and writes them as JSON
//! lines when something goes wrong, so that a hang can be read after the fact: "rank 3 never
//! entered all_reduce #1042".
//!
//! ```text
//!  dump file (one per rank): flight-rank-<R>.jsonl
//!   {"rank":R,"reason":"…","time_us":…,"groups":[{"group":G,"members":[world ranks]}…]}   header
//!   {"rank":R,"seq":…,"group":G,"group_rank":…,"group_size":…,"op":"all_reduce","call":1042,
//!    "bytes":…,"peer":null,"start_us":…,"end_us":null,"status":"in flight"}             oldest first
//! ```
//! `call` counts the group's collectives (1 = the first; the same number on every member), or
//! for `send/recv` the group's point-to-point calls on this rank. Times are microseconds since the
//! Unix epoch, comparable between the processes of one host.
//!
//! **When dumps happen.** Only with a dump folder, from [`set_dump_dir`] or the environment
//! variable `SCALETRAIN_FLIGHT_DIR`: when a call fails (a timeout, a lost or aborting peer, a
//! desync; once, at the first error), when the program calls [`dump_all`] (e.g. as it aborts), and
//! on `SIGUSR1` once [`install_signal_handler`] ran (done automatically when the variable is set).
//! [`read_dump`] and [`diagnose`] turn the dumps of a job into sentences naming the rank that
//! did not reach a call.
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Calls kept per rank.
pub const DEFAULT_CAPACITY: usize = 1024;

/// The status of a call that has not returned.
pub const IN_FLIGHT: &str = "in flight";

/// One call as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    /// World rank of the recording process.
    pub rank: usize,
    /// Position among all calls this rank recorded (all groups), from 0.
    pub seq: u64,
    /// Communicator id (0 = the world).
    pub group: u32,
    /// This rank's rank in the group, and the group's size.
    pub group_rank: usize,
    pub group_size: usize,
    /// Operation name as in error messages ("all_reduce", "send/recv", …).
    pub op: String,
    /// The group's collective number (from 1), or this rank's point-to-point count on the group.
    pub call: u64,
    /// Bytes of the caller's buffer.
    pub bytes: u64,
    /// Point to point: the world ranks sent to / received from.
    pub peers: Vec<usize>,
    /// Start and end, microseconds since the Unix epoch; no end while in flight.
    pub start_us: u64,
    pub end_us: Option<u64>,
    /// `"ok"`, [`IN_FLIGHT`], or the error.
    pub status: String,
}

/// The first line of a dump.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpHeader {
    /// World rank.
    pub rank: usize,
    /// Why it was written.
    pub reason: String,
    /// When, microseconds since the Unix epoch.
    pub time_us: u64,
    /// Every group this rank used, with its members' world ranks in group-rank order.
    pub groups: Vec<GroupMembers>,
}

/// A group's members.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMembers {
    pub group: u32,
    pub members: Vec<usize>,
}

/// A dump read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dump {
    pub header: DumpHeader,
    pub records: Vec<CallRecord>,
}

/// One rank's recorder (shared by the world communicator and its splits).
pub struct Recorder {
    rank: usize,
    inner: Mutex<Inner>,
}

/// A call as kept in memory: no heap allocation per call (the ring is allocated once, up
/// front), so recording does not change what a step allocates.
struct Rec {
    seq: u64,
    group: u32,
    group_rank: u32,
    group_size: u32,
    op: &'static str,
    call: u64,
    bytes: u64,
    peers: [u32; 2],
    npeers: u8,
    start_us: u64,
    end_us: Option<u64>,
    status: Status,
}

enum Status {
    InFlight,
    Ok,
    Failed(Box<str>),
}

struct Inner {
    capacity: usize,
    next_seq: u64,
    records: VecDeque<Rec>,
    groups: BTreeMap<u32, Vec<usize>>,
    /// Dumped once already because of an error (later errors only repeat the first).
    dumped_on_error: bool,
}

/// What a call is, for [`Recorder::begin`].
pub(crate) struct CallInfo<'a> {
    pub(crate) group: u32,
    pub(crate) members: &'a [usize],
    pub(crate) group_rank: usize,
    pub(crate) op: &'static str,
    pub(crate) call: u64,
    pub(crate) bytes: usize,
    /// World ranks of the point-to-point peers (at most two).
    pub(crate) peers: &'a [usize],
}

impl Rec {
    fn public(&self, rank: usize) -> CallRecord {
        CallRecord {
            rank,
            seq: self.seq,
            group: self.group,
            group_rank: self.group_rank as usize,
            group_size: self.group_size as usize,
            op: self.op.to_string(),
            call: self.call,
            bytes: self.bytes,
            peers: self.peers[..self.npeers as usize]
                .iter()
                .map(|&p| p as usize)
                .collect(),
            start_us: self.start_us,
            end_us: self.end_us,
            status: match &self.status {
                Status::InFlight => IN_FLIGHT.to_string(),
                Status::Ok => "ok".to_string(),
                Status::Failed(e) => e.to_string(),
            },
        }
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_micros() as u64
}

impl Recorder {
    /// A recorder for world rank `rank`, registered for [`dump_all`] and the signal handler.
    pub(crate) fn new(rank: usize) -> Arc<Recorder> {
        let r = Arc::new(Recorder {
            rank,
            inner: Mutex::new(Inner {
                capacity: DEFAULT_CAPACITY,
                next_seq: 0,
                records: VecDeque::with_capacity(DEFAULT_CAPACITY),
                groups: BTreeMap::new(),
                dumped_on_error: false,
            }),
        });
        let mut live = live().lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|w| w.strong_count() > 0);
        live.push(Arc::downgrade(&r));
        r
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keep the last `n` calls (at least 1).
    pub fn set_capacity(&self, n: usize) {
        let mut g = self.lock();
        g.capacity = n.max(1);
        while g.records.len() > g.capacity {
            g.records.pop_front();
        }
    }

    /// Record the start of a call; returns its sequence number for [`Recorder::end`].
    pub(crate) fn begin(&self, c: CallInfo) -> u64 {
        let mut g = self.lock();
        g.groups
            .entry(c.group)
            .or_insert_with(|| c.members.to_vec());
        let seq = g.next_seq;
        g.next_seq += 1;
        if g.records.len() == g.capacity {
            g.records.pop_front();
        }
        let mut peers = [0u32; 2];
        let npeers = c.peers.len().min(2);
        for (d, &p) in peers.iter_mut().zip(c.peers) {
            *d = p as u32;
        }
        g.records.push_back(Rec {
            seq,
            group: c.group,
            group_rank: c.group_rank as u32,
            group_size: c.members.len() as u32,
            op: c.op,
            call: c.call,
            bytes: c.bytes as u64,
            peers,
            npeers: npeers as u8,
            start_us: now_us(),
            end_us: None,
            status: Status::InFlight,
        });
        seq
    }

    /// Record how call `seq` ended (`Err`: the error's message).
    pub(crate) fn end(&self, seq: u64, outcome: Result<(), &dyn std::fmt::Display>) {
        let mut g = self.lock();
        let first = g.records.front().map_or(0, |r| r.seq);
        if let Some(r) = seq
            .checked_sub(first)
            .and_then(|i| g.records.get_mut(i as usize))
        {
            r.end_us = Some(now_us());
            r.status = match outcome {
                Ok(()) => Status::Ok,
                Err(e) => Status::Failed(e.to_string().into_boxed_str()),
            };
        }
    }

    /// The calls kept, oldest first.
    pub fn records(&self) -> Vec<CallRecord> {
        self.lock()
            .records
            .iter()
            .map(|r| r.public(self.rank))
            .collect()
    }

    /// Write the calls as JSON lines to `path` (replacing it), with `reason` in the header line.
    pub fn dump(&self, path: &Path, reason: &str) -> io::Result<()> {
        let (header, records) = {
            let g = self.lock();
            let header = DumpHeader {
                rank: self.rank,
                reason: reason.to_string(),
                time_us: now_us(),
                groups: g
                    .groups
                    .iter()
                    .map(|(&group, m)| GroupMembers {
                        group,
                        members: m.clone(),
                    })
                    .collect(),
            };
            let records: Vec<CallRecord> = g.records.iter().map(|r| r.public(self.rank)).collect();
            (header, records)
        };
        let mut out = io::BufWriter::new(std::fs::File::create(path)?);
        serde_json::to_writer(&mut out, &header)?;
        out.write_all(b"\n")?;
        for r in &records {
            serde_json::to_writer(&mut out, r)?;
            out.write_all(b"\n")?;
        }
        out.flush()
    }

    /// The file this rank dumps to in folder `dir`.
    pub fn file_in(&self, dir: &Path) -> PathBuf {
        dir.join(format!("flight-rank-{}.jsonl", self.rank))
    }

    /// After the first error of this rank: dump to the configured folder, once.
    pub(crate) fn dump_on_error(&self, reason: &str) {
        let Some(dir) = dump_dir() else { return };
        {
            let mut g = self.lock();
            if g.dumped_on_error {
                return;
            }
            g.dumped_on_error = true;
        }
        report(self.dump_into(&dir, reason), self.rank);
    }

    fn dump_into(&self, dir: &Path, reason: &str) -> io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = self.file_in(dir);
        self.dump(&path, reason).map(|_| path)
    }
}

fn report(r: io::Result<PathBuf>, rank: usize) {
    match r {
        Ok(p) => eprintln!(
            "scaletrain-comm: rank {rank}: flight recorder written to {}",
            p.display()
        ),
        Err(e) => {
            eprintln!("scaletrain-comm: rank {rank}: could not write the flight recorder: {e}")
        }
    }
}

fn live() -> &'static Mutex<Vec<Weak<Recorder>>> {
    static LIVE: OnceLock<Mutex<Vec<Weak<Recorder>>>> = OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(Vec::new()))
}

fn dir_cell() -> &'static Mutex<Option<PathBuf>> {
    static DIR: OnceLock<Mutex<Option<PathBuf>>> = OnceLock::new();
    DIR.get_or_init(|| {
        Mutex::new(
            std::env::var_os("SCALETRAIN_FLIGHT_DIR")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
        )
    })
}

/// Where automatic dumps go (`None`: nowhere, the default unless `SCALETRAIN_FLIGHT_DIR` is set).
/// Each rank writes `flight-rank-<R>.jsonl` there.
pub fn set_dump_dir(dir: Option<PathBuf>) {
    *dir_cell().lock().unwrap_or_else(|p| p.into_inner()) = dir;
}

/// The folder automatic dumps go to, if any.
pub fn dump_dir() -> Option<PathBuf> {
    dir_cell().lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The hook for a program that gives up (or is told to): dump every live recorder of this process
/// into the dump folder with `reason`. Returns the files written (nothing without a folder).
pub fn dump_all(reason: &str) -> Vec<io::Result<PathBuf>> {
    let Some(dir) = dump_dir() else {
        return Vec::new();
    };
    let recorders: Vec<Arc<Recorder>> = live()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    recorders
        .iter()
        .map(|r| r.dump_into(&dir, reason))
        .collect()
}

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int) {
    // Async-signal-safe: only an atomic store; a watcher thread does the writing.
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// Dump every recorder of this process (as [`dump_all`]) whenever it receives `SIGUSR1`
/// (`kill -USR1 <pid>` on a job that seems stuck). Installs the handler and a watcher thread
/// once; later calls do nothing.
pub fn install_signal_handler() -> io::Result<()> {
    static ONCE: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = ONCE.get_or_init(|| {
        // SAFETY: a zeroed sigaction with a handler that only stores to an atomic is valid.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigusr1 as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        std::thread::Builder::new()
            .name("flight-recorder".into())
            .spawn(|| loop {
                std::thread::sleep(Duration::from_millis(20));
                if SIGNALLED.swap(false, Ordering::SeqCst) {
                    for r in dump_all("SIGUSR1") {
                        match r {
                            Ok(p) => eprintln!(
                                "scaletrain-comm: SIGUSR1: flight recorder written to {}",
                                p.display()
                            ),
                            Err(e) => eprintln!(
                                "scaletrain-comm: SIGUSR1: could not write the flight recorder: {e}"
                            ),
                        }
                    }
                }
            })
            .map(|_| ())
            .map_err(|e| e.raw_os_error().unwrap_or(0))
    });
    r.map_err(io::Error::from_raw_os_error)
}

/// Read a dump written by [`Recorder::dump`].
pub fn read_dump(path: &Path) -> Result<Dump, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: DumpHeader = serde_json::from_str(lines.next().unwrap_or_default())
        .map_err(|e| format!("{}: header line: {e}", path.display()))?;
    let records = lines
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| format!("{}: line {}: {e}", path.display(), i + 2))
        })
        .collect::<Result<Vec<CallRecord>, String>>()?;
    Ok(Dump { header, records })
}

/// Collectives carry the same call number on every member; point-to-point and parameter-server
/// calls are counted per rank.
fn is_collective(op: &str) -> bool {
    op != "send/recv" && !op.starts_with("ps_")
}

fn list(ranks: &[usize]) -> String {
    ranks
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Read the dumps of one job together: for every group where some rank's last collective did not
/// finish, name the members that did not reach it.
///
/// ```text
///  rank 3 never entered all_reduce #1042 on group 0x0 (world ranks 0, 1, 2, 3); its last call
///    there: all_reduce #1041 (ok); ranks 0, 1, 2 entered it (status: timed out …)
///  rank 3 left no dump; on group 0x0 (…) ranks 0, 1, 2 did not finish all_reduce #1042 (…)
/// ```
pub fn diagnose(dumps: &[Dump]) -> Vec<String> {
    let by_rank: BTreeMap<usize, &Dump> = dumps.iter().map(|d| (d.header.rank, d)).collect();
    let mut groups: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for d in dumps {
        for g in &d.header.groups {
            groups.entry(g.group).or_insert_with(|| g.members.clone());
        }
    }
    let mut out = Vec::new();
    for (&gid, members) in &groups {
        // Each dumped member's last collective on this group.
        let last: BTreeMap<usize, &CallRecord> = members
            .iter()
            .filter_map(|m| {
                let d = by_rank.get(m)?;
                let r = d
                    .records
                    .iter()
                    .rev()
                    .find(|r| r.group == gid && is_collective(&r.op))?;
                Some((*m, r))
            })
            .collect();
        let Some(top) = last.values().map(|r| r.call).max() else {
            continue;
        };
        let at_top: Vec<&CallRecord> = last.values().filter(|r| r.call == top).copied().collect();
        if at_top.iter().all(|r| r.status == "ok") {
            continue; // the newest call finished wherever it was seen: nothing hangs here
        }
        let op = &at_top[0].op;
        let entered: Vec<usize> = at_top.iter().map(|r| r.rank).collect();
        let status: BTreeSet<&str> = at_top.iter().map(|r| r.status.as_str()).collect();
        let status = status.into_iter().collect::<Vec<_>>().join(" | ");
        let name = format!("group {gid:#x} (world ranks {})", list(members));
        for m in members {
            match last.get(m) {
                Some(r) if r.call < top => out.push(format!(
                    "rank {m} never entered {op} #{top} on {name}; its last call there: {} #{} ({}); \
                     ranks {} entered it (status: {status})",
                    r.op,
                    r.call,
                    r.status,
                    list(&entered)
                )),
                Some(_) => {}
                None if !by_rank.contains_key(m) => out.push(format!(
                    "rank {m} left no dump; on {name} ranks {} did not finish {op} #{top} \
                     (status: {status})",
                    list(&entered)
                )),
                None => out.push(format!(
                    "rank {m} never entered {op} #{top} on {name} (no call on it recorded); ranks {} \
                     entered it (status: {status})",
                    list(&entered)
                )),
            }
        }
    }
    // Calls that are not collectives (point to point, parameter-server pushes and pulls) have
    // no common call number; a call that failed waiting on named ranks names them itself.
    for d in dumps {
        let Some(r) = d.records.iter().rev().find(|r| r.status != "ok") else {
            continue;
        };
        for w in waited_on(&r.status) {
            if out.iter().any(|l| l.starts_with(&format!("rank {w} "))) {
                continue;
            }
            let last = by_rank.get(&w).and_then(|dw| dw.records.last());
            out.push(format!(
                "rank {w} {}; rank {} waited on it in {} #{} on group {:#x} (status: {})",
                match last {
                    Some(l) => format!(
                        "did not answer; its last call: {} #{} ({})",
                        l.op, l.call, l.status
                    ),
                    None if !by_rank.contains_key(&w) => "left no dump".into(),
                    None => "did not answer (no call recorded)".into(),
                },
                r.rank,
                r.op,
                r.call,
                r.group,
                r.status
            ));
        }
    }
    out
}

/// The ranks a status names as "waiting on rank(s) [1, 3]".
fn waited_on(status: &str) -> Vec<usize> {
    status
        .split("waiting on rank(s) [")
        .skip(1)
        .filter_map(|rest| rest.split(']').next())
        .flat_map(|l| l.split(',').filter_map(|x| x.trim().parse().ok()))
        .collect()
}

#[cfg(test)]
mod waited_tests {
    use super::*;

    fn rec(rank: usize, op: &str, call: u64, status: &str) -> CallRecord {
        CallRecord {
            rank,
            seq: call,
            group: 0,
            group_rank: rank,
            group_size: 3,
            op: op.into(),
            call,
            bytes: 8,
            peers: vec![],
            start_us: 1,
            end_us: None,
            status: status.into(),
        }
    }

    /// A parameter server's push that timed out on a stopped worker names it, though
    /// parameter-server calls have no common call number to compare.
    #[test]
    fn a_timed_out_non_collective_call_names_the_ranks_it_waited_on() {
        let server = Dump {
            header: DumpHeader {
                rank: 2,
                reason: "timeout".into(),
                time_us: 1,
                groups: vec![],
            },
            records: vec![
                rec(2, "ps_push", 7, "ok"),
                rec(
                    2,
                    "ps_push",
                    8,
                    "rank 2: ps_push: timed out after 2.0s with no progress waiting on rank(s) [1]",
                ),
            ],
        };
        let why = diagnose(&[server]);
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(
            why[0].starts_with("rank 1 left no dump; rank 2 waited on it in ps_push #8"),
            "{why:?}"
        );
        assert_eq!(waited_on("… waiting on rank(s) [0, 3]"), vec![0, 3]);
        assert!(waited_on("ok").is_empty());
    }
}
