//! The one parser for boolean variables (`ATTN_STRICT`, `ATTN_REQUIRE_NVCC`, ...), shared by the
//! run-time settings and the build script (which `#[path]`-includes this file), so that a value
//! means the same thing at build time and at run time.

/// The accepted spellings, for error messages.
pub(crate) const FLAG_FORMS: &str = "1 or 0 (also true/false, yes/no, on/off)";

/// Parses a boolean flag: `1`/`true`/`yes`/`on` or `0`/`false`/`no`/`off`, in any case and
/// ignoring surrounding whitespace. `None` for anything else, the empty string included (callers
/// treat an empty variable as unset before asking).
pub(crate) fn parse_flag(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_flag_accepts_the_listed_spellings_in_any_case() {
        for v in [
            "1", "true", "yes", "on", "TRUE", "Yes", "oN", " true ", "\ton\n",
        ] {
            assert_eq!(parse_flag(v), Some(true), "{v:?}");
        }
        for v in ["0", "false", "no", "off", "FALSE", "No", "OFF", " 0 "] {
            assert_eq!(parse_flag(v), Some(false), "{v:?}");
        }
    }

    #[test]
    fn parse_flag_refuses_everything_else() {
        for v in [
            "",
            " ",
            "maybe",
            "2",
            "-1",
            "00",
            "01",
            "t",
            "f",
            "y",
            "n",
            "enable",
            "disabled",
            "true1",
            "yes please",
            "o n",
            "１",
        ] {
            assert_eq!(parse_flag(v), None, "{v:?}");
        }
    }

    #[test]
    fn flag_forms_lists_every_accepted_spelling() {
        for v in ["1", "0", "true", "false", "yes", "no", "on", "off"] {
            assert!(FLAG_FORMS.contains(v), "{v}");
            assert!(parse_flag(v).is_some(), "{v}");
        }
    }
}
