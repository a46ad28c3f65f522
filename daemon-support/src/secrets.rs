//! `${file:PATH}` and `${env:VAR}` references: how secrets (Kafka passwords, key passwords)
//! stay out of configuration files. A value that is exactly such a reference is replaced at
//! start-up by the file's content (trailing newline dropped) or the variable's value.

use std::collections::BTreeMap;

/// Whether `value` is a `${file:…}` or `${env:…}` reference.
pub fn is_ref(value: &str) -> bool {
    (value.starts_with("${file:") || value.starts_with("${env:")) && value.ends_with('}')
}

/// The value a `${file:PATH}` or `${env:VAR}` reference stands for, variables read through
/// `env`; `None` for a plain value. The error names the file or variable.
pub fn resolve(
    value: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<String>, String> {
    if !is_ref(value) {
        return Ok(None);
    }
    let inner = &value[2..value.len() - 1];
    if let Some(path) = inner.strip_prefix("file:") {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        let text = text.trim_end_matches(['\n', '\r']);
        if text.is_empty() {
            return Err(format!("{path} is empty"));
        }
        return Ok(Some(text.to_owned()));
    }
    let var = inner.strip_prefix("env:").unwrap_or_default();
    env(var)
        .filter(|v| !v.is_empty())
        .map(Some)
        .ok_or_else(|| format!("environment variable `{var}` is not set or empty"))
}

/// Resolves every reference among `props`' values in place. On failure, the property name
/// and why.
pub fn resolve_all(
    props: &mut BTreeMap<String, String>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), (String, String)> {
    for (prop, value) in props.iter_mut() {
        if let Some(resolved) = resolve(value, env).map_err(|reason| (prop.clone(), reason))? {
            *value = resolved;
        }
    }
    Ok(())
}

/// The first property whose value is still a reference (configuration validated before
/// [`resolve_all`] ran).
pub fn first_unresolved(props: &BTreeMap<String, String>) -> Option<&str> {
    props
        .iter()
        .find(|(_, v)| is_ref(v))
        .map(|(k, _)| k.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_resolve_from_files_and_env() {
        let dir = std::env::temp_dir().join(format!("chaperone-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "pa55\n").unwrap();
        let env = |k: &str| (k == "PW").then(|| "env-pw".to_owned());
        let file_ref = format!("${{file:{}}}", file.display());
        assert_eq!(resolve(&file_ref, &env), Ok(Some("pa55".to_owned())));
        assert_eq!(resolve("${env:PW}", &env), Ok(Some("env-pw".to_owned())));
        assert_eq!(resolve("plain", &env), Ok(None));
        assert!(resolve("${env:NOPE}", &env).unwrap_err().contains("NOPE"));
        let mut props: BTreeMap<String, String> = [
            ("a".to_owned(), file_ref.clone()),
            ("b".to_owned(), "${file:/nonexistent/x}".to_owned()),
        ]
        .into();
        assert_eq!(first_unresolved(&props), Some("a"));
        let (prop, reason) = resolve_all(&mut props, &env).unwrap_err();
        assert_eq!(prop, "b");
        assert!(reason.contains("/nonexistent/x"), "{reason}");
        std::fs::remove_dir_all(dir).ok();
    }
}
