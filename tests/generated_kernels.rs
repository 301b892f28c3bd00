//! Checks that build.rs's `$OUT_DIR/kernels.rs` compiles and is self-consistent,
//! with or without nvcc.

#[allow(dead_code)]
mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

use attention::arch::parse_arch_list;

#[test]
fn sources_are_embedded_and_header_free() {
    let names: Vec<&str> = kernels::SOURCES.iter().map(|(n, _)| *n).collect();
    assert!(names.contains(&"common.cuh"), "{names:?}");
    assert!(names.contains(&"naive.cu"), "{names:?}");
    for (name, text) in kernels::SOURCES {
        for line in text.lines() {
            let line = line.trim_start();
            if let Some(inc) = line.strip_prefix("#include") {
                // NVRTC gets only our own headers, by name: nothing else may be included.
                let inc = inc.trim();
                let ok = inc
                    .strip_prefix('"')
                    .and_then(|s| s.strip_suffix('"'))
                    .is_some_and(|h| kernels::SOURCES.iter().any(|(n, _)| *n == h));
                assert!(ok, "{name} includes {inc}, which is not one of our headers");
            }
        }
    }
}

#[test]
fn metadata_is_consistent() {
    assert!(["ATTN_CUDA_ARCH_LIST", "TORCH_CUDA_ARCH_LIST", "default"]
        .contains(&kernels::ARCH_LIST_SOURCE));
    let list = parse_arch_list(kernels::ARCH_LIST).expect("ARCH_LIST parses");
    assert_eq!(
        attention::arch::format_arch_list(&list),
        kernels::ARCH_LIST,
        "ARCH_LIST is normalised"
    );
    // Every module is in the kernel registry: its generated entry points are embedded beside it
    // (the registry's min-arch is checked by the crate's own unit tests).
    for (name, _) in kernels::SOURCES {
        if let Some(stem) = name.strip_suffix(".cu") {
            let header = format!("{stem}_entries.cuh");
            assert!(kernels::SOURCES.iter().any(|(n, _)| *n == header), "{name} without {header}");
        }
    }
    if kernels::BUILT_WITH_NVCC {
        assert!(!kernels::NVCC_VERSION.is_empty());
        assert!(kernels::PTXAS_REPORT.contains("attn_naive_softmax"));
        assert!(kernels::FATBINS.iter().any(|(n, _)| *n == "naive"));
        for (name, bytes) in kernels::FATBINS {
            // Fatbin header magic 0xBA55ED50, little-endian.
            assert_eq!(&bytes[..4], &[0x50, 0xed, 0x55, 0xba], "{name}");
        }
    } else {
        assert_eq!(kernels::NVCC_VERSION, "");
        assert_eq!(kernels::PTXAS_REPORT, "");
        assert!(kernels::FATBINS.is_empty());
    }
}
