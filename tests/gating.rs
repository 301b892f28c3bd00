//! The test switches: every test that needs something from the machine (a GPU, libnvrtc, two
//! GPUs) is ignored unless the cargo feature saying the machine has it is on, with one reason
//! per switch, spelled the same in every file. [`GATES`] is the one list; this test checks every
//! test file against it, so a reason cannot drift from its switch, and a bare `#[ignore]` (which
//! only `--include-ignored` would run, whatever it needs) cannot come back unnoticed.
//!
//! An attribute's value must be a literal (a macro there compiles, but the reason is dropped),
//! so the files spell the text out and this test is what keeps it one source.

use std::path::Path;

/// Each switch: the condition a test file writes as `#[cfg_attr(not(CONDITION), ignore =
/// "REASON")]`, and that reason. A test needing two things is gated on both at once (two
/// `ignore` attributes on one test are a warning, and only the first reason would show).
const GATES: [(&str, &str); 5] = [
    (r#"feature = "gpu-tests""#, "needs a CUDA GPU: cargo test --features gpu-tests"),
    (r#"feature = "nvrtc-tests""#, "needs libnvrtc on the library path: cargo test --features nvrtc-tests"),
    (
        r#"all(feature = "gpu-tests", feature = "nvrtc-tests")"#,
        "needs a CUDA GPU and libnvrtc: cargo test --features gpu-tests,nvrtc-tests",
    ),
    (r#"feature = "multi-gpu-tests""#, "needs 2 CUDA GPUs: cargo test --features multi-gpu-tests"),
    (
        r#"all(feature = "multi-gpu-tests", feature = "nvrtc-tests")"#,
        "needs 2 CUDA GPUs and libnvrtc: cargo test --features multi-gpu-tests,nvrtc-tests",
    ),
];

/// A plain `#[ignore = "report: ..."]` is allowed: a report measures and checks nothing, so no
/// switch runs it; it is run by name with `--ignored`.
const REPORT: &str = "report: ";

/// The attributes of a source file that mention `ignore`, each on one line with its whitespace
/// collapsed (so a formatter's line breaks do not matter), with the line it starts on.
fn ignore_attributes(src: &str) -> Vec<(usize, String)> {
    let lines: Vec<&str> = src.lines().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let start = i;
        if !lines[i].trim_start().starts_with("#[") {
            i += 1;
            continue;
        }
        // Gather the attribute up to its closing bracket (reasons hold no brackets).
        let mut text = String::new();
        let mut depth = 0i32;
        loop {
            for c in lines[i].trim().chars() {
                depth += match c {
                    '[' => 1,
                    ']' => -1,
                    _ => 0,
                };
            }
            text.push_str(lines[i].trim());
            text.push(' ');
            i += 1;
            if depth <= 0 || i == lines.len() {
                break;
            }
        }
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let text = text.replace("( ", "(").replace(" )", ")").replace(",)", ")");
        if text.contains("ignore") {
            found.push((start + 1, text));
        }
    }
    found
}

/// Whether one attribute is a known switch or a report; otherwise what is wrong with it.
fn check(attr: &str) -> Result<(), String> {
    if let Some(reason) = attr.strip_prefix("#[ignore = \"").and_then(|r| r.strip_suffix("\"]")) {
        return if reason.starts_with(REPORT) {
            Ok(())
        } else {
            Err("a bare #[ignore] runs only with --include-ignored, whatever the test needs: gate it on a switch of GATES".into())
        };
    }
    for (cond, reason) in GATES {
        if attr == format!("#[cfg_attr(not({cond}), ignore = \"{reason}\")]") {
            return Ok(());
        }
    }
    Err(format!("not one of the switches of tests/gating.rs (each written #[cfg_attr(not(CONDITION), ignore = \"REASON\")]): {GATES:?}"))
}

#[test]
fn every_ignored_test_names_one_switch_and_its_reason() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
    files.extend(std::fs::read_dir(dir.join("common")).unwrap().flatten().map(|e| e.path()));
    files.retain(|p| p.extension().is_some_and(|x| x == "rs"));
    let mut bad = Vec::new();
    let mut gated = 0;
    for path in &files {
        let src = std::fs::read_to_string(path).unwrap();
        for (line, attr) in ignore_attributes(&src) {
            match check(&attr) {
                Ok(()) => gated += 1,
                Err(why) => bad.push(format!("{}:{line}: {attr}\n  {why}", path.display())),
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    // The GPU suites are gated: a scan that found nothing would be a broken scan.
    assert!(gated > 40, "only {gated} gated tests found under {}", dir.display());
}

/// Every feature a switch names is declared in Cargo.toml (an undeclared one would keep its
/// tests ignored forever, with only a check-cfg warning).
#[test]
fn every_switch_is_a_declared_feature() {
    let manifest = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let features = manifest.split("\n[features]\n").nth(1).expect("a [features] table");
    let features = features.split("\n[").next().unwrap();
    for (cond, _) in GATES {
        for name in cond.split("feature = \"").skip(1).map(|s| s.split('"').next().unwrap()) {
            assert!(features.lines().any(|l| l.starts_with(&format!("{name} = "))), "feature {name} is not declared in Cargo.toml");
        }
    }
}

/// The parser itself: a formatter's multi-line form reads as the one-line form, a bare ignore
/// and a misspelt reason are refused, a report is allowed.
#[test]
fn the_scan_reads_wrapped_attributes_and_refuses_strays() {
    // Pieces as string literals, so no line of this file starts with an attribute of its own.
    let src = [
        "#[test]",
        "#[cfg_attr(",
        "    not(feature = \"gpu-tests\"),",
        "    ignore = \"needs a CUDA GPU: cargo test --features gpu-tests\",",
        ")]",
        "fn a() {}",
        "#[ignore = \"needs a CUDA device\"]",
        "fn b() {}",
        "#[ignore = \"report: by name\"]",
        "fn c() {}",
        "#[cfg_attr(not(feature = \"gpu-tests\"), ignore = \"needs a GPU\")]",
        "fn d() {}",
    ]
    .join("\n");
    let found = ignore_attributes(&src);
    let lines: Vec<usize> = found.iter().map(|f| f.0).collect();
    assert_eq!(lines, [2, 7, 9, 11]);
    let ok: Vec<bool> = found.iter().map(|f| check(&f.1).is_ok()).collect();
    assert_eq!(ok, [true, false, true, false], "{found:?}");
}
