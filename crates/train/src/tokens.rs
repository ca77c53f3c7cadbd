//! The token file format (`.tok`): a fixed 64-byte header, then the token ids.
//!
//! ```text
//! offset  size  field
//!      0     8  magic        b"STTOKENS"
//!      8     4  version      u32 LE, currently 1
//!     12     4  dtype        u32 LE, bytes per token: 2 (u16) or 4 (u32)
//!     16     4  vocab_size   u32 LE, every token id is below it
//!     20     4  reserved     u32 LE, 0
//!     24     8  token_count  u64 LE
//!     32    32  checksum     SHA-256 of the token bytes (everything after the header)
//!     64     …  tokens       token_count × dtype bytes, little-endian
//! ```
//!
//! u16 is used whenever the vocabulary fits (≤ 65536), halving the file. Loading checks every
//! field, the exact file length, the checksum and every id against the vocabulary, and says
//! which check failed.

use crate::error::{io, TrainError};
use crate::fsutil::write_atomic;
use std::path::Path;

/// The first 8 bytes of every token file.
pub const MAGIC: [u8; 8] = *b"STTOKENS";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Bytes before the first token.
pub const HEADER_BYTES: usize = 64;

/// A validated token file in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenFile {
    /// Every id is below this.
    pub vocab_size: u32,
    /// The tokens, widened to u32.
    pub tokens: Vec<u32>,
}

/// Writes `tokens` (each below `vocab_size`) to `path` atomically. Panics if an id is out of
/// range (the caller produced them).
pub fn write_tokens(path: &Path, tokens: &[u32], vocab_size: u32) -> Result<(), TrainError> {
    assert!(
        tokens.iter().all(|&t| t < vocab_size),
        "write_tokens: id out of range"
    );
    let dtype: u32 = if vocab_size <= 65_536 { 2 } else { 4 };
    let mut body = Vec::with_capacity(tokens.len() * dtype as usize);
    for &t in tokens {
        if dtype == 2 {
            body.extend_from_slice(&(t as u16).to_le_bytes());
        } else {
            body.extend_from_slice(&t.to_le_bytes());
        }
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&dtype.to_le_bytes());
    out.extend_from_slice(&vocab_size.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    out.extend_from_slice(&sha256(&body));
    out.extend_from_slice(&body);
    write_atomic(path, &out)
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// Reads and validates a token file.
pub fn read_tokens(path: &Path) -> Result<TokenFile, TrainError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    parse_tokens(path, &bytes)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Validates the bytes of a token file (`path` only names it in errors).
pub fn parse_tokens(path: &Path, bytes: &[u8]) -> Result<TokenFile, TrainError> {
    let bad = |reason: String| TrainError::TokenFile {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < HEADER_BYTES {
        return Err(bad(format!(
            "truncated: {} bytes, but the header alone is {HEADER_BYTES}",
            bytes.len()
        )));
    }
    if bytes[0..8] != MAGIC {
        return Err(bad(format!(
            "wrong magic {:?} (expected {:?}); not a scaletrain token file (make one with `scaletrain data prepare`)",
            String::from_utf8_lossy(&bytes[0..8]),
            String::from_utf8_lossy(&MAGIC)
        )));
    }
    let version = u32_at(bytes, 8);
    if version != VERSION {
        return Err(bad(format!(
            "version {version}, this program reads version {VERSION}"
        )));
    }
    let dtype = u32_at(bytes, 12);
    if dtype != 2 && dtype != 4 {
        return Err(bad(format!(
            "dtype {dtype} bytes per token, must be 2 (u16) or 4 (u32)"
        )));
    }
    let vocab_size = u32_at(bytes, 16);
    if vocab_size == 0 || (dtype == 2 && vocab_size > 65_536) {
        return Err(bad(format!(
            "vocab_size {vocab_size} does not fit dtype {dtype}"
        )));
    }
    let mut count_bytes = [0u8; 8];
    count_bytes.copy_from_slice(&bytes[24..32]);
    let count = u64::from_le_bytes(count_bytes);
    let expected = (count as u128) * dtype as u128 + HEADER_BYTES as u128;
    if bytes.len() as u128 != expected {
        return Err(bad(format!(
            "{} bytes, but the header announces {count} tokens × {dtype} bytes + {HEADER_BYTES} = {expected} bytes ({})",
            bytes.len(),
            if (bytes.len() as u128) < expected { "truncated" } else { "trailing data" }
        )));
    }
    let body = &bytes[HEADER_BYTES..];
    if sha256(body)[..] != bytes[32..64] {
        return Err(bad(
            "checksum mismatch: the token bytes are not the ones that were written (corrupt or modified)"
                .into(),
        ));
    }
    let tokens: Vec<u32> = if dtype == 2 {
        body.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
            .collect()
    } else {
        body.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    if let Some(i) = tokens.iter().position(|&t| t >= vocab_size) {
        return Err(bad(format!(
            "token {i} is {}, not below the vocabulary size {vocab_size}",
            tokens[i]
        )));
    }
    Ok(TokenFile { vocab_size, tokens })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("st-tokens-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn roundtrip_u16_and_u32() {
        let d = dir("rt");
        for vocab in [300u32, 70_000] {
            let toks: Vec<u32> = (0..1000).map(|i| (i * 7919) % vocab).collect();
            let p = d.join(format!("v{vocab}.tok"));
            write_tokens(&p, &toks, vocab).unwrap();
            let len = std::fs::metadata(&p).unwrap().len() as usize;
            assert_eq!(len, 64 + 1000 * if vocab > 65536 { 4 } else { 2 });
            let f = read_tokens(&p).unwrap();
            assert_eq!(f.tokens, toks);
            assert_eq!(f.vocab_size, vocab);
        }
    }

    #[test]
    fn corrupt_files_are_refused_with_the_reason() {
        let d = dir("bad");
        let p = d.join("ok.tok");
        write_tokens(&p, &[1, 2, 3, 4, 5], 10).unwrap();
        let good = std::fs::read(&p).unwrap();
        let check = |bytes: &[u8], needle: &str| {
            let e = parse_tokens(&p, bytes).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} lacks {needle}");
            assert!(e.contains("ok.tok"), "{e} does not name the file");
        };
        check(&good[..good.len() - 1], "truncated");
        check(&good[..10], "header alone");
        let mut b = good.clone();
        b[0] = b'X';
        check(&b, "wrong magic");
        let mut b = good.clone();
        b[8] = 9;
        check(&b, "version 9");
        let mut b = good.clone();
        b[12] = 3;
        check(&b, "dtype 3");
        let mut b = good.clone();
        *b.last_mut().unwrap() ^= 1;
        check(&b, "checksum mismatch");
        let mut b = good.clone();
        b.push(0);
        check(&b, "trailing data");
        // An id above the vocabulary with a matching checksum (a buggy writer).
        let mut b = good.clone();
        b[64] = 50;
        let sum = sha256(&b[64..]);
        b[32..64].copy_from_slice(&sum);
        check(&b, "not below the vocabulary size 10");
        let e = read_tokens(&d.join("missing.tok")).unwrap_err().to_string();
        assert!(e.contains("missing.tok"), "{e}");
    }
}
