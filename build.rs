//! Build script: compiles `cuda/*.cu` into fatbins with nvcc when it is
//! available, and always embeds the CUDA sources so that the runtime can
//! compile them with NVRTC instead (no nvcc at build time, or no image for the
//! device). Writes `$OUT_DIR/kernels.rs`, which the crate `include!`s.
//!
//! Environment:
//! * `NVCC` (path of nvcc), else `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`,
//!   then `nvcc` on `PATH`.
//! * `ATTN_CUDA_ARCH_LIST`, else `TORCH_CUDA_ARCH_LIST`, else
//!   `arch::DEFAULT_ARCH_LIST` (empty values count as unset).
//! * `ATTN_REQUIRE_NVCC=1`: fail instead of deferring to NVRTC when nvcc is
//!   missing. `ATTN_DENY_SPILLS=1`: fail when ptxas reports register spills
//!   or tensor-core code it had to serialise (C7508, C7514, C7515...). Both
//!   take the spellings of `src/flag.rs` (as at run time); another value fails
//!   the build, an empty one counts as unset.
//!
//! nvcc processes run in parallel, each in a slot of cargo's jobserver (the
//! build script's own token, then tokens acquired from cargo), so `cargo build
//! -jN` never runs more than N jobs at once. Without a jobserver, up to
//! `NUM_JOBS` at once.
//!
//! Every module (`cuda/<module>.cu`) is in the kernel registry (`src/registry.rs`), which gives
//! its minimum arch and its entry points: each one's entry points are generated into
//! `$OUT_DIR/gen/<module>_entries.cuh`, which its `.cu` file includes (nvcc finds it through
//! `-I`; NVRTC gets it embedded with the sources), and every image nvcc builds is checked to hold
//! exactly the registry's kernels. A module is built for the arch list entries that provide its
//! minimum (`ArchSpec::provides`: an arch-specific `9.0a` minimum takes exactly the `9.0a`
//! entry).

#[allow(dead_code)]
#[path = "src/arch.rs"]
mod arch;

#[path = "src/flag.rs"]
mod flag;

#[path = "src/registry.rs"]
mod registry;

#[allow(dead_code)]
#[path = "build/ptxas.rs"]
mod ptxas;

use arch::ArchSpec;
use ptxas::{arch_key, parse_ptxas, Resources};
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::mpsc;

/// Variables that change the build. `PATH` is not one of them: it matters only through the
/// nvcc found on it, which `find_nvcc` registers itself (see there).
const ENV_VARS: [&str; 7] = [
    "NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "ATTN_CUDA_ARCH_LIST",
    "TORCH_CUDA_ARCH_LIST",
    "ATTN_REQUIRE_NVCC",
    "ATTN_DENY_SPILLS",
];

const NO_NVCC_WARNING: &str =
    "nvcc not found (looked in NVCC, CUDA_HOME, CUDA_PATH, PATH); kernels will be \
compiled at first use by NVRTC. Set NVCC or CUDA_HOME to build them ahead of time.";

fn main() {
    // Cargo's jobserver, taken first thing: on Unix it is a pair of inherited file descriptors
    // (or a fifo), best claimed before this process opens any file of its own. `check_pipe`
    // refuses descriptors that are no longer pipes (not inherited, numbers reused).
    // SAFETY: called once, before anything else in this process opens a file descriptor.
    let jobserver = unsafe { jobserver::Client::from_env_ext(true) }.client.ok();
    if let Err(msg) = run(jobserver) {
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}

/// A `.cu` file to compile.
struct Module {
    /// File stem, the module's name at run time (`naive`).
    stem: String,
    path: PathBuf,
    /// The module's entry in the registry.
    registry: registry::Module,
}

/// A working nvcc.
struct Nvcc {
    path: PathBuf,
    version: String,
}

/// What compiling one module produced.
struct Compiled {
    stem: String,
    /// None when the module was skipped for every arch.
    fatbin: Option<PathBuf>,
    archs: Vec<ArchSpec>,
    /// (kernel, arch) -> resources, in ptxas order.
    resources: Vec<(String, String, Resources)>,
}

fn run(jobserver: Option<jobserver::Client>) -> Result<(), String> {
    let manifest_dir =
        PathBuf::from(env_var("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR is not set")?);
    let out_dir = PathBuf::from(env_var("OUT_DIR").ok_or("OUT_DIR is not set")?);
    let cuda_dir = manifest_dir.join("cuda");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/arch.rs");
    println!("cargo:rerun-if-changed=src/flag.rs");
    println!("cargo:rerun-if-changed=src/registry.rs");
    println!("cargo:rerun-if-changed=build/ptxas.rs");
    println!("cargo:rerun-if-changed=cuda");
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    // Checked up front, whether or not the build comes to need them, as settings are at run time.
    let require_nvcc = env_flag("ATTN_REQUIRE_NVCC")?;
    let deny_spills = env_flag("ATTN_DENY_SPILLS")?;

    // Every .cu/.cuh file under cuda/, sorted by name.
    let mut sources: Vec<(String, PathBuf)> = Vec::new();
    let entries =
        fs::read_dir(&cuda_dir).map_err(|e| format!("cannot read {}: {e}", cuda_dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot read {}: {e}", cuda_dir.display()))?;
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| format!("non-UTF-8 file name in {}", cuda_dir.display()))?
            .to_string();
        println!("cargo:rerun-if-changed=cuda/{name}");
        if name.ends_with(".cu") || name.ends_with(".cuh") {
            sources.push((name, path));
        }
    }
    sources.sort();

    registry::validate()?;
    let mut modules = Vec::new();
    for (name, path) in &sources {
        if let Some(stem) = name.strip_suffix(".cu") {
            let text = fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let Some(entry) = registry::Module::from_name(stem) else {
                return Err(format!(
                    "cuda/{name}: module {stem} is not in src/registry.rs (every module's kernels, \
                     minimum arch and entry points are stated there)"
                ));
            };
            let include = format!("#include \"{}\"", entry.header());
            if !text.lines().any(|l| l.trim() == include) {
                return Err(format!(
                    "cuda/{name}: module {stem} does not {include} (its generated entry points)"
                ));
            }
            modules.push(Module {
                stem: stem.to_string(),
                path: path.clone(),
                registry: entry,
            });
        }
    }
    for m in registry::Module::ALL {
        if !modules.iter().any(|module| module.registry == m) {
            return Err(format!("src/registry.rs lists module {0}, and there is no cuda/{0}.cu", m.name()));
        }
    }

    // The registry modules' entry points, for nvcc (-I gen) and, embedded, for NVRTC.
    let gen_dir = out_dir.join("gen");
    fs::create_dir_all(&gen_dir).map_err(|e| format!("cannot create {}: {e}", gen_dir.display()))?;
    for m in registry::Module::ALL {
        let name = m.header();
        if sources.iter().any(|(n, _)| n == name) {
            return Err(format!("cuda/{name}: the name of a generated header (src/registry.rs); rename the file"));
        }
        let path = gen_dir.join(name);
        write_if_changed(&path, &registry::entries_header(m))?;
        sources.push((name.to_string(), path));
    }

    // The arch list.
    let (list_source, requested) = match (
        env_var("ATTN_CUDA_ARCH_LIST"),
        env_var("TORCH_CUDA_ARCH_LIST"),
    ) {
        (Some(list), _) => ("ATTN_CUDA_ARCH_LIST", list),
        (None, Some(list)) => ("TORCH_CUDA_ARCH_LIST", list),
        (None, None) => ("default", arch::DEFAULT_ARCH_LIST.to_string()),
    };
    let mut archs = arch::parse_arch_list(&requested).map_err(|e| {
        if list_source == "default" {
            format!("DEFAULT_ARCH_LIST: {e}")
        } else {
            format!("{list_source}: {e}")
        }
    })?;

    let found = find_nvcc()?;
    match &found {
        // Rebuild when the compiler itself changes, not whenever PATH does (activating a venv
        // would otherwise rebuild every kernel). To switch toolkits through PATH alone, set
        // NVCC or CUDA_HOME instead.
        Some(nvcc) => println!("cargo:rerun-if-changed={}", nvcc.path.display()),
        // Without nvcc a PATH change may bring one; rebuilding without it costs seconds.
        None => println!("cargo:rerun-if-env-changed=PATH"),
    }
    let nvcc = match found {
        Some(nvcc) => nvcc,
        None => {
            if require_nvcc {
                return Err(
                    "ATTN_REQUIRE_NVCC is set but nvcc was not found (looked in NVCC, CUDA_HOME, CUDA_PATH, PATH). \
                     Set NVCC to the path of nvcc, or CUDA_HOME to a CUDA toolkit, or unset ATTN_REQUIRE_NVCC to \
                     let NVRTC compile the kernels at first use."
                    .to_string());
            }
            println!("cargo:warning={NO_NVCC_WARNING}");
            let compiled: Vec<Compiled> = Vec::new();
            return write_kernels_rs(
                &out_dir,
                None,
                list_source,
                &archs,
                &compiled,
                &sources,
                "",
            );
        }
    };

    archs = check_archs(&nvcc, &out_dir, list_source, archs)?;

    let compiled = compile_all(&nvcc, &out_dir, &modules, &archs, jobserver)?;
    let report = ptxas_report(&nvcc, &archs, &modules, &compiled);
    let report_path = out_dir.join("ptxas_report.txt");
    fs::write(&report_path, &report)
        .map_err(|e| format!("cannot write {}: {e}", report_path.display()))?;

    let spills: Vec<String> = compiled
        .iter()
        .flat_map(|c| c.resources.iter())
        .filter(|(_, _, r)| r.degraded())
        .map(|(k, a, r)| {
            format!(
                "{k} on {a} ({} B stores, {} B loads{})",
                r.spill_stores,
                r.spill_loads,
                r.perf_warnings.iter().map(|w| format!(", {w}")).collect::<String>()
            )
        })
        .collect();
    if !spills.is_empty() {
        let msg = format!(
            "ptxas reports register spills or serialised tensor-core code in {}; see {}",
            spills.join(", "),
            report_path.display()
        );
        if deny_spills {
            return Err(format!("{msg} (ATTN_DENY_SPILLS is set)\n\n{report}"));
        }
        println!("cargo:warning={msg}");
    }

    write_kernels_rs(
        &out_dir,
        Some(&nvcc),
        list_source,
        &archs,
        &compiled,
        &sources,
        &report,
    )
}

/// A non-empty environment variable (empty or whitespace-only counts as unset).
fn env_var(name: &str) -> Option<String> {
    env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// A boolean environment variable, spelt as `flag::parse_flag` accepts (the run-time settings'
/// parser); unset or empty is false, any other value an error.
fn env_flag(name: &str) -> Result<bool, String> {
    match env_var(name) {
        None => Ok(false),
        Some(v) => flag::parse_flag(&v).ok_or_else(|| {
            format!(
                "invalid build setting {name}={v:?}: expected {} (empty counts as unset)",
                flag::FLAG_FORMS
            )
        }),
    }
}

/// Writes `text` to `path` unless the file already holds it (so that its mtime does not force
/// rebuilds).
fn write_if_changed(path: &Path, text: &str) -> Result<(), String> {
    if fs::read_to_string(path).ok().as_deref() != Some(text) {
        fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Runs `nvcc --version` and extracts the version ("13.0.88").
fn nvcc_version(path: &Path) -> Result<String, String> {
    let out = Command::new(path)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {} --version: {e}", path.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --version failed ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // "Cuda compilation tools, release 13.0, V13.0.88"
    let line = text.lines().find(|l| l.contains("release")).unwrap_or("");
    if let Some(v) = line.split(", V").nth(1) {
        return Ok(v.trim().to_string());
    }
    if let Some(v) = line.split("release ").nth(1) {
        return Ok(v.split(',').next().unwrap_or("").trim().to_string());
    }
    Err(format!(
        "{} --version printed no version:\n{text}",
        path.display()
    ))
}

/// Finds a working nvcc: `NVCC`, `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`,
/// then `PATH`. A candidate that exists but does not run is an error, not a
/// silent fallback to NVRTC.
fn find_nvcc() -> Result<Option<Nvcc>, String> {
    let exe = format!("nvcc{}", env::consts::EXE_SUFFIX);
    if let Some(path) = env::var_os("NVCC").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        let version = nvcc_version(&path).map_err(|e| format!("NVCC={}: {e}", path.display()))?;
        return Ok(Some(Nvcc { path, version }));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var).filter(|p| !p.is_empty()) {
            let path = PathBuf::from(home).join("bin").join(&exe);
            if path.is_file() {
                let version = nvcc_version(&path).map_err(|e| format!("{var}: {e}"))?;
                return Ok(Some(Nvcc { path, version }));
            }
        }
    }
    if let Some(paths) = env::var_os("PATH") {
        for dir in env::split_paths(&paths) {
            let path = dir.join(&exe);
            if path.is_file() {
                let version = nvcc_version(&path).map_err(|e| format!("nvcc on PATH: {e}"))?;
                return Ok(Some(Nvcc { path, version }));
            }
        }
    }
    Ok(None)
}

/// `-gencode` flags for one arch entry.
fn gencode(spec: &ArchSpec) -> Vec<String> {
    let mut flags = vec![
        "-gencode".to_string(),
        format!("arch={},code={}", spec.compute(), spec.sm()),
    ];
    if spec.ptx {
        flags.push("-gencode".to_string());
        flags.push(format!("arch={},code={}", spec.compute(), spec.compute()));
    }
    flags
}

/// Asks nvcc (without compiling anything) whether it accepts these entries.
fn nvcc_accepts(nvcc: &Nvcc, out_dir: &Path, specs: &[ArchSpec]) -> Result<(), String> {
    let probe = out_dir.join("arch_probe.cu");
    fs::write(&probe, "__global__ void attn_arch_probe() {}\n")
        .map_err(|e| format!("cannot write {}: {e}", probe.display()))?;
    let mut cmd = Command::new(&nvcc.path);
    cmd.arg("--dryrun").arg("-fatbin");
    for spec in specs {
        cmd.args(gencode(spec));
    }
    cmd.arg("-o")
        .arg(out_dir.join("arch_probe.fatbin"))
        .arg(&probe);
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.path.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        // nvcc --dryrun prints the commands it would run; keep only its complaint.
        let err = String::from_utf8_lossy(&out.stderr);
        let fatal: Vec<&str> = err.lines().filter(|l| !l.starts_with("#$")).collect();
        Err(fatal.join("\n").trim().to_string())
    }
}

/// The archs this nvcc lists as supported, as "7.5, 8.0, ..." (empty if it
/// cannot list them: `--list-gpu-code` is CUDA 11+).
fn nvcc_supported(nvcc: &Nvcc) -> String {
    let Ok(out) = Command::new(&nvcc.path).arg("--list-gpu-code").output() else {
        return String::new();
    };
    let mut ccs: Vec<(u32, u32)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("sm_"))
        .filter_map(|d| {
            let (maj, min) = d.split_at(d.len().checked_sub(1)?);
            Some((maj.parse().ok()?, min.parse().ok()?))
        })
        .collect();
    ccs.sort();
    ccs.dedup();
    ccs.iter()
        .map(|(a, b)| format!("{a}.{b}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks the arch list against nvcc. A user's list must be fully supported;
/// the default list loses what this nvcc lacks (with one warning), and its
/// +PTX moves to the newest remaining entry.
fn check_archs(
    nvcc: &Nvcc,
    out_dir: &Path,
    source: &str,
    archs: Vec<ArchSpec>,
) -> Result<Vec<ArchSpec>, String> {
    if nvcc_accepts(nvcc, out_dir, &archs).is_ok() {
        return Ok(archs);
    }
    let mut kept = Vec::new();
    let mut rejected = Vec::new();
    for spec in archs {
        match nvcc_accepts(nvcc, out_dir, &[spec]) {
            Ok(()) => kept.push(spec),
            Err(why) => rejected.push((spec, why)),
        }
    }
    if rejected.is_empty() {
        // Each entry passes alone but not together: let the real compile report it.
        return Ok(kept);
    }
    let supported = nvcc_supported(nvcc);
    let supported = if supported.is_empty() {
        String::new()
    } else {
        format!("; it supports {supported}")
    };
    let names = rejected
        .iter()
        .map(|(s, _)| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let whys = rejected
        .iter()
        .map(|(s, w)| format!("  {s}: {w}"))
        .collect::<Vec<_>>()
        .join("\n");
    if source != "default" {
        return Err(format!(
            "{source} {} {names} {} not supported by nvcc {} at {}{supported}.\n{whys}\n\
             Remove {} from {source}, or point NVCC or CUDA_HOME at a CUDA toolkit that supports {}.",
            if rejected.len() == 1 { "entry" } else { "entries" },
            if rejected.len() == 1 { "is" } else { "are" },
            nvcc.version,
            nvcc.path.display(),
            if rejected.len() == 1 { "it" } else { "them" },
            if rejected.len() == 1 { "it" } else { "them" },
        ));
    }
    if kept.is_empty() {
        return Err(format!(
            "nvcc {} at {} supports none of the default arch list {}{supported}. Set ATTN_CUDA_ARCH_LIST, \
             or point NVCC or CUDA_HOME at a newer CUDA toolkit.\n{whys}",
            nvcc.version,
            nvcc.path.display(),
            arch::DEFAULT_ARCH_LIST,
        ));
    }
    if rejected.iter().any(|(s, _)| s.ptx) && !kept.iter().any(|s| s.ptx) {
        if let Some(newest) = kept.iter_mut().max() {
            newest.ptx = true;
        }
    }
    println!(
        "cargo:warning=nvcc {} at {} does not support {names} from the default arch list; building for {} \
         instead. Set ATTN_CUDA_ARCH_LIST to choose the list yourself.",
        nvcc.version,
        nvcc.path.display(),
        arch::format_arch_list(&kept),
    );
    Ok(kept)
}

/// The slot one nvcc process runs in.
enum Slot {
    /// The token cargo gave this build script by starting it.
    Implicit,
    /// A token acquired from cargo's jobserver: held, never read; dropping it releases it.
    Token(#[allow(dead_code)] jobserver::Acquired),
    /// No jobserver: a slot of our own pool of `NUM_JOBS`.
    Own,
}

/// What the scheduler in `compile_all` waits for.
enum Event {
    /// The jobserver's helper thread acquired a token (or failed to).
    Token(std::io::Result<jobserver::Acquired>),
    /// Module `i` finished, in this slot.
    Done(usize, Result<Compiled, String>, Slot),
}

/// Compiles every module, several at a time: with cargo's jobserver, one nvcc in the build
/// script's own slot plus one per token acquired from it; without, up to NUM_JOBS (from cargo)
/// at once. Either way at most NUM_JOBS, and no more than there are modules.
fn compile_all(
    nvcc: &Nvcc,
    out_dir: &Path,
    modules: &[Module],
    archs: &[ArchSpec],
    jobserver: Option<jobserver::Client>,
) -> Result<Vec<Compiled>, String> {
    let jobs = env_var("NUM_JOBS")
        .and_then(|j| j.parse::<usize>().ok())
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .clamp(1, modules.len().max(1));
    let (tx, rx) = mpsc::channel::<Event>();
    // Tokens come through a helper thread, so that waiting for one never stops this thread
    // from seeing a module finish (a blocking acquire could wait forever under `-j1`).
    let mut helper = None;
    let own_pool = match jobserver {
        None => true,
        Some(_) if jobs == 1 => false,
        Some(client) => {
            let tx = tx.clone();
            match client.into_helper_thread(move |token| {
                let _ = tx.send(Event::Token(token));
            }) {
                Ok(h) => helper = Some(h),
                Err(e) => println!(
                    "cargo:warning=cannot start a thread to take tokens from cargo's jobserver \
                     ({e}); compiling the CUDA modules one at a time"
                ),
            }
            false
        }
    };

    let mut results: Vec<Option<Result<Compiled, String>>> = modules.iter().map(|_| None).collect();
    let mut next = 0; // the first module not started
    let mut running = 0; // nvcc processes running, in every kind of slot
    let mut implicit_free = true;
    let mut requested = 0; // tokens asked of the helper and not yet received
    std::thread::scope(|scope| {
        let start = |i: usize, slot: Slot| {
            let tx = tx.clone();
            let module = &modules[i];
            scope.spawn(move || {
                // A panic must still report back, or the loop below would wait for it forever.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    compile_module(nvcc, out_dir, module, archs)
                }))
                .unwrap_or_else(|_| Err(format!("compiling {} panicked", module.path.display())));
                let _ = tx.send(Event::Done(i, result, slot));
            });
        };
        loop {
            if own_pool {
                while next < modules.len() && running < jobs {
                    start(next, Slot::Own);
                    next += 1;
                    running += 1;
                }
            } else {
                if implicit_free && next < modules.len() {
                    start(next, Slot::Implicit);
                    implicit_free = false;
                    next += 1;
                    running += 1;
                }
                if let Some(helper) = &helper {
                    let in_tokens = running - usize::from(!implicit_free);
                    while requested < modules.len() - next && requested + in_tokens < jobs - 1 {
                        helper.request_token();
                        requested += 1;
                    }
                }
            }
            if running == 0 {
                // Nothing runs, so the implicit slot (or the own pool) is free: all started.
                break;
            }
            match rx.recv().expect("this thread holds a sender") {
                Event::Token(Ok(token)) => {
                    requested -= 1;
                    if next < modules.len() {
                        start(next, Slot::Token(token));
                        next += 1;
                        running += 1;
                    } // else dropped: released to cargo at once
                }
                Event::Token(Err(e)) => {
                    requested -= 1;
                    if helper.take().is_some() {
                        println!(
                            "cargo:warning=cannot take a token from cargo's jobserver ({e}); \
                             compiling the remaining CUDA modules one at a time"
                        );
                    }
                }
                Event::Done(i, result, slot) => {
                    results[i] = Some(result);
                    running -= 1;
                    if let Slot::Implicit = slot {
                        implicit_free = true;
                    } // a token is released as `slot` drops
                }
            }
        }
    });
    // Stops the helper (a token it acquires meanwhile is released with the channel).
    drop(helper);
    results
        .into_iter()
        .map(|r| r.expect("every module compiled"))
        .collect()
}

fn compile_module(
    nvcc: &Nvcc,
    out_dir: &Path,
    module: &Module,
    archs: &[ArchSpec],
) -> Result<Compiled, String> {
    let archs: Vec<ArchSpec> = archs
        .iter()
        .copied()
        .filter(|s| s.provides(&module.registry.min_arch()))
        .collect();
    if archs.is_empty() {
        return Ok(Compiled {
            stem: module.stem.clone(),
            fatbin: None,
            archs,
            resources: Vec::new(),
        });
    }
    let fatbin = out_dir.join(format!("{}.fatbin", module.stem));
    let mut cmd = Command::new(&nvcc.path);
    cmd.args(["-fatbin", "-O3", "-Xptxas", "-v"]).args(arch::KERNEL_COMPILE_FLAGS);
    // The generated entry-point headers (the same text NVRTC gets by name).
    cmd.arg("-I").arg(out_dir.join("gen"));
    for spec in &archs {
        cmd.args(gencode(spec));
    }
    cmd.arg("-o").arg(&fatbin).arg(&module.path);
    let out: Output = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.path.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "nvcc {} failed to compile {} ({}).\ncommand: {cmd:?}\n{}{}",
            nvcc.version,
            module.path.display(),
            out.status,
            stderr.trim_end(),
            if stdout.trim().is_empty() {
                String::new()
            } else {
                format!("\n{}", stdout.trim_end())
            },
        ));
    }
    let log = format!("{stdout}{stderr}");
    let log_path = out_dir.join(format!("{}.ptxas.log", module.stem));
    fs::write(&log_path, &log).map_err(|e| format!("cannot write {}: {e}", log_path.display()))?;
    let resources = parse_ptxas(&log);
    check_registry_image(module.registry, &archs, &resources)
        .map_err(|e| format!("{e} (see {}; the table is src/registry.rs)", log_path.display()))?;
    Ok(Compiled {
        stem: module.stem.clone(),
        fatbin: Some(fatbin),
        archs,
        resources,
    })
}

/// Checks what nvcc built for a registry module against the registry: for every arch, exactly
/// the module's kernels as entry points, with the static shared memory the table states.
fn check_registry_image(
    module: registry::Module,
    archs: &[ArchSpec],
    resources: &[(String, String, Resources)],
) -> Result<(), String> {
    let mut errors = Vec::new();
    for spec in archs {
        let sm = spec.sm();
        let built: Vec<&(String, String, Resources)> =
            resources.iter().filter(|(_, a, r)| *a == sm && r.entry).collect();
        for k in module.kernels() {
            match built.iter().find(|(n, _, _)| n == k.name) {
                None => errors.push(format!("{} is missing from the {sm} image", k.name)),
                Some((_, _, r)) if r.smem != u64::from(k.static_smem()) => errors.push(format!(
                    "{} on {sm} has {} bytes of static shared memory, the registry says {}",
                    k.name,
                    r.smem,
                    k.static_smem()
                )),
                Some(_) => {}
            }
        }
        for (name, _, _) in &built {
            if !module.kernels().any(|k| k.name == name) {
                errors.push(format!("the {sm} image has entry point {name}, which the registry does not list"));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("module {}: {}", module.name(), errors.join("; ")))
    }
}

fn ptxas_report(
    nvcc: &Nvcc,
    archs: &[ArchSpec],
    modules: &[Module],
    compiled: &[Compiled],
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "attention ptxas resource report: nvcc {} ({}), arch list {}",
        nvcc.version,
        nvcc.path.display(),
        arch::format_arch_list(archs)
    );
    let _ = writeln!(
        s,
        "regs = registers per thread; smem = static shared memory bytes; stack, spills in bytes\n"
    );
    let _ = writeln!(
        s,
        "{:<10} {:<32} {:<8} {:>5} {:>7} {:>6} {:>9} {:>9}",
        "module", "kernel", "arch", "regs", "smem", "stack", "spill-st", "spill-ld"
    );
    let mut total = 0;
    let mut spilling = 0;
    for (c, m) in compiled.iter().zip(modules) {
        if c.fatbin.is_none() {
            let _ = writeln!(
                s,
                "{:<10} (skipped: no arch in the list is at or above its min-arch {})",
                c.stem, m.registry.min_arch()
            );
            continue;
        }
        let mut rows: Vec<&(String, String, Resources)> = c.resources.iter().collect();
        rows.sort_by_key(|(k, a, _)| (k.clone(), arch_key(a)));
        for (kernel, arch_name, r) in rows {
            total += 1;
            if r.degraded() {
                spilling += 1;
            }
            let _ = writeln!(
                s,
                "{:<10} {:<32} {:<8} {:>5} {:>7} {:>6} {:>9} {:>9}{}",
                c.stem,
                kernel,
                arch_name,
                r.registers,
                r.smem,
                r.stack,
                r.spill_stores,
                r.spill_loads,
                if r.spill_stores > 0 || r.spill_loads > 0 {
                    "  SPILLS".to_string()
                } else if !r.perf_warnings.is_empty() {
                    format!("  SERIALISED {}", r.perf_warnings.join(" "))
                } else {
                    String::new()
                }
            );
        }
        if c.archs.len() != archs.len() {
            let _ = writeln!(
                s,
                "{:<10} (built for {} only: min-arch {})",
                c.stem,
                arch::format_arch_list(&c.archs),
                m.registry.min_arch()
            );
        }
    }
    let _ = writeln!(s, "\n{total} kernel/arch pairs, {spilling} with spills or serialised wgmma.");
    s
}

/// Writes `$OUT_DIR/kernels.rs`.
#[allow(clippy::too_many_arguments)]
fn write_kernels_rs(
    out_dir: &Path,
    nvcc: Option<&Nvcc>,
    list_source: &str,
    archs: &[ArchSpec],
    compiled: &[Compiled],
    sources: &[(String, PathBuf)],
    report: &str,
) -> Result<(), String> {
    let path_str = |p: &Path| -> Result<String, String> {
        p.to_str()
            .map(|s| format!("{s:?}"))
            .ok_or_else(|| format!("non-UTF-8 path {}", p.display()))
    };
    let mut s = String::new();
    s.push_str("// @generated by build.rs: the CUDA kernels, as fatbins (when nvcc was found) and sources.\n\n");
    s.push_str("/// True when nvcc compiled the kernels ahead of time.\n");
    let _ = writeln!(s, "pub const BUILT_WITH_NVCC: bool = {};", nvcc.is_some());
    s.push_str("/// nvcc's version (\"13.0.88\"), or \"\" when built without nvcc.\n");
    let _ = writeln!(
        s,
        "pub const NVCC_VERSION: &str = {:?};",
        nvcc.map(|n| n.version.as_str()).unwrap_or("")
    );
    s.push_str(
        "/// Where the arch list came from: \"ATTN_CUDA_ARCH_LIST\", \"TORCH_CUDA_ARCH_LIST\" or \"default\".\n",
    );
    let _ = writeln!(s, "pub const ARCH_LIST_SOURCE: &str = {list_source:?};");
    s.push_str(
        "/// The arch list the fatbins were built for, normalised (\"7.5;8.0;...;12.0+PTX\"); \
         without nvcc, the list that was requested.\n",
    );
    let _ = writeln!(
        s,
        "pub const ARCH_LIST: &str = {:?};",
        arch::format_arch_list(archs)
    );
    s.push_str(
        "/// One fatbin per module (file stem of the .cu); empty without nvcc, and a module skipped for \
         every arch (min-arch) has none.\n",
    );
    s.push_str("pub static FATBINS: &[(&str, &[u8])] = &[\n");
    for c in compiled {
        if let Some(f) = &c.fatbin {
            let _ = writeln!(s, "    ({:?}, include_bytes!({})),", c.stem, path_str(f)?);
        }
    }
    s.push_str("];\n");
    s.push_str(
        "/// Every file under cuda/ (.cu and .cuh) and the registry modules' generated entry-point headers \
         (<module>_entries.cuh), by file name, for NVRTC.\n",
    );
    s.push_str("pub static SOURCES: &[(&str, &str)] = &[\n");
    for (name, path) in sources {
        let _ = writeln!(s, "    ({name:?}, include_str!({})),", path_str(path)?);
    }
    s.push_str("];\n");
    s.push_str("/// The ptxas resource report (registers, spills, shared memory per kernel and arch); \"\" without nvcc.\n");
    let _ = writeln!(s, "pub const PTXAS_REPORT: &str = {report:?};");

    write_if_changed(&out_dir.join("kernels.rs"), &s)
}
