//! Metadata filters, in a grammar close to Mem0's.
//!
//! A filter is a JSON object:
//!
//! | form | meaning |
//! |---|---|
//! | `{"field": value}` | field equals value |
//! | `{"field": {"op": value, ...}}` | every operator holds; ops: `eq ne in nin gt gte lt lte contains` |
//! | `{"and": [f, ...]}`, `{"or": [f, ...]}`, `{"not": f}` | boolean combinations |
//! | several keys in one object | all must hold |
//!
//! Operators may also be spelled with a `$` prefix (`$eq`, `$and`...).
//! A field may be a dotted path into nested objects (`"place.city"`).
//! A missing field satisfies only `ne` and `nin`. `gt`/`gte`/`lt`/`lte`
//! compare numbers with numbers and strings with strings, and are false
//! otherwise. `contains` is substring for strings and membership for arrays.
//! Numbers compare by value (`1 == 1.0`).

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::cmp::Ordering;

#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    All(Vec<Filter>),
    Any(Vec<Filter>),
    Not(Box<Filter>),
    Cmp {
        path: Vec<String>,
        op: Op,
        value: Value,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    In,
    Nin,
    Gt,
    Gte,
    Lt,
    Lte,
    Contains,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(format!("bad filter: {}", msg.into()))
}

fn strip(k: &str) -> &str {
    k.strip_prefix('$').unwrap_or(k)
}

impl Filter {
    /// Parse a filter from its JSON form.
    pub fn parse(v: &Value) -> Result<Filter> {
        let obj = v
            .as_object()
            .ok_or_else(|| bad("a filter must be a JSON object"))?;
        let mut parts = Vec::with_capacity(obj.len());
        for (k, val) in obj {
            parts.push(match strip(k).to_ascii_lowercase().as_str() {
                "and" | "or" => {
                    let list = val
                        .as_array()
                        .ok_or_else(|| bad(format!("{k} takes a list of filters")))?;
                    let fs = list.iter().map(Filter::parse).collect::<Result<Vec<_>>>()?;
                    if strip(k).eq_ignore_ascii_case("and") {
                        Filter::All(fs)
                    } else {
                        Filter::Any(fs)
                    }
                }
                "not" => Filter::Not(Box::new(Filter::parse(val)?)),
                _ => Self::parse_field(k, val)?,
            });
        }
        Ok(if parts.len() == 1 {
            parts.pop().unwrap()
        } else {
            Filter::All(parts)
        })
    }

    fn parse_field(field: &str, val: &Value) -> Result<Filter> {
        if field.is_empty() {
            return Err(bad("empty field name"));
        }
        let path: Vec<String> = field.split('.').map(str::to_owned).collect();
        let ops: Option<&Map<String, Value>> = val
            .as_object()
            .filter(|m| !m.is_empty() && m.keys().all(|k| parse_op(k).is_some()));
        let Some(ops) = ops else {
            return Ok(Filter::Cmp {
                path,
                op: Op::Eq,
                value: val.clone(),
            });
        };
        let mut parts = Vec::new();
        for (k, v) in ops {
            let op = parse_op(k).unwrap();
            if matches!(op, Op::In | Op::Nin) && !v.is_array() {
                return Err(bad(format!("{field}: {k} takes a list")));
            }
            parts.push(Filter::Cmp {
                path: path.clone(),
                op,
                value: v.clone(),
            });
        }
        Ok(if parts.len() == 1 {
            parts.pop().unwrap()
        } else {
            Filter::All(parts)
        })
    }

    /// Whether a record with this metadata (a JSON object or nothing) matches.
    pub fn matches(&self, metadata: Option<&Value>) -> bool {
        match self {
            Filter::All(fs) => fs.iter().all(|f| f.matches(metadata)),
            Filter::Any(fs) => fs.iter().any(|f| f.matches(metadata)),
            Filter::Not(f) => !f.matches(metadata),
            Filter::Cmp { path, op, value } => {
                let mut cur = metadata;
                for p in path {
                    cur = cur.and_then(|v| v.as_object()).and_then(|o| o.get(p));
                }
                match cur {
                    None => matches!(op, Op::Ne | Op::Nin),
                    Some(have) => apply(*op, have, value),
                }
            }
        }
    }
}

fn parse_op(k: &str) -> Option<Op> {
    Some(match strip(k) {
        "eq" => Op::Eq,
        "ne" => Op::Ne,
        "in" => Op::In,
        "nin" => Op::Nin,
        "gt" => Op::Gt,
        "gte" => Op::Gte,
        "lt" => Op::Lt,
        "lte" => Op::Lte,
        "contains" => Op::Contains,
        _ => return None,
    })
}

/// JSON equality with numbers compared by value.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

fn order(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

fn apply(op: Op, have: &Value, want: &Value) -> bool {
    match op {
        Op::Eq => json_eq(have, want),
        Op::Ne => !json_eq(have, want),
        Op::In => want
            .as_array()
            .is_some_and(|l| l.iter().any(|w| json_eq(have, w))),
        Op::Nin => !want
            .as_array()
            .is_some_and(|l| l.iter().any(|w| json_eq(have, w))),
        Op::Gt => order(have, want) == Some(Ordering::Greater),
        Op::Gte => matches!(order(have, want), Some(Ordering::Greater | Ordering::Equal)),
        Op::Lt => order(have, want) == Some(Ordering::Less),
        Op::Lte => matches!(order(have, want), Some(Ordering::Less | Ordering::Equal)),
        Op::Contains => match (have, want) {
            (Value::String(h), Value::String(w)) => h.contains(w.as_str()),
            (Value::Array(h), w) => h.iter().any(|x| json_eq(x, w)),
            _ => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(f: Value, meta: Value) -> bool {
        Filter::parse(&f).unwrap().matches(Some(&meta))
    }

    #[test]
    fn grammar() {
        let meta = json!({"k": 3, "s": "hello", "tags": ["a", "b"], "p": {"city": "Oslo"}});
        assert!(m(json!({"k": 3}), meta.clone()));
        assert!(m(json!({"k": 3.0}), meta.clone()));
        assert!(!m(json!({"k": {"ne": 3}}), meta.clone()));
        assert!(m(json!({"k": {"gte": 3, "lt": 4}}), meta.clone()));
        assert!(m(json!({"k": {"$in": [1, 3]}}), meta.clone()));
        assert!(m(json!({"k": {"nin": [1, 2]}}), meta.clone()));
        assert!(m(json!({"s": {"contains": "ell"}}), meta.clone()));
        assert!(m(json!({"tags": {"contains": "b"}}), meta.clone()));
        assert!(m(json!({"p.city": "Oslo"}), meta.clone()));
        assert!(m(json!({"or": [{"k": 1}, {"s": "hello"}]}), meta.clone()));
        assert!(!m(json!({"and": [{"k": 1}, {"s": "hello"}]}), meta.clone()));
        assert!(m(json!({"not": {"k": 1}}), meta.clone()));
        assert!(m(json!({"missing": {"ne": 1}}), meta.clone()));
        assert!(!m(json!({"missing": 1}), meta.clone()));
        assert!(!m(json!({"s": {"gt": 1}}), meta.clone()));
        assert!(!Filter::parse(&json!({"k": 1})).unwrap().matches(None));
    }

    #[test]
    fn malformed_filters_are_errors() {
        assert!(Filter::parse(&json!([1])).is_err());
        assert!(Filter::parse(&json!({"and": 3})).is_err());
        assert!(Filter::parse(&json!({"k": {"in": 3}})).is_err());
        assert!(Filter::parse(&json!({"": 3})).is_err());
    }
}
