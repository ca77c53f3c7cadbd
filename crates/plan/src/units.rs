//! Parsing and printing quantities: `10B`, `300B`, `1.5T`, `4M`, bytes as GB/GiB, seconds as days.
//!
//! Conventions: counts use SI suffixes (K = 1e3, M = 1e6, B or G = 1e9, T = 1e12); memory is printed
//! in GiB (2^30 bytes) and, where a paper uses decimal GB, the docs say so.

use crate::error::{invalid, Result};

/// Parses a positive count with an optional SI suffix: `124M`, `10B`, `1.5T`, `300e9`, `2048`.
pub fn parse_count(field: &'static str, text: &str) -> Result<f64> {
    let t = text.trim().replace(['_', ','], "");
    if t.is_empty() {
        return Err(invalid(
            field,
            "empty value; give a number such as 10B or 2048",
        ));
    }
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1e3),
        Some('m' | 'M') => (&t[..t.len() - 1], 1e6),
        Some('b' | 'B' | 'g' | 'G') => (&t[..t.len() - 1], 1e9),
        Some('t' | 'T') => (&t[..t.len() - 1], 1e12),
        _ => (t.as_str(), 1.0),
    };
    let v: f64 = num.trim().parse().map_err(|_| {
        invalid(
            field,
            format!("'{text}' is not a number; use e.g. 10B, 1.5T, 124M or 2048"),
        )
    })?;
    let v = v * mult;
    if !v.is_finite() || v <= 0.0 {
        return Err(invalid(
            field,
            format!("'{text}' must be a positive number"),
        ));
    }
    Ok(v)
}

/// Parses a positive integer count (suffixes allowed, result must be whole).
pub fn parse_int(field: &'static str, text: &str) -> Result<u64> {
    let v = parse_count(field, text)?;
    if v.fract() != 0.0 || v > 9.0e18 {
        return Err(invalid(field, format!("'{text}' must be a whole number")));
    }
    Ok(v as u64)
}

/// `12.3 GiB`-style rendering of a byte count.
pub fn gib(bytes: f64) -> String {
    format!("{:.2} GiB", bytes / GIB)
}

/// One GiB in bytes.
pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Human-readable count: 124.4M, 6.74B, 1.01T.
pub fn count(v: f64) -> String {
    let a = v.abs();
    if a >= 1e12 {
        format!("{:.3}T", v / 1e12)
    } else if a >= 1e9 {
        format!("{:.3}B", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e3 {
        format!("{:.1}K", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// Seconds as the most readable unit.
pub fn duration(secs: f64) -> String {
    if secs >= 86400.0 {
        format!("{:.1} days", secs / 86400.0)
    } else if secs >= 3600.0 {
        format!("{:.1} h", secs / 3600.0)
    } else if secs >= 1.0 {
        format!("{secs:.3} s")
    } else {
        format!("{:.2} ms", secs * 1e3)
    }
}

/// FLOPs with an SI prefix: `3.15e23 FLOPs` reads worse than `315 ZFLOP`... we print both forms.
pub fn flops(v: f64) -> String {
    format!("{v:.3e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_parse_with_suffixes() {
        assert_eq!(parse_count("x", "10B").unwrap(), 1e10);
        assert_eq!(parse_count("x", "1.5T").unwrap(), 1.5e12);
        assert_eq!(parse_count("x", "124M").unwrap(), 124e6);
        assert_eq!(parse_count("x", "2_048").unwrap(), 2048.0);
        assert_eq!(parse_int("x", "4K").unwrap(), 4000);
    }

    #[test]
    fn bad_counts_name_the_field() {
        let e = parse_count("--params", "ten").unwrap_err().to_string();
        assert!(e.contains("--params") && e.contains("not a number"), "{e}");
        assert!(parse_count("--params", "-3B").is_err());
        assert!(parse_count("--params", "0").is_err());
        assert!(parse_int("--layers", "1.5").is_err());
    }
}
