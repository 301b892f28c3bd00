//! CUDA architecture lists and which compiled image a device can run.
//!
//! An *arch list* names the compute capabilities kernels are built for, in the
//! same syntax as PyTorch's `TORCH_CUDA_ARCH_LIST`: entries such as `8.6`,
//! `9.0a` or `12.0+PTX`, separated by `;` and/or whitespace. This module is
//! shared by the build script (which turns the list into `nvcc -gencode`
//! flags) and the runtime (which decides whether the embedded fatbins hold an
//! image the current device can load, or whether NVRTC must compile one).
//!
//! It depends on `std` only, because `build.rs` includes it with `#[path]`.
//!
//! ```
//! use attention::arch::{best_image, parse_arch_list, ImageMatch};
//!
//! let built = parse_arch_list("8.0;8.6;9.0+PTX").unwrap();
//! // An 8.9 device runs the 8.6 cubin (same major, lower minor).
//! assert_eq!(best_image(&built, (8, 9)), ImageMatch::Sass(built[1]));
//! // A 10.0 device has no cubin; the driver JIT-compiles the 9.0 PTX.
//! assert_eq!(best_image(&built, (10, 0)), ImageMatch::Ptx(built[2]));
//! // A 7.5 device can run nothing here.
//! assert_eq!(best_image(&built, (7, 5)), ImageMatch::None);
//! ```

/// The language and math options every kernel is compiled with, by nvcc at build time and by
/// NVRTC at run time: one list, so an embedded image and a JIT image compute the same values.
/// No fast-math: the kernels call the approximate instructions they want explicitly
/// (`ex2.approx`, `tanh.approx`), and everything else keeps IEEE semantics on both paths.
pub const KERNEL_COMPILE_FLAGS: [&str; 1] = ["--std=c++17"];

/// A CUDA compute capability, e.g. 8.0 for the A100.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ComputeCapability {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

impl ComputeCapability {
    /// `ComputeCapability::new(9, 0)` is sm_90.
    pub const fn new(major: u32, minor: u32) -> Self {
        ComputeCapability { major, minor }
    }
    /// `sm_90`.
    pub fn sm(&self) -> String {
        format!("sm_{}{}", self.major, self.minor)
    }
}

impl std::fmt::Display for ComputeCapability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

use std::fmt;
use std::str::FromStr;

/// The list used when neither `ATTN_CUDA_ARCH_LIST` nor `TORCH_CUDA_ARCH_LIST`
/// is set: Turing through Blackwell as cubins, plus PTX of the newest entry so
/// that future GPUs can still JIT-compile it.
pub const DEFAULT_ARCH_LIST: &str = "7.5;8.0;8.6;8.9;9.0a;10.0;12.0+PTX";

/// The feature-set suffix of an arch entry (`9.0a`, `10.0f`).
///
/// Ordered `None < A < F` only so that [`ArchSpec`] can be sorted; the order
/// carries no meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum ArchSuffix {
    /// Plain entry (`9.0` → `sm_90`): the baseline feature set, runs on later
    /// minors of the same major and, as PTX, on every later device.
    #[default]
    None,
    /// Arch-specific (`9.0a` → `sm_90a`): may use features such as `wgmma`
    /// that exist only on exactly this compute capability; neither its cubin
    /// nor its PTX runs on any other one.
    A,
    /// Family-specific (`10.0f` → `sm_100f`, CUDA 12.9+): features shared by
    /// one major's family; runs on the same major with an equal or later minor.
    F,
}

impl ArchSuffix {
    /// The suffix as nvcc spells it: `""`, `"a"` or `"f"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ArchSuffix::None => "",
            ArchSuffix::A => "a",
            ArchSuffix::F => "f",
        }
    }

    /// How specific an image built with this suffix is; when two images of the
    /// same compute capability both run, the more specific one is preferred.
    const fn specificity(self) -> u8 {
        match self {
            ArchSuffix::None => 0,
            ArchSuffix::F => 1,
            ArchSuffix::A => 2,
        }
    }
}

/// One entry of a PyTorch-style arch list, e.g. `"8.6"`, `"9.0a"`, `"12.0+PTX"`.
///
/// ```
/// use attention::arch::{ArchSpec, ArchSuffix};
///
/// let spec: ArchSpec = "9.0a+PTX".parse().unwrap();
/// assert_eq!((spec.major, spec.minor, spec.suffix, spec.ptx), (9, 0, ArchSuffix::A, true));
/// assert_eq!(spec.sm(), "sm_90a");
/// assert_eq!(spec.compute(), "compute_90a");
/// assert_eq!(spec.to_string(), "9.0a+PTX");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ArchSpec {
    /// Compute capability major version (the `9` of `9.0`).
    pub major: u32,
    /// Compute capability minor version, a single digit (the `0` of `9.0`).
    pub minor: u32,
    /// Arch-specific (`a`) or family-specific (`f`) feature set, if any.
    pub suffix: ArchSuffix,
    /// Whether PTX is embedded for this entry too (`+PTX`), besides the cubin.
    pub ptx: bool,
}

impl ArchSpec {
    /// A plain entry (no suffix, no PTX) for compute capability `major.minor`.
    pub const fn new(major: u32, minor: u32) -> Self {
        ArchSpec {
            major,
            minor,
            suffix: ArchSuffix::None,
            ptx: false,
        }
    }

    /// The compute capability `(major, minor)`.
    pub const fn cc(&self) -> (u32, u32) {
        (self.major, self.minor)
    }

    /// The real-architecture (cubin) name nvcc uses, e.g. `"sm_90a"`.
    pub fn sm(&self) -> String {
        format!("sm_{}{}{}", self.major, self.minor, self.suffix.as_str())
    }

    /// The virtual-architecture (PTX) name nvcc uses, e.g. `"compute_90a"`.
    pub fn compute(&self) -> String {
        format!(
            "compute_{}{}{}",
            self.major,
            self.minor,
            self.suffix.as_str()
        )
    }

    /// Whether this entry's cubin (SASS) runs on a device of compute capability
    /// `device`: same major and a minor no later than the device's, and for an
    /// `a` entry exactly the device's compute capability.
    pub fn sass_runs_on(&self, device: (u32, u32)) -> bool {
        let (major, minor) = device;
        match self.suffix {
            ArchSuffix::None | ArchSuffix::F => self.major == major && self.minor <= minor,
            ArchSuffix::A => self.cc() == device,
        }
    }

    /// Whether code built for this entry has what a module whose minimum arch is `min` uses: a
    /// compute capability at or above `min`'s and, when `min` is arch-specific (`9.0a`: wgmma),
    /// exactly that arch with its `a` suffix. The `+PTX` flags play no part.
    ///
    /// ```
    /// use attention::arch::ArchSpec;
    ///
    /// let (a, plain): (ArchSpec, ArchSpec) = ("9.0a".parse().unwrap(), "9.0".parse().unwrap());
    /// assert!(a.provides(&ArchSpec::new(8, 0)) && plain.provides(&ArchSpec::new(8, 0)));
    /// assert!(a.provides(&a) && !plain.provides(&a));
    /// assert!(!"10.0".parse::<ArchSpec>().unwrap().provides(&a));
    /// ```
    pub fn provides(&self, min: &ArchSpec) -> bool {
        match min.suffix {
            ArchSuffix::A => self.suffix == ArchSuffix::A && self.cc() == min.cc(),
            ArchSuffix::F => self.suffix != ArchSuffix::None && self.major == min.major && self.minor >= min.minor,
            ArchSuffix::None => self.cc() >= min.cc(),
        }
    }

    /// Whether this entry's PTX (if it has any, see [`ArchSpec::ptx`]) can be
    /// JIT-compiled by the driver for a device of compute capability `device`:
    /// plain PTX for any device of equal or later compute capability, `f` PTX
    /// within the same major, `a` PTX only for exactly the same one.
    pub fn ptx_runs_on(&self, device: (u32, u32)) -> bool {
        if !self.ptx {
            return false;
        }
        match self.suffix {
            ArchSuffix::None => self.cc() <= device,
            ArchSuffix::F => self.major == device.0 && self.minor <= device.1,
            ArchSuffix::A => self.cc() == device,
        }
    }
}

impl fmt::Display for ArchSpec {
    /// Formats as the parser accepts it: `"8.6"`, `"9.0a"`, `"12.0+PTX"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}{}", self.major, self.minor, self.suffix.as_str())?;
        if self.ptx {
            f.write_str("+PTX")?;
        }
        Ok(())
    }
}

impl FromStr for ArchSpec {
    type Err = ArchListError;

    /// Parses one entry; see [`parse_arch_list`] for the syntax.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_entry(s.trim()).ok_or_else(|| ArchListError::InvalidEntry {
            entry: s.trim().to_string(),
            list: s.to_string(),
        })
    }
}

/// Why an arch list did not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArchListError {
    /// The list has no entries (only separators or whitespace).
    Empty {
        /// The list as given.
        list: String,
    },
    /// One entry is not of the form `MAJOR.MINOR[a|f][+PTX]`.
    InvalidEntry {
        /// The offending entry.
        entry: String,
        /// The whole list as given.
        list: String,
    },
}

const ACCEPTED: &str =
    "expected MAJOR.MINOR with an optional a/f suffix and optional +PTX, e.g. \"8.6\", \"9.0a\", \"12.0+PTX\"";

impl fmt::Display for ArchListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArchListError::Empty { list } => {
                write!(
                    f,
                    "arch list {list:?} has no entries: {ACCEPTED}, separated by ';' or spaces"
                )
            }
            ArchListError::InvalidEntry { entry, list } => {
                write!(
                    f,
                    "invalid entry {entry:?} in arch list {list:?}: {ACCEPTED}"
                )?;
                let lower = entry.to_ascii_lowercase();
                if lower.starts_with("sm_") || lower.starts_with("compute_") {
                    let digits: String = lower.chars().filter(|c| c.is_ascii_digit()).collect();
                    if digits.len() >= 2 {
                        let (maj, min) = digits.split_at(digits.len() - 1);
                        write!(f, " (write \"{maj}.{min}\", not nvcc's \"{entry}\")")?;
                    }
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ArchListError {}

/// Parses one trimmed entry, or `None` when it is malformed.
fn parse_entry(entry: &str) -> Option<ArchSpec> {
    // "+PTX" is accepted in any case ("+ptx" too): it is unambiguous, and
    // hand-written lists get it wrong often enough.
    let (body, ptx) = match entry.len().checked_sub(4) {
        Some(cut) if entry.is_char_boundary(cut) && entry[cut..].eq_ignore_ascii_case("+PTX") => {
            (&entry[..cut], true)
        }
        _ => (entry, false),
    };
    let (major, rest) = body.split_once('.')?;
    // The suffix letter is accepted in either case too ("9.0A" == "9.0a").
    let (minor, suffix) = match rest.as_bytes().last()? {
        b'a' | b'A' => (&rest[..rest.len() - 1], ArchSuffix::A),
        b'f' | b'F' => (&rest[..rest.len() - 1], ArchSuffix::F),
        _ => (rest, ArchSuffix::None),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    // Minor versions are one digit (sm_86, sm_121): "8.10" would be ambiguous.
    if !all_digits(major) || major.len() > 3 || minor.len() != 1 || !all_digits(minor) {
        return None;
    }
    let major: u32 = major.parse().ok()?;
    if major == 0 {
        return None;
    }
    let minor: u32 = minor.parse().ok()?;
    Some(ArchSpec {
        major,
        minor,
        suffix,
        ptx,
    })
}

/// Parses a PyTorch-style arch list such as `"7.5;8.0;8.6;9.0a;12.0+PTX"`.
///
/// * Entries are separated by `;` and/or whitespace (as `TORCH_CUDA_ARCH_LIST`
///   allows); empty entries are ignored.
/// * Each entry is `MAJOR.MINOR`, optionally followed by `a` (arch-specific) or
///   `f` (family-specific), optionally followed by `+PTX`. The suffix letter
///   and `+PTX` are case-insensitive (`9.0A+ptx` is `9.0a+PTX`); the minor
///   version is a single digit. nvcc spellings (`sm_80`), bare majors (`8`)
///   and PyTorch's arch names (`Ampere`) are rejected.
/// * Duplicates are merged (an entry gets `+PTX` if any duplicate had it) and
///   the result is sorted by compute capability.
/// * A list with no entries is an error.
///
/// ```
/// use attention::arch::{format_arch_list, parse_arch_list};
///
/// let list = parse_arch_list(" 9.0 8.6;8.6+PTX;; 10.0f ").unwrap();
/// assert_eq!(format_arch_list(&list), "8.6+PTX;9.0;10.0f");
///
/// let err = parse_arch_list("8.0;8.x").unwrap_err();
/// assert!(err.to_string().starts_with(r#"invalid entry "8.x" in arch list "8.0;8.x""#));
/// ```
pub fn parse_arch_list(s: &str) -> Result<Vec<ArchSpec>, ArchListError> {
    let mut specs: Vec<ArchSpec> = Vec::new();
    for entry in s
        .split(|c: char| c == ';' || c.is_whitespace())
        .filter(|e| !e.is_empty())
    {
        let spec = parse_entry(entry).ok_or_else(|| ArchListError::InvalidEntry {
            entry: entry.to_string(),
            list: s.to_string(),
        })?;
        match specs
            .iter_mut()
            .find(|o| (o.major, o.minor, o.suffix) == (spec.major, spec.minor, spec.suffix))
        {
            Some(existing) => existing.ptx |= spec.ptx,
            None => specs.push(spec),
        }
    }
    if specs.is_empty() {
        return Err(ArchListError::Empty {
            list: s.to_string(),
        });
    }
    specs.sort();
    Ok(specs)
}

/// Formats specs as a normalised arch list, `"7.5;8.0;...;12.0+PTX"`, which
/// [`parse_arch_list`] reads back unchanged.
///
/// ```
/// use attention::arch::{format_arch_list, parse_arch_list, DEFAULT_ARCH_LIST};
///
/// let list = parse_arch_list(DEFAULT_ARCH_LIST).unwrap();
/// assert_eq!(format_arch_list(&list), DEFAULT_ARCH_LIST);
/// ```
pub fn format_arch_list(specs: &[ArchSpec]) -> String {
    specs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(";")
}

/// What a device can run from a set of images built for an arch list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImageMatch {
    /// A native cubin for this entry runs as is (see [`ArchSpec::sass_runs_on`]).
    Sass(ArchSpec),
    /// No cubin runs, but the driver can JIT-compile this entry's PTX (see
    /// [`ArchSpec::ptx_runs_on`]); the first load is slower.
    Ptx(ArchSpec),
    /// Nothing built runs on the device: the kernels must be compiled for it
    /// (NVRTC), or the device is unsupported.
    None,
}

/// What a device of compute capability `device = (major, minor)` can run from
/// images built for `built`.
///
/// A cubin is preferred over PTX: the runnable cubin of the highest minor (for
/// equal minors, `a` over `f` over plain). Without one, the PTX of the highest
/// compute capability that the device can JIT-compile. This mirrors how the
/// driver picks an image from a fatbin.
///
/// ```
/// use attention::arch::{best_image, parse_arch_list, ImageMatch, DEFAULT_ARCH_LIST};
///
/// let built = parse_arch_list(DEFAULT_ARCH_LIST).unwrap();
/// let sm86 = "8.6".parse().unwrap();
/// assert_eq!(best_image(&built, (8, 7)), ImageMatch::Sass(sm86));
/// assert_eq!(best_image(&built, (6, 1)), ImageMatch::None);
/// ```
pub fn best_image(built: &[ArchSpec], device: (u32, u32)) -> ImageMatch {
    let rank = |s: &&ArchSpec| (s.major, s.minor, s.suffix.specificity());
    if let Some(s) = built
        .iter()
        .filter(|s| s.sass_runs_on(device))
        .max_by_key(rank)
    {
        return ImageMatch::Sass(*s);
    }
    match built
        .iter()
        .filter(|s| s.ptx_runs_on(device))
        .max_by_key(rank)
    {
        Some(s) => ImageMatch::Ptx(*s),
        None => ImageMatch::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> ArchSpec {
        s.parse().unwrap()
    }

    #[test]
    fn parses_valid_lists() {
        let l = parse_arch_list("8.0;8.6;9.0+PTX").unwrap();
        assert_eq!(
            l,
            vec![
                ArchSpec::new(8, 0),
                ArchSpec::new(8, 6),
                ArchSpec {
                    major: 9,
                    minor: 0,
                    suffix: ArchSuffix::None,
                    ptx: true
                },
            ]
        );
        assert_eq!(
            parse_arch_list(" 7.5 8.0 ").unwrap(),
            vec![ArchSpec::new(7, 5), ArchSpec::new(8, 0)]
        );
        assert_eq!(parse_arch_list("7.5\t8.0\n").unwrap().len(), 2);
        assert_eq!(
            parse_arch_list("9.0a").unwrap(),
            vec![ArchSpec {
                major: 9,
                minor: 0,
                suffix: ArchSuffix::A,
                ptx: false
            }]
        );
        assert_eq!(
            parse_arch_list("10.0f").unwrap(),
            vec![ArchSpec {
                major: 10,
                minor: 0,
                suffix: ArchSuffix::F,
                ptx: false
            }]
        );
        assert_eq!(parse_arch_list("12.1a+PTX").unwrap()[0].sm(), "sm_121a");
        // Case-insensitive +PTX and suffix letters.
        assert_eq!(
            parse_arch_list("9.0+ptx").unwrap(),
            parse_arch_list("9.0+PTX").unwrap()
        );
        assert_eq!(
            parse_arch_list("9.0A+Ptx").unwrap(),
            parse_arch_list("9.0a+PTX").unwrap()
        );
        // Empty entries, duplicates merged with PTX OR-ed, sorted.
        let l = parse_arch_list(";;12.0;8.6 ; 12.0+PTX;8.6;9.0a;9.0").unwrap();
        assert_eq!(format_arch_list(&l), "8.6;9.0;9.0a;12.0+PTX");
    }

    #[test]
    fn rejects_invalid_lists() {
        for bad in ["", "  ", ";", " ; ;"] {
            assert!(
                matches!(parse_arch_list(bad), Err(ArchListError::Empty { .. })),
                "{bad:?}"
            );
        }
        for (list, entry) in [
            ("8", "8"),
            ("8.x", "8.x"),
            ("8.0;8.x", "8.x"),
            ("sm_80", "sm_80"),
            ("compute_90a", "compute_90a"),
            ("8.0+", "8.0+"),
            ("8.0PTX", "8.0PTX"),
            ("8.0+SASS", "8.0+SASS"),
            ("8.10", "8.10"),
            (".5", ".5"),
            ("8.", "8."),
            ("0.5", "0.5"),
            ("9.0b", "9.0b"),
            ("9.0aa", "9.0aa"),
            ("+8.0", "+8.0"),
            ("-8.0", "-8.0"),
            ("Ampere", "Ampere"),
            ("8,0", "8,0"),
            ("8.0,8.6", "8.0,8.6"),
            ("8.0+PTX+PTX", "8.0+PTX+PTX"),
            ("9.0ä", "9.0ä"),
        ] {
            match parse_arch_list(list) {
                Err(ArchListError::InvalidEntry { entry: e, list: l }) => {
                    assert_eq!((e.as_str(), l.as_str()), (entry, list));
                }
                other => panic!("{list:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn error_messages() {
        let e = parse_arch_list("8.0;8.x").unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"invalid entry "8.x" in arch list "8.0;8.x": expected MAJOR.MINOR with an optional a/f suffix and optional +PTX, e.g. "8.6", "9.0a", "12.0+PTX""#
        );
        let e = parse_arch_list("sm_80").unwrap_err().to_string();
        assert!(e.ends_with(r#"(write "8.0", not nvcc's "sm_80")"#), "{e}");
        let e = parse_arch_list("compute_120").unwrap_err().to_string();
        assert!(
            e.ends_with(r#"(write "12.0", not nvcc's "compute_120")"#),
            "{e}"
        );
        let e = parse_arch_list(" ").unwrap_err().to_string();
        assert!(e.starts_with(r#"arch list " " has no entries"#), "{e}");
    }

    #[test]
    fn round_trips() {
        for list in [
            DEFAULT_ARCH_LIST,
            "9.0a",
            "10.0f+PTX",
            "7.5+PTX;8.0;9.0a+PTX;10.0f;10.3a;12.1f+PTX",
        ] {
            let parsed = parse_arch_list(list).unwrap();
            assert_eq!(format_arch_list(&parsed), list);
            assert_eq!(parse_arch_list(&format_arch_list(&parsed)).unwrap(), parsed);
            for s in &parsed {
                assert_eq!(&s.to_string().parse::<ArchSpec>().unwrap(), s);
            }
        }
    }

    #[test]
    fn nvcc_names() {
        assert_eq!(spec("7.5").sm(), "sm_75");
        assert_eq!(spec("12.0+PTX").compute(), "compute_120");
        assert_eq!(spec("9.0a").sm(), "sm_90a");
        assert_eq!(spec("10.0f").compute(), "compute_100f");
        assert!("8.x".parse::<ArchSpec>().is_err());
    }

    #[test]
    fn best_image_default_list() {
        let built = parse_arch_list(DEFAULT_ARCH_LIST).unwrap();
        let sass = |s| ImageMatch::Sass(spec(s));
        assert_eq!(best_image(&built, (7, 5)), sass("7.5"));
        assert_eq!(best_image(&built, (8, 0)), sass("8.0"));
        assert_eq!(best_image(&built, (8, 6)), sass("8.6"));
        assert_eq!(best_image(&built, (8, 7)), sass("8.6"));
        assert_eq!(best_image(&built, (8, 9)), sass("8.9"));
        assert_eq!(best_image(&built, (9, 0)), sass("9.0a"));
        assert_eq!(best_image(&built, (10, 0)), sass("10.0"));
        assert_eq!(best_image(&built, (10, 3)), sass("10.0"));
        assert_eq!(best_image(&built, (12, 0)), sass("12.0+PTX"));
        assert_eq!(best_image(&built, (12, 1)), sass("12.0+PTX"));
        // A future major only has the 12.0 PTX.
        assert_eq!(
            best_image(&built, (13, 0)),
            ImageMatch::Ptx(spec("12.0+PTX"))
        );
        // 11.0 (Thor) sits between 10.0 and 12.0: no cubin, and 12.0 PTX is too new.
        assert_eq!(best_image(&built, (11, 0)), ImageMatch::None);
        assert_eq!(best_image(&built, (6, 0)), ImageMatch::None);
        assert_eq!(best_image(&built, (7, 0)), ImageMatch::None);
    }

    #[test]
    fn best_image_suffixes() {
        let a = parse_arch_list("9.0a").unwrap();
        assert_eq!(best_image(&a, (9, 0)), ImageMatch::Sass(spec("9.0a")));
        assert_eq!(best_image(&a, (10, 0)), ImageMatch::None);
        let a_ptx = parse_arch_list("9.0a+PTX").unwrap();
        assert_eq!(
            best_image(&a_ptx, (9, 0)),
            ImageMatch::Sass(spec("9.0a+PTX"))
        );
        assert_eq!(
            best_image(&a_ptx, (10, 0)),
            ImageMatch::None,
            "arch-specific PTX is not portable"
        );
        // 10.0a does not run on 10.3; 10.0f does, and its PTX stays in the family.
        let af = parse_arch_list("10.0a;10.0f+PTX").unwrap();
        assert_eq!(best_image(&af, (10, 0)), ImageMatch::Sass(spec("10.0a")));
        assert_eq!(
            best_image(&af, (10, 3)),
            ImageMatch::Sass(spec("10.0f+PTX"))
        );
        assert_eq!(best_image(&af, (12, 0)), ImageMatch::None);
        let f_only = parse_arch_list("10.3f+PTX").unwrap();
        assert_eq!(best_image(&f_only, (10, 0)), ImageMatch::None);
        // Plain and arch-specific cubins of the same cc: the specific one wins.
        let both = parse_arch_list("9.0;9.0a").unwrap();
        assert_eq!(best_image(&both, (9, 0)), ImageMatch::Sass(spec("9.0a")));
        // SASS beats newer PTX; the highest runnable PTX wins among PTX.
        let mix = parse_arch_list("8.0;8.6+PTX;7.5+PTX").unwrap();
        assert_eq!(best_image(&mix, (8, 9)), ImageMatch::Sass(spec("8.6+PTX")));
        assert_eq!(best_image(&mix, (9, 0)), ImageMatch::Ptx(spec("8.6+PTX")));
        assert_eq!(best_image(&mix, (7, 5)), ImageMatch::Sass(spec("7.5+PTX")));
        assert_eq!(best_image(&[], (9, 0)), ImageMatch::None);
    }
}
