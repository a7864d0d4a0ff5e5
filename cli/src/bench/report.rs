//! Figures, the printed table and the `--json` object.

use serde_json::{Map, Value, json};

/// One figure of a run: its value beside this machine's relevant limit and
/// the target from the issue.
pub(crate) struct Figure {
    /// Key in the JSON output.
    pub(crate) key: &'static str,
    pub(crate) label: String,
    /// None when it could not be measured (shown as `-`, JSON `null`).
    pub(crate) value: Option<f64>,
    pub(crate) unit: &'static str,
    pub(crate) limit: String,
    pub(crate) target: String,
}

/// A probed machine limit.
pub(crate) struct Limit {
    pub(crate) key: &'static str,
    pub(crate) label: &'static str,
    pub(crate) value: f64,
}

/// Everything one run prints.
#[derive(Default)]
pub(crate) struct Report {
    pub(crate) scenario: String,
    pub(crate) params: Map<String, Value>,
    pub(crate) limits: Vec<Limit>,
    pub(crate) figures: Vec<Figure>,
    pub(crate) notes: Vec<String>,
}

impl Report {
    /// Adds a figure with no limit and no target.
    pub(crate) fn add(
        &mut self,
        key: &'static str,
        label: &str,
        value: Option<f64>,
        unit: &'static str,
    ) {
        self.add_full(key, label, value, unit, "", "");
    }

    /// Adds a figure with its limit and target texts.
    pub(crate) fn add_full(
        &mut self,
        key: &'static str,
        label: &str,
        value: Option<f64>,
        unit: &'static str,
        limit: impl Into<String>,
        target: impl Into<String>,
    ) {
        self.figures.push(Figure {
            key,
            label: label.to_owned(),
            value,
            unit,
            limit: limit.into(),
            target: target.into(),
        });
    }

    /// A figure's value by key, if it was added and measured.
    pub(crate) fn value(&self, key: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.key == key)
            .and_then(|f| f.value)
    }

    /// A figure's limit text by key, if it was added with one.
    pub(crate) fn limit_note(&self, key: &str) -> Option<&str> {
        self.figures
            .iter()
            .find(|f| f.key == key && !f.limit.is_empty())
            .map(|f| f.limit.as_str())
    }

    /// A probed limit by key, if probed.
    pub(crate) fn limit(&self, key: &str) -> Option<f64> {
        self.limits.iter().find(|l| l.key == key).map(|l| l.value)
    }

    /// Prints the probed limits (stdout), as soon as they are known.
    pub(crate) fn print_limits(&self) {
        outln!("machine limits (each probe ~1.5 s)");
        for l in &self.limits {
            outln!("  {:<52} {:>12}", l.label, fmt_value(Some(l.value), ""));
        }
        outln!("");
    }

    /// Prints the figures as a table.
    pub(crate) fn print_table(&self) {
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect();
        outln!("scenario {}: {}", self.scenario, params.join(" "));
        outln!(
            "{:<40} | {:>14} | {:<44} | target",
            "figure",
            "value",
            "this machine's limit"
        );
        outln!("{}", "-".repeat(120));
        for f in &self.figures {
            outln!(
                "{:<40} | {:>14} | {:<44} | {}",
                f.label,
                fmt_value(f.value, f.unit),
                f.limit,
                f.target
            );
        }
        for n in &self.notes {
            outln!("note: {n}");
        }
    }

    /// One JSON object with every figure, limit and target.
    pub(crate) fn to_json(&self) -> Value {
        let mut figures = Map::new();
        let mut targets = Map::new();
        let mut limit_notes = Map::new();
        for f in &self.figures {
            figures.insert(f.key.into(), f.value.map_or(Value::Null, |v| json!(v)));
            if !f.target.is_empty() {
                targets.insert(f.key.into(), json!(f.target));
            }
            if !f.limit.is_empty() {
                limit_notes.insert(f.key.into(), json!(f.limit));
            }
        }
        let limits: Map<String, Value> = self
            .limits
            .iter()
            .map(|l| (l.key.to_owned(), json!(l.value)))
            .collect();
        json!({
            "scenario": self.scenario,
            "params": self.params,
            "limits": limits,
            "figures": figures,
            "targets": targets,
            "limit_notes": limit_notes,
            "notes": self.notes,
        })
    }
}

fn fmt_value(v: Option<f64>, unit: &str) -> String {
    let Some(v) = v else { return "-".into() };
    let whole = v.fract() == 0.0 && v.abs() < 1e15;
    let num = if whole || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    };
    if unit.is_empty() {
        num
    } else {
        format!("{num} {unit}")
    }
}

/// The `q` quantile (nearest rank) of `v`, or None when empty.
pub(crate) fn percentile(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s.get(rank - 1).copied()
}

/// The largest value, or None when empty.
pub(crate) fn max(v: &[f64]) -> Option<f64> {
    v.iter().copied().max_by(f64::total_cmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[7.0], 0.01), Some(7.0));
    }
}
