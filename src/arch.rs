//! TEMPORARY STUB: replaced by the helper-kernels branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ArchSuffix { None, A, F }
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ArchSpec { pub major: u32, pub minor: u32, pub suffix: ArchSuffix, pub ptx: bool }
impl ArchSpec { pub fn sm(&self) -> String { format!("sm_{}{}", self.major, self.minor) } }
impl std::fmt::Display for ArchSpec { fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { write!(f, "{}.{}{}", self.major, self.minor, if self.ptx {"+PTX"} else {""}) } }
#[derive(Debug)] pub struct ArchListError(pub String);
impl std::fmt::Display for ArchListError { fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(&self.0) } }
pub fn parse_arch_list(s: &str) -> Result<Vec<ArchSpec>, ArchListError> {
    s.split(|c: char| c == ';' || c.is_whitespace()).filter(|e| !e.is_empty()).map(|e| {
        let (e, ptx) = match e.strip_suffix("+PTX") { Some(x) => (x, true), None => (e, false) };
        let (a, b) = e.split_once('.').ok_or_else(|| ArchListError(e.into()))?;
        Ok(ArchSpec { major: a.parse().map_err(|_| ArchListError(e.into()))?, minor: b.parse().map_err(|_| ArchListError(e.into()))?, suffix: ArchSuffix::None, ptx })
    }).collect()
}
pub fn format_arch_list(l: &[ArchSpec]) -> String { l.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(";") }
pub const DEFAULT_ARCH_LIST: &str = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX";
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageMatch { Sass(ArchSpec), Ptx(ArchSpec), None }
pub fn best_image(built: &[ArchSpec], d: (u32, u32)) -> ImageMatch {
    if let Some(a) = built.iter().filter(|a| a.major == d.0 && a.minor <= d.1).max() { return ImageMatch::Sass(*a) }
    if let Some(a) = built.iter().filter(|a| a.ptx && (a.major, a.minor) <= d).max() { return ImageMatch::Ptx(*a) }
    ImageMatch::None
}
