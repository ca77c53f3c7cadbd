//! Property tests of every decoder of files a user or another process hands the trainer: token
//! files, the TOML config (and `--set` overrides), checkpoint manifests (parsed, and loaded with
//! their data files), safetensors weights and Hugging Face `config.json`. Each test mutates
//! valid inputs (bit flips, truncation, splices, interesting integers, and edits that keep the
//! structure: a JSON/TOML value replaced, a key removed, a checksum recomputed so the checks
//! behind it run) and asserts, per input: no panic (`catch_unwind`), the structured error type,
//! and no single allocation above [`BOUND`] (a counting global allocator: a length field of
//! 2^40 must be refused before anything that size is allocated).
//!
//! `SCALETRAIN_PROPTEST_CASES=N` sets the inputs per decoder (default 5,000: seconds; token
//! files, the cheapest, get 6 N);
//! `SCALETRAIN_PROPTEST_SEED=S` changes the seed (printed). The 10-million-input run is in
//! docs/reliability.md. A failing input is named by its case number; rerunning with the same
//! seed and count reproduces it.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;
use train::checkpoint::{self, TrainState};
use train::{TrainConfig, TrainError};

/// The largest single allocation a decoder may make on these small inputs (they are all under
/// 64 KiB; a decoder that trusts a length field asks for far more).
const BOUND: usize = 64 << 20;

static LARGEST: AtomicUsize = AtomicUsize::new(0);
static CASE: AtomicU64 = AtomicU64::new(u64::MAX);

/// The system allocator, refusing (and reporting) any request above [`BOUND`].
struct Capped;

fn over_bound(size: usize) {
    // No allocation here: format into a stack buffer.
    use std::io::Write;
    let mut buf = [0u8; 200];
    let mut w = &mut buf[..];
    let _ = write!(
        w,
        "\ndecoder property test: an allocation of {size} bytes (over the {BOUND} bound) in case {}\n",
        CASE.load(Ordering::Relaxed)
    );
    let n = 200 - w.len();
    let _ = std::io::stderr().write_all(&buf[..n]);
}

// SAFETY: forwards to the system allocator; only refuses sizes above the bound (returns null,
// which the standard library reports as an allocation failure).
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > BOUND {
            over_bound(l.size());
            return std::ptr::null_mut();
        }
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.size() > BOUND {
            over_bound(l.size());
            return std::ptr::null_mut();
        }
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > BOUND {
            over_bound(new);
            return std::ptr::null_mut();
        }
        LARGEST.fetch_max(new, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Capped = Capped;

/// SplitMix64 (Steele, Lea, Flood 2014): a seeded generator with no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn cases() -> usize {
    std::env::var("SCALETRAIN_PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5_000)
}

fn seed() -> u64 {
    std::env::var("SCALETRAIN_PROPTEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5ca1_e7a1_0000_0013)
}

/// Integers a length or count field is likely to get wrong.
const INTERESTING: [u64; 14] = [
    0,
    1,
    2,
    7,
    255,
    65_535,
    65_536,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
];

/// Byte-level mutations: 1–4 of flip, set, truncate, insert, overwrite with an interesting
/// integer, splice a dictionary word, delete a range.
fn mutate_bytes(rng: &mut Rng, v: &mut Vec<u8>, dict: &[&str]) {
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = rng.next() as u8;
            }
            2 => v.truncate(rng.below(len + 1)),
            3 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(at..at, junk);
            }
            4 if len >= 8 => {
                let x = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let w = if rng.below(2) == 0 { 4 } else { 8 };
                let at = rng.below(len - w + 1);
                v[at..at + w].copy_from_slice(&x[..w]);
            }
            5 if !dict.is_empty() => {
                let at = rng.below(len + 1);
                let word = dict[rng.below(dict.len())].as_bytes().to_vec();
                v.splice(at..at, word);
            }
            _ if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(32)).min(len);
                v.drain(a..b);
            }
            _ => v.push(rng.next() as u8),
        }
    }
}

/// A JSON value a field is unlikely to expect.
fn odd_json(rng: &mut Rng) -> serde_json::Value {
    use serde_json::json;
    match rng.below(14) {
        0 => json!(null),
        1 => json!(true),
        2 => json!(-1),
        3 => json!(0),
        4 => json!(INTERESTING[rng.below(INTERESTING.len())]),
        5 => json!(i64::MIN),
        6 => json!(1e308),
        7 => json!(-0.5),
        8 => json!(""),
        9 => json!("../../etc/passwd"),
        10 => json!([]),
        11 => json!([1, 2, 3]),
        12 => json!({}),
        _ => json!("x".repeat(rng.below(300))),
    }
}

/// Structure-aware JSON mutation: a random value (anywhere in the tree) replaced, removed,
/// or a number nudged.
fn mutate_json(rng: &mut Rng, v: &mut serde_json::Value) {
    use serde_json::Value;
    let go_on = rng.below(3) != 0;
    match v {
        Value::Object(m) if !m.is_empty() && go_on => {
            let k = m.keys().nth(rng.below(m.len())).cloned().unwrap();
            if rng.below(6) == 0 {
                m.remove(&k);
            } else if let Some(child) = m.get_mut(&k) {
                mutate_json(rng, child);
            }
        }
        Value::Array(a) if !a.is_empty() && go_on => {
            let i = rng.below(a.len());
            if rng.below(6) == 0 {
                a.remove(i);
            } else {
                mutate_json(rng, &mut a[i]);
            }
        }
        Value::Number(n) if rng.below(2) == 0 => {
            let x = n.as_i64().unwrap_or(0);
            *v = serde_json::json!(x.wrapping_add(rng.below(5) as i64 - 2));
        }
        _ => *v = odd_json(rng),
    }
}

/// Runs `cases` inputs through `decode` (which returns whether the input was accepted, or an
/// error message if an invariant broke), counting panics; prints a summary line and asserts
/// no panic and no broken invariant.
fn run(name: &str, decode: impl FnMut(&mut Rng, u64) -> Result<bool, String>) {
    run_n(name, cases(), decode)
}

/// [`run`] with `n` inputs.
fn run_n(name: &str, n: usize, mut decode: impl FnMut(&mut Rng, u64) -> Result<bool, String>) {
    let base = seed();
    let t = Instant::now();
    let (mut accepted, mut panics, mut broken) = (0usize, Vec::new(), Vec::new());
    // SCALETRAIN_PROPTEST_ONLY=i runs case i alone (to look at a failure).
    let only: Option<u64> = std::env::var("SCALETRAIN_PROPTEST_ONLY")
        .ok()
        .and_then(|s| s.parse().ok());
    for i in only.map_or(0..n as u64, |i| i..i + 1) {
        CASE.store(i, Ordering::Relaxed);
        let mut rng = Rng(base ^ i.wrapping_mul(0xA24B_AED4_963E_E407));
        match catch_unwind(AssertUnwindSafe(|| decode(&mut rng, i))) {
            Ok(Ok(a)) => accepted += usize::from(a),
            Ok(Err(why)) => broken.push(format!("case {i}: {why}")),
            Err(_) => panics.push(i),
        }
    }
    println!(
        "decoder property test: {name}: {n} inputs ({accepted} accepted), {} panics, largest \
         allocation in this test binary so far {} bytes, {:.1} s (seed {base})",
        panics.len(),
        LARGEST.load(Ordering::Relaxed),
        t.elapsed().as_secs_f64()
    );
    assert!(
        panics.is_empty(),
        "{name}: {} input(s) panicked (seed {base}), cases {:?}",
        panics.len(),
        &panics[..panics.len().min(20)]
    );
    assert!(
        broken.is_empty(),
        "{name}: {} input(s) broke an invariant: {:?}",
        broken.len(),
        &broken[..broken.len().min(5)]
    );
}

fn sha256(b: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}

#[test]
fn token_files() {
    let d = common::tmp("decoders", "tokens");
    let mut bases = Vec::new();
    for (vocab, n) in [(300u32, 40usize), (70_000, 17), (5, 0)] {
        let p = d.join(format!("v{vocab}.tok"));
        let toks: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % vocab).collect();
        train::tokens::write_tokens(&p, &toks, vocab).unwrap();
        bases.push(std::fs::read(&p).unwrap());
    }
    let path = d.join("fuzzed.tok");
    // Six times the inputs of the other decoders: a token file is decoded in under a
    // microsecond.
    run_n("token files", 6 * cases(), |rng, _| {
        let mut b = bases[rng.below(bases.len())].clone();
        mutate_bytes(rng, &mut b, &["STTOKENS"]);
        // Half the inputs carry a correct checksum, so the checks behind it run too.
        if rng.below(2) == 0 && b.len() >= 64 {
            let h = sha256(&b[64..]);
            b[32..64].copy_from_slice(&h);
        }
        match train::tokens::parse_tokens(&path, &b) {
            Ok(f) => {
                let count = u64::from_le_bytes(b[24..32].try_into().unwrap());
                if f.tokens.len() as u64 != count || f.tokens.iter().any(|&t| t >= f.vocab_size) {
                    return Err(format!(
                        "accepted an inconsistent file ({} tokens)",
                        f.tokens.len()
                    ));
                }
                Ok(true)
            }
            Err(TrainError::TokenFile { .. }) => Ok(false),
            Err(e) => Err(format!("unexpected error kind: {e}")),
        }
    });
}

/// Replaces a random leaf of a TOML table with an odd value, or removes it.
fn mutate_toml(rng: &mut Rng, t: &mut toml::Table) {
    use toml::Value;
    let keys: Vec<String> = t.keys().cloned().collect();
    if keys.is_empty() {
        return;
    }
    let k = &keys[rng.below(keys.len())];
    if let Some(Value::Table(sub)) = t.get_mut(k) {
        if rng.below(4) != 0 {
            return mutate_toml(rng, sub);
        }
    }
    if rng.below(8) == 0 {
        t.remove(k);
        return;
    }
    let v = match rng.below(13) {
        0 => Value::Integer(-1),
        1 => Value::Integer(0),
        2 => Value::Integer(INTERESTING[rng.below(INTERESTING.len())] as i64),
        3 => Value::Integer(i64::MIN),
        4 => Value::Float(f64::NAN),
        5 => Value::Float(f64::INFINITY),
        6 => Value::Float(-1e300),
        7 => Value::Float(1e-320),
        8 => Value::String(String::new()),
        9 => Value::String("files".into()),
        10 => Value::Boolean(true),
        11 => Value::Array(vec![Value::Integer(1)]),
        _ => Value::Table(toml::Table::new()),
    };
    t.insert(k.clone(), v);
}

#[test]
fn toml_config_and_overrides() {
    let mut base = common::tiny(10);
    base.model.vocab_size = Some(16);
    let text = base.to_toml();
    let table: toml::Table = toml::from_str(&text).unwrap();
    let keys: Vec<String> = table
        .iter()
        .flat_map(|(s, v)| {
            v.as_table()
                .into_iter()
                .flat_map(move |t| t.keys().map(move |k| format!("{s}.{k}")))
        })
        .collect();
    let values = [
        "0",
        "-1",
        "1e400",
        "nan",
        "inf",
        "\"\"",
        "[1,",
        "{}",
        "4294967296",
        "1099511627776",
        "true",
        "\"files\"",
        "9223372036854775807",
        "-9223372036854775808",
        "0.5",
        "= =",
    ];
    let dict = [
        "[model]", "[train]", "=", "\"", "\n", "n_layer", "[[x]]", "'''", "#",
    ];
    run("TOML config", |rng, _| {
        let table = if rng.below(3) == 0 {
            // Text-level: the parser's own errors.
            let mut b = text.clone().into_bytes();
            mutate_bytes(rng, &mut b, &dict);
            match toml::from_str::<toml::Table>(&String::from_utf8_lossy(&b)) {
                Ok(t) => t,
                Err(_) => return Ok(false),
            }
        } else {
            let mut t = table.clone();
            for _ in 0..1 + rng.below(3) {
                mutate_toml(rng, &mut t);
            }
            t
        };
        let mut table = table;
        // And a few `--set` overrides, valid keys with odd values or odd keys.
        for _ in 0..rng.below(3) {
            let key = if rng.below(4) == 0 {
                ["", ".", "model..x", "model", "a.b.c.d"][rng.below(5)].to_string()
            } else {
                keys[rng.below(keys.len())].clone()
            };
            let sep = if rng.below(8) == 0 { "" } else { "=" };
            let assignment = format!("{key}{sep}{}", values[rng.below(values.len())]);
            match train::config::apply_override(&mut table, &assignment) {
                Ok(()) => {}
                Err(TrainError::Config { .. }) => return Ok(false),
                Err(e) => return Err(format!("unexpected error kind: {e}")),
            }
        }
        match TrainConfig::from_table(table, "fuzz").and_then(|c| c.check("fuzz").map(|()| c)) {
            Ok(_) => Ok(true),
            Err(TrainError::Config { .. }) => Ok(false),
            Err(e) => Err(format!("unexpected error kind: {e}")),
        }
    });
}

/// A one-process checkpoint of the tiny model in `dir`; returns its manifest path and layout.
fn tiny_checkpoint(dir: &Path) -> (std::path::PathBuf, model::ParamLayout) {
    let mut cfg = common::tiny(10);
    cfg.model.vocab_size = Some(16);
    let mcfg = train::trainer::model_config(&cfg, 16);
    let layout = model::ParamLayout::new(&mcfg, &model::Shard::full(&mcfg)).unwrap();
    let n = layout.len();
    let state = TrainState {
        step: 3,
        params: (0..n).map(|i| (i as f32 * 0.37).sin()).collect(),
        m: vec![0.25; n],
        v: vec![0.5; n],
        adam_step: 3,
        data_position: Default::default(),
        tokens_seen: 384,
        best_val_loss: Some(2.5),
        evals_without_improvement: 0,
        stability: None,
    };
    (
        checkpoint::save(dir, &cfg, &layout, &state).unwrap(),
        layout,
    )
}

#[test]
fn checkpoint_manifests() {
    let d = common::tmp("decoders", "manifest");
    let (manifest, _) = tiny_checkpoint(&d);
    let text = std::fs::read_to_string(&manifest).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    // The deep cases write the manifest next to the real data files and load the checkpoint.
    let fuzzed = d.join("step-00000099.json");
    let dict = [
        "\"step\"", ":", ",", "{", "}", "[", "]", "null", "\"..\"", "1e999",
    ];
    run("checkpoint manifests", |rng, _| {
        let text = if rng.below(3) == 0 {
            let mut b = text.clone().into_bytes();
            mutate_bytes(rng, &mut b, &dict);
            String::from_utf8_lossy(&b).into_owned()
        } else {
            let mut v = value.clone();
            for _ in 0..1 + rng.below(3) {
                mutate_json(rng, &mut v);
            }
            v.to_string()
        };
        if std::env::var("SCALETRAIN_PROPTEST_ONLY").is_ok() {
            println!("manifest: {text}");
        }
        let parsed = match checkpoint::parse_manifest(&fuzzed, &text) {
            Ok(_) => true,
            Err(TrainError::Checkpoint { .. }) => false,
            Err(e) => return Err(format!("unexpected error kind: {e}")),
        };
        // One in eight accepted manifests is loaded with its data files (the model it
        // describes, the optimizer ranges it lists, the SHA-256 of every file).
        if parsed && rng.below(8) == 0 {
            std::fs::write(&fuzzed, &text).unwrap();
            match checkpoint::load(&fuzzed) {
                Ok(_)
                | Err(TrainError::Checkpoint { .. })
                | Err(TrainError::Weights { .. })
                | Err(TrainError::Model(_)) => {}
                Err(e) => return Err(format!("unexpected error kind from load: {e}")),
            }
        }
        Ok(parsed)
    });
}

#[test]
fn safetensors_weights() {
    let d = common::tmp("decoders", "safetensors");
    let (manifest, layout) = tiny_checkpoint(&d);
    let m = checkpoint::read_manifest(&manifest).unwrap();
    let bytes = std::fs::read(d.join(&m.model_file.name)).unwrap();
    let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + hlen]).unwrap();
    let data = bytes[8 + hlen..].to_vec();
    let path = d.join("fuzzed.safetensors");
    run("safetensors weights", |rng, _| {
        let b = match rng.below(3) {
            0 => {
                let mut b = bytes.clone();
                mutate_bytes(
                    rng,
                    &mut b,
                    &["{", "\"F32\"", "\"shape\"", "\"data_offsets\""],
                );
                b
            }
            _ => {
                // The header edited as JSON (offsets, shapes, dtypes, names), the data kept.
                let mut h = header.clone();
                for _ in 0..1 + rng.below(3) {
                    mutate_json(rng, &mut h);
                }
                let h = h.to_string().into_bytes();
                let mut b = (h.len() as u64).to_le_bytes().to_vec();
                if rng.below(8) == 0 {
                    b = INTERESTING[rng.below(INTERESTING.len())]
                        .to_le_bytes()
                        .to_vec();
                }
                b.extend_from_slice(&h);
                b.extend_from_slice(&data[..data.len() - rng.below(2) * rng.below(64)]);
                b
            }
        };
        match checkpoint::load_hf_weights(&path, &b, &layout) {
            Ok(p) if p.len() == layout.len() => Ok(true),
            Ok(p) => Err(format!(
                "{} parameters for a layout of {}",
                p.len(),
                layout.len()
            )),
            Err(TrainError::Weights { .. }) => Ok(false),
            Err(e) => Err(format!("unexpected error kind: {e}")),
        }
    });
}

#[test]
fn hugging_face_config_json() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../reference/fixtures/hf_gpt2_tiny/config.json"
    );
    let text = std::fs::read_to_string(fixture).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let spec = plan::hf_config::from_hf_config(&text).unwrap();
    let mut cfg = common::tiny(10);
    cfg.model.n_layer = spec.layers as usize;
    cfg.model.channels = spec.hidden as usize;
    cfg.model.n_head = spec.heads as usize;
    cfg.model.seq_len = spec.seq_len as usize;
    let vocab = spec.vocab as usize;
    let mcfg = train::trainer::model_config(&cfg, vocab);
    let layout = model::ParamLayout::new(&mcfg, &model::Shard::full(&mcfg)).unwrap();
    let path = Path::new("fuzzed/config.json");
    train::checkpoint::check_hf_config(path, &text, &layout).unwrap();
    run("Hugging Face config.json", |rng, _| {
        let text = if rng.below(3) == 0 {
            let mut b = text.clone().into_bytes();
            mutate_bytes(rng, &mut b, &["\"n_layer\"", ":", "null", "1e999", "-"]);
            String::from_utf8_lossy(&b).into_owned()
        } else {
            let mut v = value.clone();
            for _ in 0..1 + rng.below(3) {
                mutate_json(rng, &mut v);
            }
            v.to_string()
        };
        // The planner's reader (`estimate --hf-config`) and the trainer's check.
        if let Err(e) = plan::hf_config::from_hf_config(&text) {
            if !matches!(e, plan::PlanError::HfConfig(_)) {
                return Err(format!("unexpected planner error kind: {e}"));
            }
        }
        match train::checkpoint::check_hf_config(path, &text, &layout) {
            Ok(()) => Ok(true),
            Err(TrainError::Weights { .. }) => Ok(false),
            Err(e) => Err(format!("unexpected error kind: {e}")),
        }
    });
}

/// Found by `checkpoint_manifests` (case 1,367,127 of the default seed, in the 2-million run): a
/// manifest whose config says n_layer 4294967295 made loading allocate 768 GiB for the layout
/// (and larger values overflowed a capacity: a panic). Refused now from the weights files' size.
#[test]
fn manifest_describing_a_huge_model_is_refused_before_allocating() {
    let d = common::tmp("decoders", "huge");
    let (manifest, _) = tiny_checkpoint(&d);
    let text = std::fs::read_to_string(&manifest).unwrap();
    for (key, value) in [
        ("n_layer", serde_json::json!(4_294_967_295u64)),
        ("n_layer", serde_json::json!(u64::MAX)),
        ("channels", serde_json::json!(1u64 << 40)),
        ("vocab_size", serde_json::json!(1u64 << 40)),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["config"]["model"][key] = value.clone();
        std::fs::write(&manifest, v.to_string()).unwrap();
        match checkpoint::load(&manifest) {
            Err(TrainError::Checkpoint { reason, .. }) => assert!(
                reason.contains("but its weights files hold"),
                "{key} = {value}: {reason}"
            ),
            other => panic!("{key} = {value}: {:?}", other.map(|_| ())),
        }
    }
}

/// Found by `checkpoint_manifests` (case 148106 of the default seed): a manifest naming a
/// 300-byte file was accepted and loading failed with the OS's "file name too long" instead of
/// saying the manifest is bad.
#[test]
fn manifest_naming_an_overlong_file_is_refused() {
    let d = common::tmp("decoders", "long-name");
    let (manifest, _) = tiny_checkpoint(&d);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    v["model_file"]["name"] = serde_json::json!("x".repeat(300));
    match checkpoint::parse_manifest(&manifest, &v.to_string()) {
        Err(TrainError::Checkpoint { reason, .. }) => {
            assert!(reason.contains("is not a plain file name"), "{reason}")
        }
        other => panic!("accepted or wrong error: {other:?}"),
    }
}
