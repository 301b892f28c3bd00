//! `ATTN_*` parsing: valid values, and invalid ones naming the variable, value and accepted set;
//! `Settings::validate` for values set in code; warnings for unknown `ATTN_*` variables.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;

use attention::settings::{unknown_variables_in, MAX_CPU_THREADS, MAX_NAIVE_WORKSPACE_MB};
use attention::{BackendKind, Error, JitMode, Settings};

fn parse(vars: &[(&str, &str)]) -> Result<Settings, Error> {
    let map: HashMap<String, OsString> = vars.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
    Settings::from_lookup(|k| map.get(k).cloned())
}

#[test]
fn defaults() {
    let s = parse(&[]).unwrap();
    assert_eq!(s.device, 0);
    assert_eq!(s.backend, None);
    assert!(s.disabled.is_empty());
    assert!(!s.strict);
    assert_eq!(s.jit, JitMode::Auto);
    assert_eq!(s.cache_dir, None);
    assert_eq!(s.naive_workspace_mb, 256);
    assert_eq!(s.cpu_threads, None);
}

#[test]
fn valid_values() {
    let s = parse(&[
        ("ATTN_DEVICE", "1"),
        ("ATTN_BACKEND", "xformers"),
        ("ATTN_DISABLE", "naive, flash,,naive"),
        ("ATTN_STRICT", "yes"),
        ("ATTN_JIT", "NEVER"),
        ("ATTN_CACHE_DIR", "/tmp/kc"),
        ("ATTN_NAIVE_WORKSPACE_MB", "64"),
        ("ATTN_CPU_THREADS", "3"),
    ])
    .unwrap();
    assert_eq!(s.device, 1);
    assert_eq!(s.backend, Some(BackendKind::MemEfficient));
    assert_eq!(s.disabled, vec![BackendKind::Naive, BackendKind::Flash]);
    assert!(s.strict);
    assert_eq!(s.jit, JitMode::Never);
    assert_eq!(s.cache_dir, Some(PathBuf::from("/tmp/kc")));
    assert_eq!(s.naive_workspace_mb, 64);
    assert_eq!(s.cpu_threads, Some(3));
    for (v, b) in [("1", true), ("0", false), ("true", true), ("off", false)] {
        assert_eq!(parse(&[("ATTN_STRICT", v)]).unwrap().strict, b);
    }
    for (v, m) in [("auto", JitMode::Auto), ("always", JitMode::Always), ("never", JitMode::Never)] {
        assert_eq!(parse(&[("ATTN_JIT", v)]).unwrap().jit, m);
    }
    // Empty counts as unset.
    assert_eq!(parse(&[("ATTN_BACKEND", "")]).unwrap().backend, None);
}

#[test]
fn flash_kernel_families() {
    let s = parse(&[]).unwrap();
    assert!(s.flash_hopper && s.flash_tma, "both Hopper kernel kinds are on by default");
    let s = parse(&[("ATTN_FLASH_HOPPER", "0"), ("ATTN_FLASH_TMA", "off")]).unwrap();
    assert!(!s.flash_hopper && !s.flash_tma);
    let e = parse(&[("ATTN_FLASH_TMA", "fast")]).unwrap_err().to_string();
    assert!(e.contains("ATTN_FLASH_TMA") && e.contains("fast"), "{e}");
}

#[test]
fn cache_dir_defaults_follow_xdg_then_home() {
    let s = parse(&[("XDG_CACHE_HOME", "/x/cache"), ("HOME", "/home/u")]).unwrap();
    assert_eq!(s.cache_dir, Some(PathBuf::from("/x/cache/attention")));
    let s = parse(&[("HOME", "/home/u")]).unwrap();
    assert_eq!(s.cache_dir, Some(PathBuf::from("/home/u/.cache/attention")));
    let s = parse(&[("ATTN_CACHE_DIR", "/c"), ("HOME", "/home/u")]).unwrap();
    assert_eq!(s.cache_dir, Some(PathBuf::from("/c")));
}

#[test]
fn invalid_values_name_variable_value_and_accepted() {
    let cases: [(&str, &str, &str); 9] = [
        ("ATTN_BACKEND", "fast", "flash, mem_efficient (alias xformers), naive, cpu"),
        ("ATTN_DISABLE", "naive,bogus", "flash, mem_efficient"),
        ("ATTN_STRICT", "maybe", "1 or 0"),
        ("ATTN_JIT", "sometimes", "auto, always, never"),
        ("ATTN_DEVICE", "-1", "ordinal"),
        ("ATTN_DEVICE", "gpu0", "ordinal"),
        ("ATTN_NAIVE_WORKSPACE_MB", "0", "positive"),
        ("ATTN_CPU_THREADS", "0", "positive"),
        ("ATTN_CPU_THREADS", "many", "positive"),
    ];
    for (var, value, accepted) in cases {
        let err = parse(&[(var, value)]).unwrap_err();
        match &err {
            Error::InvalidSetting { var: v, .. } => assert_eq!(*v, var),
            other => panic!("{var}={value}: unexpected {other:?}"),
        }
        let text = err.to_string();
        let bad = if var == "ATTN_DISABLE" { "bogus" } else { value };
        assert!(text.contains(var) && text.contains(bad) && text.contains(accepted), "{text}");
    }
}

#[test]
fn emulated_arch_and_tf32() {
    for v in ["7.5", "sm_75", "75"] {
        let s = parse(&[("ATTN_EMULATE_ARCH", v)]).unwrap();
        assert_eq!(s.emulate_arch, Some(attention::ComputeCapability::new(7, 5)), "{v}");
    }
    for v in ["6.0", "turing", "7.x", "7.10"] {
        let e = parse(&[("ATTN_EMULATE_ARCH", v)]).unwrap_err();
        let t = e.to_string();
        assert!(t.contains("ATTN_EMULATE_ARCH") && t.contains(v) && t.contains("7.5"), "{t}");
    }
    assert!(!parse(&[]).unwrap().allow_tf32);
    assert!(parse(&[("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")]).unwrap().allow_tf32);
    // Ours wins when both are set.
    assert!(!parse(&[("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1"), ("ATTN_ALLOW_TF32", "0")]).unwrap().allow_tf32);
    let e = parse(&[("ATTN_ALLOW_TF32", "maybe")]).unwrap_err().to_string();
    assert!(e.contains("ATTN_ALLOW_TF32") && e.contains("maybe"), "{e}");
}

#[cfg(unix)]
fn parse_os(vars: &[(&str, OsString)]) -> Result<Settings, Error> {
    let map: HashMap<String, OsString> = vars.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    Settings::from_lookup(|k| map.get(k).cloned())
}

fn invalid(result: Result<Settings, Error>) -> (&'static str, String) {
    match result {
        Err(e @ Error::InvalidSetting { var, .. }) => (var, e.to_string()),
        other => panic!("expected an invalid setting, got {other:?}"),
    }
}

#[test]
fn cache_dir_is_validated_like_every_variable() {
    // Whitespace only is unset: the default directory, as for every other variable.
    for blank in ["   ", "\t", " \n "] {
        let s = parse(&[("ATTN_CACHE_DIR", blank), ("HOME", "/home/u")]).unwrap();
        assert_eq!(s.cache_dir, Some(PathBuf::from("/home/u/.cache/attention")), "{blank:?}");
    }
    // Relative paths would land wherever each program runs; `~` is not expanded by us.
    for relative in ["cache", "./cache", "../x/cache", "~/cache", " /tmp/kc"] {
        let (var, text) = invalid(parse(&[("ATTN_CACHE_DIR", relative), ("HOME", "/home/u")]));
        assert_eq!(var, "ATTN_CACHE_DIR");
        assert!(text.contains("an absolute directory path") && text.contains(relative.trim()), "{text}");
    }
    let (var, text) = invalid(parse(&[("ATTN_CACHE_DIR", "/tmp/a\0b")]));
    assert_eq!(var, "ATTN_CACHE_DIR");
    assert!(text.contains("an absolute directory path") && text.contains("NUL"), "{text}");
    // Spaces inside (and at the end of) a path are part of it.
    let s = parse(&[("ATTN_CACHE_DIR", "/tmp/my cache ")]).unwrap();
    assert_eq!(s.cache_dir, Some(PathBuf::from("/tmp/my cache ")));
}

#[cfg(unix)]
#[test]
fn cache_dir_may_be_any_bytes() {
    use std::os::unix::ffi::OsStringExt;
    let raw = OsString::from_vec(b"/tmp/caf\xe9/kc".to_vec());
    let s = parse_os(&[("ATTN_CACHE_DIR", raw.clone())]).unwrap();
    assert_eq!(s.cache_dir, Some(PathBuf::from(raw)));
    let (var, _) = invalid(parse_os(&[("ATTN_CACHE_DIR", OsString::from_vec(b"caf\xe9".to_vec()))]));
    assert_eq!(var, "ATTN_CACHE_DIR");
}

#[test]
fn emulated_arch_accepts_exactly_three_spellings() {
    let cc = attention::ComputeCapability::new;
    let good = [
        ("7.5", cc(7, 5)),
        ("75", cc(7, 5)),
        ("sm_75", cc(7, 5)),
        ("SM_75", cc(7, 5)),
        (" 8.6 ", cc(8, 6)),
        ("sm_80", cc(8, 0)),
        ("90", cc(9, 0)),
        ("10.0", cc(10, 0)),
        ("100", cc(10, 0)),
        ("sm_120", cc(12, 0)),
        ("12.1", cc(12, 1)),
    ];
    for (v, want) in good {
        assert_eq!(parse(&[("ATTN_EMULATE_ARCH", v)]).unwrap().emulate_arch, Some(want), "{v}");
    }
    let bad = [
        "700", "sm_700", "sm_sm_75", "smsm_75", "7", "sm_7", "sm_75a", "sm_90a", "100f", "07.5", "7.05", "075", "13.0",
        "130", "1000", "75.0", "7.5.1", "7.", ".5", "sm_", "sm_7.5", "+7.5", "7.-5", "٧٥", "7٥",
    ];
    for v in bad {
        let (var, text) = invalid(parse(&[("ATTN_EMULATE_ARCH", v)]));
        assert_eq!(var, "ATTN_EMULATE_ARCH", "{v}");
        assert!(text.contains("7.5") && text.contains("sm_75"), "{v}: {text}");
    }
}

#[test]
fn counts_are_bounded() {
    assert_eq!(parse(&[("ATTN_CPU_THREADS", "1024")]).unwrap().cpu_threads, Some(1024));
    for v in ["1025", "100000", "18446744073709551616"] {
        let (var, text) = invalid(parse(&[("ATTN_CPU_THREADS", v)]));
        assert_eq!(var, "ATTN_CPU_THREADS");
        assert!(text.contains("at most 1024"), "{text}");
    }
    assert_eq!(parse(&[("ATTN_NAIVE_WORKSPACE_MB", "1048576")]).unwrap().naive_workspace_mb, 1 << 20);
    for v in ["1048577", "18446744073709551615"] {
        let (var, text) = invalid(parse(&[("ATTN_NAIVE_WORKSPACE_MB", v)]));
        assert_eq!(var, "ATTN_NAIVE_WORKSPACE_MB");
        assert!(text.contains("at most 1048576"), "{text}");
    }
}

#[test]
fn huge_values_are_quoted_by_a_bounded_prefix() {
    let huge = "x".repeat(1 << 20);
    let wide = "é".repeat(100_000); // two bytes each: the cut must fall between characters
    for var in ["ATTN_BACKEND", "ATTN_DISABLE", "ATTN_JIT", "ATTN_STRICT", "ATTN_CPU_THREADS", "ATTN_EMULATE_ARCH", "ATTN_CACHE_DIR"] {
        for (value, bytes) in [(&huge, "1048576 bytes"), (&wide, "200000 bytes")] {
            let (v, text) = invalid(parse(&[(var, value)]));
            assert_eq!(v, var);
            assert!(text.len() < 400, "{var}: {} bytes of error", text.len());
            assert!(text.contains(bytes) && text.contains(&value[..64]), "{var}: {text}");
        }
    }
    // Short values are quoted whole, with no length.
    let (_, text) = invalid(parse(&[("ATTN_BACKEND", "fast")]));
    assert!(text.contains("\"fast\"") && !text.contains("bytes"), "{text}");
}

fn warnings(names: &[&str]) -> Vec<String> {
    unknown_variables_in(names.iter().map(|n| (OsString::from(n), OsString::from("1"))))
}

#[test]
fn unknown_variables_are_named_with_the_closest_valid_one() {
    assert_eq!(warnings(&["ATTN_BACKND"]), ["unknown variable ATTN_BACKND is ignored; did you mean ATTN_BACKEND?"]);
    let cases = [
        ("ATTN_BAKCEND", "ATTN_BACKEND"),
        ("ATTN_CPU_THREAD", "ATTN_CPU_THREADS"),
        ("ATTN_CACHEDIR", "ATTN_CACHE_DIR"),
        ("ATTN_EMULATE", "ATTN_EMULATE_ARCH"),
        ("ATTN_ALLOW_TF23", "ATTN_ALLOW_TF32"),
        ("ATTN_CUDA_ARCHS", "ATTN_CUDA_ARCH_LIST"),
        ("ATTN_STICT", "ATTN_STRICT"),
    ];
    for (typo, meant) in cases {
        assert_eq!(
            warnings(&[typo]),
            [format!("unknown variable {typo} is ignored; did you mean {meant}?")]
        );
    }
    // One warning per name, in a stable order, whatever the iterator repeats.
    let w = warnings(&["ATTN_STICT", "ATTN_BACKND", "ATTN_STICT"]);
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w[0].contains("ATTN_BACKND") && w[1].contains("ATTN_STICT"), "{w:?}");
    // A huge name is quoted by a bounded prefix too.
    let long = format!("ATTN_{}", "Y".repeat(100_000));
    let w = warnings(&[&long]);
    assert!(w.len() == 1 && w[0].len() < 300 && w[0].contains("100005 bytes"), "{w:?}");
}

#[cfg(unix)]
#[test]
fn lowercase_attn_variables_are_typos_on_unix() {
    // Names are case-sensitive here: nothing reads attn_backend.
    assert_eq!(
        warnings(&["attn_backend"]),
        ["unknown variable attn_backend is ignored; did you mean ATTN_BACKEND?"]
    );
}

#[test]
fn settings_and_project_variables_are_not_warned_about() {
    let mut names: Vec<&str> = attention::settings::VARIABLES.to_vec();
    names.extend([
        "ATTN_CUDA_ARCH_LIST",
        "ATTN_REQUIRE_NVCC",
        "ATTN_DENY_SPILLS",
        "ATTN_CI_VENV",
        "ATTN_TEST_EXPECT_NO_IMAGE",
        "ATTN_TEST_ANYTHING_NEW",
        "ATTN_BENCH_DTYPES",
        "ATTN_BENCH_SKIP_CPU",
        "ATTN_FUZZ_ITERATIONS",
        "HOME",
        "PATH",
        "ATTENTION_CACHE_TEST_WRITER_DIR",
        "XATTN_BACKEND",
        "ATTN",
    ]);
    assert_eq!(warnings(&names), Vec::<String>::new());
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStringExt;
        let raw = OsString::from_vec(b"ATTN_\xff".to_vec());
        assert_eq!(unknown_variables_in([(raw, OsString::new())]).len(), 1);
    }
}

/// Every `ATTN_*` name the build script, benches, examples, other tests and scripts use must
/// be known, or running them would warn about the project's own variables.
#[test]
fn variables_used_across_the_repository_are_known() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("build.rs")];
    for dir in ["benches", "examples", "tests", "scripts", ".ci"] {
        if let Ok(entries) = std::fs::read_dir(root.join(dir)) {
            files.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_file()));
        }
    }
    // This file spells typos on purpose.
    files.retain(|p| !p.ends_with("tests/settings.rs"));
    let mut seen = std::collections::BTreeSet::new();
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        for (at, _) in text.match_indices("ATTN_") {
            if at > 0 && text.as_bytes()[at - 1].is_ascii_alphanumeric() {
                continue;
            }
            let name: String = text[at..].chars().take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_').collect();
            // `ATTN_*` and friends name a family, not a variable.
            if !name.ends_with('_') {
                seen.insert(name);
            }
        }
    }
    assert!(seen.contains("ATTN_CUDA_ARCH_LIST"), "the scan found nothing: {files:?}");
    let names: Vec<&str> = seen.iter().map(String::as_str).collect();
    assert_eq!(warnings(&names), Vec::<String>::new(), "scanned {names:?}");
}

#[test]
fn validate_holds_code_set_values_to_the_variables_rules() {
    assert!(Settings::default().validate().is_ok());
    let check = |s: Settings| match s.validate() {
        Err(e @ Error::InvalidSetting { var, .. }) => (var, e.to_string()),
        other => panic!("expected an invalid setting, got {other:?}"),
    };
    let base = Settings::default;

    assert_eq!(MAX_CPU_THREADS, 1024);
    for threads in [0, MAX_CPU_THREADS + 1, usize::MAX] {
        let (var, text) = check(Settings { cpu_threads: Some(threads), ..base() });
        assert_eq!(var, "ATTN_CPU_THREADS");
        assert!(text.contains(&threads.to_string()) && text.contains("at most 1024"), "{text}");
    }
    for threads in [1, MAX_CPU_THREADS] {
        Settings { cpu_threads: Some(threads), ..base() }.validate().unwrap();
    }

    for mb in [0, MAX_NAIVE_WORKSPACE_MB + 1, usize::MAX] {
        let (var, text) = check(Settings { naive_workspace_mb: mb, ..base() });
        assert_eq!(var, "ATTN_NAIVE_WORKSPACE_MB");
        assert!(text.contains("positive"), "{text}");
    }
    assert!(MAX_NAIVE_WORKSPACE_MB.checked_mul(1 << 20).is_some());
    Settings { naive_workspace_mb: MAX_NAIVE_WORKSPACE_MB, ..base() }.validate().unwrap();

    for bad in [PathBuf::from("relative"), PathBuf::from("/tmp/a\0b")] {
        let (var, text) = check(Settings { cache_dir: Some(bad), ..base() });
        assert_eq!(var, "ATTN_CACHE_DIR");
        assert!(text.contains("an absolute directory path"), "{text}");
    }

    let cc = attention::ComputeCapability::new;
    for arch in [cc(6, 1), cc(7, 10), cc(70, 0)] {
        let (var, _) = check(Settings { emulate_arch: Some(arch), ..base() });
        assert_eq!(var, "ATTN_EMULATE_ARCH");
    }
    Settings { emulate_arch: Some(cc(7, 5)), ..base() }.validate().unwrap();
}

/// A scratch directory under the temp dir, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let path = std::env::temp_dir().join(format!("attention-settings-{tag}-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        Scratch(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn validate_refuses_a_cache_dir_that_is_a_file() {
    let scratch = Scratch::new("cachefile");
    let file = scratch.0.join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    for dir in [file.clone(), file.join("below")] {
        let err = Settings { cache_dir: Some(dir.clone()), ..Settings::default() }.validate().unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::InvalidSetting { var: "ATTN_CACHE_DIR", .. }), "{text}");
        assert!(text.contains("not a directory") && text.contains("a-file"), "{text}");
    }
    // A directory, or one that does not exist yet (the cache creates it), is fine.
    for dir in [scratch.0.clone(), scratch.0.join("not/yet")] {
        Settings { cache_dir: Some(dir), ..Settings::default() }.validate().unwrap();
    }
    // The variable parses without touching the disk; `validate` is what `select()` runs.
    let s = parse(&[("ATTN_CACHE_DIR", file.to_str().unwrap())]).unwrap();
    assert!(s.validate().is_err());
}

/// The builder's values obey the variables' rules: `cpu_threads(0)` is the error
/// `ATTN_CPU_THREADS=0` is, not a silent clamp to 1.
#[test]
fn selector_values_are_checked_at_select() {
    use attention::{Error, Selector};
    let var = |r: Result<attention::Attention, Error>| match r {
        Err(Error::InvalidSetting { var, .. }) => var,
        Err(e) => panic!("expected InvalidSetting, got {e}"),
        Ok(_) => panic!("expected an error"),
    };
    let base = || Selector::from_settings(Settings::default()).backend(attention::BackendKind::Cpu);
    assert_eq!(var(base().cpu_threads(0).select()), "ATTN_CPU_THREADS");
    assert_eq!(var(base().cpu_threads(attention::settings::MAX_CPU_THREADS + 1).select()), "ATTN_CPU_THREADS");
    assert_eq!(var(base().naive_workspace_mb(0).select()), "ATTN_NAIVE_WORKSPACE_MB");
    assert_eq!(var(base().cache_dir("relative/dir").select()), "ATTN_CACHE_DIR");
    base().cpu_threads(attention::settings::MAX_CPU_THREADS).select().unwrap();
}
