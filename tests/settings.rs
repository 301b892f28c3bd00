//! `ATTN_*` parsing: valid values, and invalid ones naming the variable, value and accepted set.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;

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
