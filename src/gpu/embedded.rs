//! What build.rs embedded: fatbins (when nvcc was found), kernel sources, and how they were built.
#![allow(dead_code)]

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The embedded fatbin of a module, if nvcc built one.
pub(crate) fn fatbin(module: &str) -> Option<&'static [u8]> {
    FATBINS
        .iter()
        .find(|(m, bytes)| *m == module && !bytes.is_empty())
        .map(|(_, b)| *b)
}

/// The source of a file under `cuda/`.
pub(crate) fn source(file: &str) -> Option<&'static str> {
    SOURCES.iter().find(|(f, _)| *f == file).map(|(_, s)| *s)
}

/// The minimum arch of a module: the registry's (src/registry.rs); 0.0 for a name it does not
/// have. May be arch-specific (`9.0a`).
pub(crate) fn module_min_arch(module: &str) -> crate::arch::ArchSpec {
    crate::registry::Module::from_name(module).map_or(crate::arch::ArchSpec::new(0, 0), |m| m.min_arch())
}

/// The oldest compute capability a module's kernels target ([`module_min_arch`] without its
/// suffix).
pub(crate) fn min_arch(module: &str) -> crate::arch::ComputeCapability {
    let a = module_min_arch(module);
    crate::arch::ComputeCapability::new(a.major, a.minor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{entries_header, Module};

    /// What NVRTC compiles is what nvcc compiled: the embedded entry-point headers are the
    /// registry's, and the registry modules' min-arch is the registry's.
    #[test]
    fn embedded_headers_and_min_arch_come_from_the_registry() {
        for m in Module::ALL {
            assert_eq!(source(m.header()), Some(entries_header(m).as_str()), "{}", m.name());
            assert_eq!(module_min_arch(m.name()), m.min_arch(), "{}", m.name());
            assert!(source(&format!("{}.cu", m.name())).is_some_and(|s| s.contains(&format!("#include \"{}\"", m.header()))));
        }
    }

    /// The nvcc build's ptxas report (when there is one) lists exactly the registry's kernels
    /// under each registry module, with the static shared memory the registry states.
    #[test]
    fn ptxas_report_matches_the_registry() {
        for line in PTXAS_REPORT.lines() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(module), [_, kernel, arch, _regs, smem, ..]) = (cols.first().and_then(|m| Module::from_name(m)), cols.as_slice()) else {
                continue;
            };
            if !arch.starts_with("sm_") {
                continue;
            }
            let k = crate::registry::kernel_in(module, kernel)
                .unwrap_or_else(|| panic!("{kernel} ({arch}) is not in the registry's module {}", module.name()));
            assert_eq!(smem.parse::<u32>().unwrap(), k.static_smem(), "{kernel} on {arch}");
        }
    }
}
