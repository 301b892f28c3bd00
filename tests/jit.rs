//! NVRTC compiles every kernel module, with no GPU present, and the on-disk cache survives
//! truncation and concurrent writers. Needs libnvrtc on the library path (the
//! `nvidia-cuda-nvrtc` wheel works); `.ci/run` provides it and runs these with
//! `--features nvrtc-tests`. With that feature on and no libnvrtc they fail: they never pass by
//! skipping.

use std::path::PathBuf;

use attention::testing::{cache_entries, jit_compile, kernel_modules, min_arch, nvrtc};
use attention::{ComputeCapability, Nvrtc};


fn require_nvrtc() {
    if let Nvrtc::Missing(why) = nvrtc() {
        panic!("NVRTC is not available: {why}");
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("attn-jit-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
#[cfg_attr(not(feature = "nvrtc-tests"), ignore = "needs libnvrtc on the library path: cargo test --features nvrtc-tests")]
fn every_module_compiles_for_turing_ampere_hopper() {
    require_nvrtc();
    let modules = kernel_modules();
    assert!(modules.contains(&"naive") && modules.contains(&"flash") && modules.contains(&"flash_hopper"), "{modules:?}");
    for module in &modules {
        for (maj, min) in [(7, 5), (8, 0), (9, 0)] {
            if ComputeCapability::new(maj, min) < min_arch(module) {
                eprintln!("{module} sm_{maj}{min}: below the module's min-arch, not built");
                continue;
            }
            let (cubin, hit) = jit_compile(module, ComputeCapability::new(maj, min), None)
                .unwrap_or_else(|e| panic!("{module} sm_{maj}{min}: {e}"));
            assert!(!hit);
            assert_eq!(&cubin[..4], b"\x7fELF", "{module} sm_{maj}{min}: not a cubin");
            eprintln!("{module} sm_{maj}{min}: {} bytes", cubin.len());
        }
    }
}

#[test]
#[cfg_attr(not(feature = "nvrtc-tests"), ignore = "needs libnvrtc on the library path: cargo test --features nvrtc-tests")]
fn cache_hits_and_survives_a_truncated_entry() {
    require_nvrtc();
    let dir = temp_dir("trunc");
    let cc = ComputeCapability::new(8, 0);
    let (first, hit) = jit_compile("naive", cc, Some(dir.clone())).unwrap();
    assert!(!hit, "an empty cache cannot hit");
    let (second, hit) = jit_compile("naive", cc, Some(dir.clone())).unwrap();
    assert!(hit, "the second compile must come from the cache");
    assert_eq!(first, second);
    // Truncate the entry: detected by its checksum, rebuilt, and valid again.
    let entries = cache_entries(&dir).unwrap();
    assert_eq!(entries.len(), 1);
    let path = dir.join(&entries[0].0);
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    assert!(!cache_entries(&dir).unwrap()[0].2, "a truncated entry must read as invalid");
    let (third, hit) = jit_compile("naive", cc, Some(dir.clone())).unwrap();
    assert!(!hit, "a truncated entry must not be served");
    assert_eq!(third, first);
    assert!(cache_entries(&dir).unwrap().iter().all(|e| e.2));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[cfg_attr(not(feature = "nvrtc-tests"), ignore = "needs libnvrtc on the library path: cargo test --features nvrtc-tests")]
fn concurrent_compiles_of_one_entry_all_succeed() {
    require_nvrtc();
    let dir = temp_dir("race");
    let cc = ComputeCapability::new(9, 0);
    let images: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| jit_compile("naive", cc, Some(dir.clone())).unwrap().0))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(images.windows(2).all(|w| w[0] == w[1]));
    let entries = cache_entries(&dir).unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(entries[0].2);
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().filter(|e| !e.file_name().to_string_lossy().ends_with(".bin")).collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[cfg_attr(not(feature = "nvrtc-tests"), ignore = "needs libnvrtc on the library path: cargo test --features nvrtc-tests")]
fn unwritable_cache_still_compiles() {
    require_nvrtc();
    // A file where the cache directory should be: the cache cannot be created.
    let blocker = temp_dir("blocked");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let (cubin, hit) = jit_compile("naive", ComputeCapability::new(8, 6), Some(blocker.join("cache"))).unwrap();
    assert!(!hit);
    assert_eq!(&cubin[..4], b"\x7fELF");
    let _ = std::fs::remove_file(blocker);
}
