//! Money never touches floating point: no `f32`/`f64` and no float literal
//! in the billing and payments crates' code, and no floating-point column
//! or cast in their migrations (doc/billing.md, "Money and rounding").

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::path::Path;

/// The code of a line without its `//` comment (string literals in this
/// crate hold SQL and messages, which are checked too).
fn code(line: &str) -> &str {
    line.split("//").next().unwrap_or_default()
}

fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .filter(|word| !word.is_empty())
}

/// `1.5`, `2.` or `1e3`-free float literals: digits, a dot, digits.
fn is_float_literal(word: &str) -> bool {
    let mut parts = word.splitn(2, '.');
    let (whole, fraction) = (parts.next().unwrap_or(""), parts.next());
    matches!(fraction, Some(fraction)
        if !whole.is_empty()
            && whole.bytes().all(|b| b.is_ascii_digit())
            && fraction.bytes().next().is_some_and(|b| b.is_ascii_digit()))
}

fn rust_files(dir: &Path, found: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            found.push(path);
        }
    }
}

#[test]
fn no_floats_in_money_paths() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&crate_dir.join("src"), &mut files);
    assert!(files.len() > 5, "the billing sources were found");
    let before = files.len();
    rust_files(&crate_dir.join("../keel-payments/src"), &mut files);
    assert!(files.len() > before + 5, "the payments sources were found");
    let mut offences = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        // Unit tests are no money path (their `datetime!` literals have
        // fractional seconds).
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (number, line) in text.lines().enumerate() {
            for word in words(code(line)) {
                if word == "f32" || word == "f64" || is_float_literal(word) {
                    offences.push(format!("{}:{}: {word}", file.display(), number + 1));
                }
            }
        }
    }
    let migrations = crate_dir.join("../../migrations");
    for name in [
        "0023_metering.sql",
        "0024_rates_invoices_credit.sql",
        "0025_credit_standing.sql",
        "0026_payments.sql",
    ] {
        let text = std::fs::read_to_string(migrations.join(name)).unwrap();
        for (number, line) in text.lines().enumerate() {
            let sql = line.split("--").next().unwrap_or_default().to_lowercase();
            for banned in ["real", "float", "double"] {
                if sql
                    .split(|c: char| !c.is_ascii_alphanumeric())
                    .any(|w| w.starts_with(banned))
                {
                    offences.push(format!("{name}:{}: {banned}", number + 1));
                }
            }
        }
    }
    assert!(
        offences.is_empty(),
        "floating point in billing: {offences:#?}"
    );
}

#[test]
fn the_scan_sees_what_it_must_refuse() {
    let line = "let price: f64 = 1.5; // f32 in a comment is fine";
    let found: Vec<&str> = words(code(line))
        .filter(|w| *w == "f32" || *w == "f64" || is_float_literal(w))
        .collect();
    assert_eq!(found, ["f64", "1.5"]);
    assert!(!is_float_literal("1"));
    assert!(!is_float_literal("v1.x"));
    assert!(is_float_literal("0.25"));
}
