//! The parser of `ptxas -v` output (nvcc `-Xptxas -v`): registers, shared memory, stack, spills
//! and the tensor-core performance warnings of every kernel, per arch.
//!
//! Depends on `std` only: `build.rs` includes it with `#[path]` (it writes the ptxas report and
//! enforces `ATTN_DENY_SPILLS` from it), and `tests/ptxas.rs` includes it to run the tests below
//! on real ptxas output (`tests/data/ptxas/`).

/// One kernel's resources for one arch, from `ptxas -v`.
#[derive(Default, Clone, Debug, PartialEq)]
pub struct Resources {
    /// Reported by a "Compiling entry function" line (a `__global__` kernel), not only by a
    /// non-inlined device function's lines.
    pub entry: bool,
    pub registers: u32,
    /// Static shared memory, bytes.
    pub smem: u64,
    pub stack: u64,
    pub spill_stores: u64,
    pub spill_loads: u64,
    /// ptxas "Potential Performance Loss" codes (wgmma serialised: C7510–C7516), an injected
    /// warpgroup wait (C7517) and an ignored setmaxnreg (C7508), which leave a Hopper kernel
    /// correct but far slower.
    pub perf_warnings: Vec<String>,
}

impl Resources {
    /// Spills or a serialising warning: what `ATTN_DENY_SPILLS` refuses.
    pub fn degraded(&self) -> bool {
        self.spill_stores > 0 || self.spill_loads > 0 || !self.perf_warnings.is_empty()
    }
}

/// Parses `ptxas -v` output into (function, arch, resources), in output order.
///
/// ```text
/// ptxas info    : Compiling entry function 'attn_naive_pv_f32' for 'sm_75'
/// ptxas info    : Function properties for attn_naive_pv_f32
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 44 registers, used 1 barriers, 2176 bytes smem, 520 bytes cmem[0]
/// ```
///
/// One ptxas run (one arch) prints its performance warnings first, before its "Compiling"
/// lines, and they name the function but not the arch: they wait for the next "Compiling"
/// line of that function, which gives the arch. A warning no such line follows is kept under
/// an empty arch, so it is never lost.
pub fn parse_ptxas(log: &str) -> Vec<(String, String, Resources)> {
    let mut out: Vec<(String, String, Resources)> = Vec::new();
    let mut entry: Option<usize> = None; // index in `out` of the function being compiled
    let mut arch = String::new();
    let mut props: Option<usize> = None; // index of the function a properties line refers to
    let mut pending: Vec<(String, String)> = Vec::new(); // (function, code) awaiting its arch
    let index_of = |out: &mut Vec<(String, String, Resources)>, name: &str, arch: &str| match out
        .iter()
        .position(|(n, a, _)| n == name && a == arch)
    {
        Some(i) => i,
        None => {
            out.push((name.to_string(), arch.to_string(), Resources::default()));
            out.len() - 1
        }
    };
    for line in log.lines() {
        let body = line
            .split_once("ptxas info")
            .map(|(_, r)| r.trim_start_matches([' ', ':']).trim());
        let body = body.unwrap_or_else(|| line.trim());
        let compiling = body
            .strip_prefix("Compiling entry function '")
            .map(|rest| (rest, true))
            .or_else(|| body.strip_prefix("Compiling function '").map(|rest| (rest, false)));
        if let Some((rest, is_entry)) = compiling {
            // "name' for 'sm_75'"
            if let Some((name, tail)) = rest.split_once("' for '") {
                arch = tail.trim_end_matches('\'').to_string();
                let i = index_of(&mut out, name, &arch);
                out[i].2.entry |= is_entry;
                pending.retain(|(function, code)| {
                    let mine = function == name;
                    if mine {
                        out[i].2.perf_warnings.push(code.clone());
                    }
                    !mine
                });
                entry = Some(i);
                props = None;
            }
        } else if let Some(name) = body.strip_prefix("Function properties for ") {
            props = Some(index_of(&mut out, name.trim(), &arch));
        } else if body.contains("bytes stack frame") {
            if let Some(i) = props.or(entry) {
                let r = &mut out[i].2;
                for part in body.split(',') {
                    let n = leading_number(part);
                    if part.contains("stack frame") {
                        r.stack = n;
                    } else if part.contains("spill stores") {
                        r.spill_stores = n;
                    } else if part.contains("spill loads") {
                        r.spill_loads = n;
                    }
                }
            }
        } else if let Some(code) = perf_warning_code(body) {
            // "(C7511) Potential Performance Loss: ... in the function 'name'"
            if let Some((_, tail)) = body.rsplit_once("function '") {
                let name = tail.split('\'').next().unwrap_or_default();
                pending.push((name.to_string(), code.to_string()));
            }
        } else if let Some(rest) = body.strip_prefix("Used ") {
            if let Some(i) = entry {
                let r = &mut out[i].2;
                for part in rest.split(',') {
                    let part = part.trim();
                    let n = leading_number(part);
                    if part.ends_with("registers") && !part.starts_with("used") {
                        r.registers = n as u32;
                    } else if part.ends_with("bytes smem") {
                        r.smem = n;
                    }
                }
            }
        }
    }
    for (name, code) in pending {
        let i = index_of(&mut out, &name, "");
        out[i].2.perf_warnings.push(code);
    }
    out
}

/// The code of a ptxas warning that makes tensor-core code slow: serialised wgmma (C7510–C7519,
/// "Potential Performance Loss", or an injected warpgroup wait) or an ignored setmaxnreg (C7508).
pub fn perf_warning_code(body: &str) -> Option<&str> {
    let start = body.find("(C75")?;
    let code = body[start + 1..].split(')').next()?;
    let serialising = body.contains("Potential Performance Loss") || ["C7508", "C7517"].contains(&code);
    serialising.then_some(code)
}

/// The number a string starts with (after spaces); 0 if none.
pub fn leading_number(s: &str) -> u64 {
    let s = s.trim();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    s[..end].parse().unwrap_or(0)
}

/// Sort key for "sm_90a": (90, "a").
pub fn arch_key(arch: &str) -> (u32, String) {
    let digits: String = arch.chars().filter(|c| c.is_ascii_digit()).collect();
    let suffix: String = arch
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .filter(|c| !c.is_ascii_digit())
        .collect();
    (digits.parse().unwrap_or(0), suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(rows: &'a [(String, String, Resources)], name: &str, arch: &str) -> &'a Resources {
        &rows
            .iter()
            .find(|(n, a, _)| n == name && a == arch)
            .unwrap_or_else(|| panic!("{name} on {arch} not parsed"))
            .2
    }

    /// nvcc 13.0 on cuda/flash.cu for sm_80 and sm_90a: registers, no static shared memory.
    #[test]
    fn flash_entries_per_arch() {
        let rows = parse_ptxas(include_str!("../tests/data/ptxas/flash.log"));
        let r = find(&rows, "attn_flash_fwd_f16_d64", "sm_80");
        assert_eq!((r.entry, r.registers, r.smem, r.stack), (true, 254, 0, 0));
        assert!(!r.degraded());
        let r = find(&rows, "attn_flash_ws_fwd_bf16_d128", "sm_90a");
        assert!(r.entry && r.registers > 0 && !r.degraded(), "{r:?}");
        // Every "Compiling entry function" line is one row, and no row is invented.
        let compiled = include_str!("../tests/data/ptxas/flash.log").matches("Compiling entry function").count();
        assert_eq!(rows.len(), compiled);
        assert!(rows.iter().all(|(_, a, r)| r.entry && (a == "sm_80" || a == "sm_90a")));
    }

    /// nvcc 13.0 on cuda/naive.cu: static shared memory and cmem on one line.
    #[test]
    fn naive_static_shared_memory() {
        let rows = parse_ptxas(include_str!("../tests/data/ptxas/naive.log"));
        let r = find(&rows, "attn_naive_pv_f32", "sm_75");
        assert_eq!((r.registers, r.smem), (r.registers.max(1), 2176));
        assert_eq!(find(&rows, "attn_naive_softmax", "sm_75").smem, 0);
    }

    /// nvcc 13.0 on a test kernel that spills and one whose wgmma ptxas serialises, for sm_89,
    /// sm_90a and compute_120: the warnings come before the sm_90a run's "Compiling" lines and
    /// belong to its row, not to sm_89's (the previous arch); spills are per arch.
    #[test]
    fn spills_and_serialised_wgmma_land_on_their_arch() {
        let rows = parse_ptxas(include_str!("../tests/data/ptxas/spills_and_wgmma.log"));
        let ser89 = find(&rows, "ser", "sm_89");
        assert!(!ser89.degraded(), "{ser89:?}");
        let ser90 = find(&rows, "ser", "sm_90a");
        assert_eq!(ser90.perf_warnings, ["C7517", "C7511"]);
        assert!(ser90.degraded());
        let spill89 = find(&rows, "spill", "sm_89");
        assert_eq!((spill89.stack, spill89.spill_stores, spill89.spill_loads), (256, 0, 0));
        let spill90 = find(&rows, "spill", "sm_90a");
        assert_eq!((spill90.stack, spill90.spill_stores, spill90.spill_loads, spill90.registers), (272, 8, 8, 72));
        assert!(spill90.degraded() && !spill89.degraded());
        assert_eq!(rows.len(), 4);
    }

    /// A warning whose function is never compiled afterwards is kept (under no arch).
    #[test]
    fn orphan_warning_is_kept() {
        let log = "ptxas info    : (C7508) Potential Performance Loss: setmaxnreg ignored; unable to determine register count at entry in function 'k'\n";
        let rows = parse_ptxas(log);
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].0.as_str(), rows[0].1.as_str()), ("k", ""));
        assert_eq!(rows[0].2.perf_warnings, ["C7508"]);
    }

    #[test]
    fn helpers() {
        assert_eq!(perf_warning_code("(C7519) warpgroup.arrive is injected in around line 85"), None);
        assert_eq!(perf_warning_code("(C7517) warpgroup.wait is injected in around line 80"), Some("C7517"));
        assert_eq!(perf_warning_code("(C7515) Potential Performance Loss: wgmma.mma_async"), Some("C7515"));
        assert_eq!(leading_number(" 2176 bytes smem"), 2176);
        assert_eq!(leading_number("bytes"), 0);
        let mut archs = ["sm_90a", "sm_100", "sm_75", "sm_90"];
        archs.sort_by_key(|a| arch_key(a));
        assert_eq!(archs, ["sm_75", "sm_90", "sm_90a", "sm_100"]);
    }
}
