//! One rule for every text field that enters the system, whatever the entry
//! point (HTTP body, query string, queue message, CLI through HTTP): it may
//! not contain NUL. Postgres `text` cannot hold the character, so a NUL
//! that got through would fail deep inside a statement instead of being
//! refused at the door with the field's name.

use serde_json::Value;

/// Where in `value` the first string holding NUL is: a dotted path of
/// object keys and `[index]`es (`env.HOME`, `tags[2]`), with ` (a key)`
/// when an object key itself holds it. `None` when there is none.
pub fn nul_path(value: &Value) -> Option<String> {
    fn walk(v: &Value, path: &mut String) -> Option<String> {
        match v {
            Value::String(s) if s.contains('\0') => Some(shown(path)),
            Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                let found = walk(item, path);
                path.truncate(len);
                found
            }),
            Value::Object(map) => map.iter().find_map(|(k, item)| {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&k.replace('\0', "\\u0000"));
                let found = if k.contains('\0') {
                    Some(format!("{} (a key)", shown(path)))
                } else {
                    walk(item, path)
                };
                path.truncate(len);
                found
            }),
            _ => None,
        }
    }
    fn shown(path: &str) -> String {
        if path.is_empty() {
            "the body".to_owned()
        } else {
            path.to_owned()
        }
    }
    walk(value, &mut String::new())
}

/// Whether JSON text may hold NUL in a string: only through the escape
/// `\u0000` (a raw NUL byte is not valid JSON). A cheap test that lets the
/// usual body skip the walk of [`nul_path`].
pub fn may_hold_nul(json: &[u8]) -> bool {
    json.windows(6).any(|w| w.eq_ignore_ascii_case(b"\\u0000"))
}

/// The refusal for a NUL at `path`.
pub fn nul_refusal(path: &str) -> String {
    format!("{path} contains a NUL character (\\u0000), which no text field can hold")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_nul_in_values_keys_and_arrays_by_path() {
        assert_eq!(nul_path(&json!({"a": "ok", "b": 1})), None);
        assert_eq!(
            nul_path(&json!({"userId": "a\u{0}b"})),
            Some("userId".into())
        );
        assert_eq!(
            nul_path(&json!({"env": {"HOME": "x\u{0}"}})),
            Some("env.HOME".into())
        );
        assert_eq!(
            nul_path(&json!({"tags": ["a", "b\u{0}"]})),
            Some("tags[1]".into())
        );
        assert_eq!(
            nul_path(&json!({"parameters": {"k\u{0}": "v"}})),
            Some("parameters.k\\u0000 (a key)".into())
        );
        assert_eq!(nul_path(&json!("\u{0}")), Some("the body".into()));
    }

    #[test]
    fn the_cheap_test_sees_every_escape_spelling() {
        assert!(may_hold_nul(br#"{"a":"\u0000"}"#));
        assert!(may_hold_nul(br#"{"a":"\U0000"}"#));
        assert!(!may_hold_nul(br#"{"a":"\u0001"}"#));
    }
}
