//! One place for how edgevlm reads TOML (package manifests, the agent config, board profiles):
//! serde's errors become [`FieldError`]s that name the dotted field and the line, so every
//! crate reports `file: field `a.b`: what was expected` the same way.
#![warn(missing_docs)]

use serde::de::DeserializeOwned;

/// A field that is missing, unknown, mistyped or out of range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `input.mean` (`.` for the whole file).
    pub field: String,
    /// What was expected, with ` (line N)` where the position is known.
    pub message: String,
}

/// Deserializes TOML text into `T`.
pub fn parse_toml<T: DeserializeOwned>(text: &str) -> Result<T, FieldError> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let parent = e.path().to_string();
        let inner = e.inner();
        let message = inner.message().to_string();
        let line = inner
            .span()
            .map(|s| 1 + text[..s.start.min(text.len())].matches('\n').count());
        let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
        let quoted = |msg: &str| msg.split('`').nth(1).map(str::to_string);
        if let Some(missing) = message.strip_prefix("missing field ").and_then(quoted) {
            // serde reports a missing field at its parent table: name the field itself.
            let field = if parent == "." {
                missing
            } else {
                format!("{parent}.{missing}")
            };
            return FieldError {
                field,
                message: format!("required field is missing{at}"),
            };
        }
        if let Some(unknown) = message.strip_prefix("unknown field ").and_then(quoted) {
            // serde_path_to_error's path already ends at the unknown key.
            let field = if parent == "." { unknown } else { parent };
            let expected = message
                .split_once(", expected ")
                .map(|(_, x)| x)
                .unwrap_or("");
            return FieldError {
                field,
                message: format!("unknown field{at}; expected {expected}"),
            };
        }
        FieldError {
            field: parent,
            message: format!("{message}{at}"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        a: Inner,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        n: u32,
    }

    #[test]
    fn names_missing_unknown_and_mistyped_fields() {
        let e = parse_toml::<Doc>("[a]\n").unwrap_err();
        assert_eq!(e.field, "a.n");
        assert!(e.message.starts_with("required field is missing"), "{e:?}");
        let e = parse_toml::<Doc>("[a]\nn = 1\nm = 2\n").unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("a.m", "unknown field (line 3); expected `n`")
        );
        let e = parse_toml::<Doc>("[a]\nn = \"x\"\n").unwrap_err();
        assert_eq!(e.field, "a.n");
        assert!(
            e.message
                .starts_with("invalid type: string \"x\", expected u32 (line 2)"),
            "{e:?}"
        );
    }
}
