//! `memgate::guard::estimate`: the admission layer reads a unary call's 5-byte
//! gRPC length prefix and the `grpc-timeout` header before anything else, on
//! every call, from any client.
//!
//! Input: any bytes.
//! - `parse_prefix` reads the input itself;
//! - `Estimate::for_prefix` gets `copies`, `overhead` and `compressed` from the
//!   first 24 bytes (big-endian, zero-padded) and the prefix from the 5 bytes after
//!   them (or from the input's start), both compressed and not, and must equal
//!   the exact result clamped to `u64::MAX` (saturating, never wrapping);
//! - `parse_grpc_timeout` reads the input as text (lossily converted), and also
//!   each of its lines, so short header-like values are tried often.
//!
//! Invariants: a parsed timeout is 1 to 8 digits and a unit, equals the exact
//! value, and `Instant::now() + timeout` (what the layer computes) cannot overflow.

use std::time::{Duration, Instant};

use memgate::guard::estimate::{Estimate, Prefix, parse_grpc_timeout, parse_prefix};

pub fn run(data: &[u8]) {
    check_prefix(data);
    check_for_prefix(data);
    let text = String::from_utf8_lossy(data);
    check_timeout(&text);
    for line in text.lines() {
        check_timeout(line);
    }
}

fn check_prefix(data: &[u8]) {
    let p = parse_prefix(data);
    assert_eq!(p.is_some(), data.len() >= 5, "{data:?}");
    if let Some(p) = p {
        assert_eq!(p.compressed, data[0] != 0);
        assert_eq!(
            p.len,
            u32::from_be_bytes([data[1], data[2], data[3], data[4]])
        );
    }
}

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, slot) in b.iter_mut().enumerate() {
        *slot = data.get(at + i).copied().unwrap_or(0);
    }
    u64::from_be_bytes(b)
}

fn check_for_prefix(data: &[u8]) {
    let (copies, overhead, compressed) = (u64_at(data, 0), u64_at(data, 8), u64_at(data, 16));
    let len = parse_prefix(data.get(24..).unwrap_or_default())
        .or_else(|| parse_prefix(data))
        .map_or(0, |p| p.len);
    for is_compressed in [false, true] {
        let p = Prefix {
            compressed: is_compressed,
            len,
        };
        let got = Estimate::for_prefix(copies, overhead, compressed, p);
        let exact = if is_compressed {
            u128::from(compressed) + u128::from(len)
        } else {
            u128::from(copies) * u128::from(len) + u128::from(overhead)
        };
        let want = u64::try_from(exact).unwrap_or(u64::MAX);
        assert_eq!(
            got, want,
            "for_prefix({copies}, {overhead}, {compressed}, {p:?})"
        );
    }
}

fn check_timeout(v: &str) {
    let Some(t) = parse_grpc_timeout(v) else {
        return;
    };
    let bytes = v.as_bytes();
    assert!((2..=9).contains(&bytes.len()), "{v:?} gave {t:?}");
    let (digits, unit) = bytes.split_at(bytes.len() - 1);
    assert!(digits.iter().all(u8::is_ascii_digit), "{v:?} gave {t:?}");
    let n: u128 = std::str::from_utf8(digits)
        .expect("ASCII digits")
        .parse()
        .expect("digits parse");
    let nanos_per_unit: u128 = match unit {
        b"H" => 3_600_000_000_000,
        b"M" => 60_000_000_000,
        b"S" => 1_000_000_000,
        b"m" => 1_000_000,
        b"u" => 1_000,
        b"n" => 1,
        _ => panic!("{v:?} has no valid unit but gave {t:?}"),
    };
    assert_eq!(t.as_nanos(), n * nanos_per_unit, "{v:?}");
    assert!(t <= Duration::from_secs(99_999_999 * 3600));
    assert!(
        Instant::now().checked_add(t).is_some(),
        "Instant::now() + {t:?} overflows"
    );
}
