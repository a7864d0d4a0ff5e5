//! Task parameters and chains (README, "Chains and parameters"): the
//! declared parameters of a task (`tasks.parameters`), the values a run
//! supplies, and the `after` edges of a chain (`tasks.after`). Pure
//! checks; the store fires the downstream runs (`store/chain.rs`).
//!
//! `parameters` is a JSON object, name → definition:
//! `{"region": {"type": "enum", "values": ["eu", "us"], "default": "eu",
//! "required": false, "description": "..."}}`. A run receives each value as
//! the environment variable `TASKHOST_PARAM_<NAME in upper case>`; values
//! are never put into the command text.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::model::FieldError;

/// Most parameters of one task.
pub const MAX_PARAMETERS: usize = 32;
/// Longest parameter name.
pub const MAX_NAME: usize = 64;
/// Longest value, bytes.
pub const MAX_VALUE: usize = 4096;
/// Most upstream tasks of one task.
pub const MAX_AFTER: usize = 16;
/// Prefix of the environment variables that carry parameter values.
pub const ENV_PREFIX: &str = "TASKHOST_PARAM_";

/// The type of a parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    /// Any text (no NUL, at most [`MAX_VALUE`] bytes).
    String,
    /// A 64-bit integer (a JSON number or a string that parses).
    Int,
    /// `true` or `false` (JSON or a string).
    Bool,
    /// One of `values`.
    Enum,
}

/// One declared parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParamDef {
    /// string, int, bool or enum.
    #[serde(rename = "type")]
    pub kind: ParamType,
    /// The allowed values of an enum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
    /// Used when a run gives no value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    /// A run must have a value (given, or the default).
    #[serde(default)]
    pub required: bool,
    /// For people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// The declared parameters of a task, by name.
pub type ParamDefs = BTreeMap<String, ParamDef>;

/// A parameter value that is wrong: `parameters.<name>: <message>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ParamError {
    /// `parameters.<name>` (or `after[i].parameters.<name>`).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

fn field(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

/// Whether `name` is a parameter name: `[A-Za-z_][A-Za-z0-9_]*`, at most
/// [`MAX_NAME`] characters.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The environment variable of parameter `name`.
pub fn env_name(name: &str) -> String {
    format!("{ENV_PREFIX}{}", name.to_ascii_uppercase())
}

/// Parses and checks a task's `parameters` definitions (field
/// `parameters`).
pub fn parse_defs(v: &Value) -> Result<ParamDefs, FieldError> {
    if !v.is_object() {
        return Err(field("parameters", "must be a JSON object"));
    }
    let defs: ParamDefs = serde_json::from_value(v.clone()).map_err(|e| {
        field(
            "parameters",
            format!("{e} (each is {{\"type\": \"string|int|bool|enum\", \"values\": [..], \"default\": .., \"required\": bool}})"),
        )
    })?;
    if defs.len() > MAX_PARAMETERS {
        return Err(field(
            "parameters",
            format!("at most {MAX_PARAMETERS} parameters"),
        ));
    }
    let mut upper = BTreeSet::new();
    for (name, def) in &defs {
        if !valid_name(name) {
            return Err(field(
                "parameters",
                format!(
                    "`{name}` is not a parameter name ([A-Za-z_][A-Za-z0-9_]*, at most {MAX_NAME} characters)"
                ),
            ));
        }
        if !upper.insert(name.to_ascii_uppercase()) {
            return Err(field(
                "parameters",
                format!(
                    "`{name}`: another parameter has the same name in upper case (both would be {})",
                    env_name(name)
                ),
            ));
        }
        match (&def.kind, &def.values) {
            (ParamType::Enum, None) => {
                return Err(field(
                    "parameters",
                    format!("`{name}`: an enum needs `values`"),
                ));
            }
            (ParamType::Enum, Some(values)) => {
                if values.is_empty()
                    || values
                        .iter()
                        .any(|v| v.is_empty() || v.len() > 200 || v.contains('\0'))
                {
                    return Err(field(
                        "parameters",
                        format!("`{name}`: `values` must be 1 or more texts of 1 to 200 bytes"),
                    ));
                }
            }
            (_, Some(_)) => {
                return Err(field(
                    "parameters",
                    format!("`{name}`: only an enum has `values`"),
                ));
            }
            (_, None) => {}
        }
        if def
            .description
            .as_ref()
            .is_some_and(|d| d.len() > 1000 || d.contains('\0'))
        {
            return Err(field(
                "parameters",
                format!("`{name}`: description must be at most 1000 bytes without NUL"),
            ));
        }
        if let Some(d) = &def.default {
            coerce(def, d).map_err(|m| field("parameters", format!("`{name}`: default: {m}")))?;
        }
    }
    Ok(defs)
}

/// The text of `value` for parameter `def`, or why it does not fit.
pub fn coerce(def: &ParamDef, value: &Value) -> Result<String, String> {
    let text = match (def.kind, value) {
        (ParamType::String, Value::String(s)) => s.clone(),
        (ParamType::String, _) => return Err("must be a string".into()),
        (ParamType::Int, Value::Number(n)) => match n.as_i64() {
            Some(i) => i.to_string(),
            None => return Err(format!("`{n}` is not an integer")),
        },
        (ParamType::Int, Value::String(s)) => match s.parse::<i64>() {
            Ok(i) => i.to_string(),
            Err(_) => return Err(format!("`{s}` is not an integer")),
        },
        (ParamType::Int, _) => return Err("must be an integer".into()),
        (ParamType::Bool, Value::Bool(b)) => b.to_string(),
        (ParamType::Bool, Value::String(s)) if s == "true" || s == "false" => s.clone(),
        (ParamType::Bool, Value::String(s)) => return Err(format!("`{s}` is not true or false")),
        (ParamType::Bool, _) => return Err("must be true or false".into()),
        (ParamType::Enum, Value::String(s)) => {
            let values = def.values.as_deref().unwrap_or_default();
            if values.iter().any(|v| v == s) {
                s.clone()
            } else {
                return Err(format!("`{s}` is not one of {}", values.join(", ")));
            }
        }
        (ParamType::Enum, _) => return Err("must be a string".into()),
    };
    if text.contains('\0') {
        return Err("must not contain NUL bytes".into());
    }
    if text.len() > MAX_VALUE {
        return Err(format!("must be at most {MAX_VALUE} bytes"));
    }
    Ok(text)
}

/// The values of a run: `supplied` checked against `defs` (an unknown name
/// is refused), then the defaults; a required parameter without either is
/// refused. `prefix` is the path of the values (`parameters`).
pub fn resolve(
    defs: &ParamDefs,
    supplied: &Map<String, Value>,
    prefix: &str,
) -> Result<BTreeMap<String, String>, ParamError> {
    if let Some(name) = supplied.keys().find(|n| !defs.contains_key(*n)) {
        let known: Vec<&str> = defs.keys().map(String::as_str).collect();
        return Err(ParamError {
            path: format!("{prefix}.{name}"),
            message: if known.is_empty() {
                "unknown parameter (the task declares none)".into()
            } else {
                format!("unknown parameter (the task declares {})", known.join(", "))
            },
        });
    }
    let mut out = BTreeMap::new();
    for (name, def) in defs {
        let path = || format!("{prefix}.{name}");
        let value = match supplied.get(name) {
            Some(v) => Some(coerce(def, v).map_err(|message| ParamError {
                path: path(),
                message,
            })?),
            None => match &def.default {
                Some(d) => Some(coerce(def, d).map_err(|message| ParamError {
                    path: path(),
                    message,
                })?),
                None => None,
            },
        };
        match value {
            Some(v) => {
                out.insert(name.clone(), v);
            }
            None if def.required => {
                return Err(ParamError {
                    path: path(),
                    message: "required".into(),
                });
            }
            None => {}
        }
    }
    Ok(out)
}

/// When an upstream run fires its downstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum On {
    /// The upstream run succeeded.
    Succeeded,
    /// It failed or timed out.
    Failed,
    /// It ended in any way a worker records (succeeded, failed, timed out,
    /// cancelled while running).
    Finished,
}

impl On {
    /// Whether a run that ended in `status` fires.
    pub fn matches(self, status: &str) -> bool {
        match self {
            On::Succeeded => status == "succeeded",
            On::Failed => matches!(status, "failed" | "timed_out" | "dead"),
            On::Finished => true,
        }
    }
}

/// One upstream of a task (`after`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct After {
    /// The upstream task.
    pub task_id: Uuid,
    /// Which of its run endings count (default `succeeded`).
    #[serde(default = "succeeded")]
    pub on: On,
    /// Fixed values for this task's parameters in the runs this edge fires.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub parameters: Map<String, Value>,
}

fn succeeded() -> On {
    On::Succeeded
}

/// Parses a task's `after`: one object or an array of them (field `after`);
/// `null` or `[]` means none. The fixed parameters are checked against
/// `defs`.
pub fn parse_after(v: &Value, defs: &ParamDefs) -> Result<Vec<After>, FieldError> {
    let items: Vec<Value> = match v {
        Value::Null => Vec::new(),
        Value::Array(a) => a.clone(),
        Value::Object(_) => vec![v.clone()],
        _ => {
            return Err(field(
                "after",
                "must be {\"taskId\": .., \"on\": \"succeeded|failed|finished\"} or an array of them",
            ));
        }
    };
    if items.len() > MAX_AFTER {
        return Err(field(
            "after",
            format!("at most {MAX_AFTER} upstream tasks"),
        ));
    }
    let mut out: Vec<After> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let edge: After =
            serde_json::from_value(item).map_err(|e| field("after", format!("[{i}]: {e}")))?;
        if out.iter().any(|o| o.task_id == edge.task_id) {
            return Err(field(
                "after",
                format!("[{i}].taskId: `{}` is named twice", edge.task_id),
            ));
        }
        for (name, value) in &edge.parameters {
            let Some(def) = defs.get(name) else {
                return Err(field(
                    "after",
                    format!("[{i}].parameters.{name}: unknown parameter"),
                ));
            };
            coerce(def, value)
                .map_err(|m| field("after", format!("[{i}].parameters.{name}: {m}")))?;
        }
        out.push(edge);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn defs() -> ParamDefs {
        parse_defs(&json!({
            "region": {"type": "enum", "values": ["eu", "us"], "default": "eu"},
            "count": {"type": "int", "required": true},
            "dry": {"type": "bool", "default": false},
            "note": {"type": "string"}
        }))
        .unwrap()
    }

    #[test]
    fn values_are_checked_per_type() {
        let d = defs();
        let ok = resolve(
            &d,
            json!({"count": "7", "dry": "true"}).as_object().unwrap(),
            "parameters",
        )
        .unwrap();
        assert_eq!(ok["count"], "7");
        assert_eq!(ok["region"], "eu");
        assert_eq!(ok["dry"], "true");
        assert!(!ok.contains_key("note"));
        let e = resolve(&d, &Map::new(), "parameters").unwrap_err();
        assert_eq!(e.to_string(), "parameters.count: required");
        let e = resolve(&d, json!({"count": "x"}).as_object().unwrap(), "parameters").unwrap_err();
        assert_eq!(e.path, "parameters.count");
        let e = resolve(
            &d,
            json!({"count": 1, "region": "mars"}).as_object().unwrap(),
            "parameters",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "parameters.region: `mars` is not one of eu, us"
        );
        let e = resolve(
            &d,
            json!({"count": 1, "zz": 1}).as_object().unwrap(),
            "parameters",
        )
        .unwrap_err();
        assert_eq!(e.path, "parameters.zz");
        let e = resolve(
            &d,
            json!({"count": 1, "dry": "yes"}).as_object().unwrap(),
            "parameters",
        )
        .unwrap_err();
        assert_eq!(e.path, "parameters.dry");
    }

    #[test]
    fn definitions_are_checked() {
        for bad in [
            json!({"1x": {"type": "string"}}),
            json!({"a-b": {"type": "string"}}),
            json!({"x": {"type": "float"}}),
            json!({"x": {"type": "enum"}}),
            json!({"x": {"type": "int", "default": "nope"}}),
            json!({"x": {"type": "string"}, "X": {"type": "string"}}),
            json!({"x": {"type": "string", "values": ["a"]}}),
            json!([]),
        ] {
            assert!(parse_defs(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn after_is_one_or_many() {
        let id = Uuid::now_v7();
        let one = parse_after(&json!({"taskId": id}), &defs()).unwrap();
        assert_eq!(one[0].on, On::Succeeded);
        let e = parse_after(&json!([{"taskId": id, "on": "sometimes"}]), &defs()).unwrap_err();
        assert_eq!(e.field, "after");
        let e = parse_after(
            &json!([{"taskId": id, "parameters": {"region": "mars"}}]),
            &defs(),
        )
        .unwrap_err();
        assert!(e.message.contains("[0].parameters.region"), "{e}");
        assert!(On::Failed.matches("timed_out") && !On::Failed.matches("succeeded"));
        assert!(On::Failed.matches("dead") && !On::Failed.matches("cancelled"));
    }
}
