//! Label selectors (`matchLabels` + `matchExpressions`) as NetworkPolicy uses them.
use crate::error::{Error, Result};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use std::collections::{BTreeMap, BTreeSet};

/// A validated label selector: every requirement must hold (AND). The empty selector matches
/// every label set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    reqs: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    /// The key is present with one of the values (`matchLabels` entries are `In` one value).
    In(String, BTreeSet<String>),
    /// The key is absent, or present with a value outside the set.
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    /// The selector that matches everything (`{}`).
    pub fn everything() -> Selector {
        Selector::default()
    }

    /// Validates a Kubernetes label selector. Errors (as the API server's validation would
    /// reject them): an unknown operator, `In`/`NotIn` without values, `Exists`/`DoesNotExist`
    /// with values, an empty key. `path` prefixes the message (e.g. `spec.podSelector`).
    pub fn parse(sel: &LabelSelector, path: &str) -> Result<Selector> {
        let bad = |msg: String| Error::InvalidArgument(format!("{path}: {msg}"));
        let mut reqs = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            if k.is_empty() {
                return Err(bad("matchLabels: empty key".into()));
            }
            reqs.push(Requirement::In(k.clone(), BTreeSet::from([v.clone()])));
        }
        for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
            let at = |msg: &str| bad(format!("matchExpressions[{i}] (key {:?}): {msg}", e.key));
            if e.key.is_empty() {
                return Err(at("empty key"));
            }
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            let req = match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(at(&format!("operator {} needs values", e.operator)));
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(at(&format!("operator {} takes no values", e.operator)));
                }
                "In" => Requirement::In(e.key.clone(), values),
                "NotIn" => Requirement::NotIn(e.key.clone(), values),
                "Exists" => Requirement::Exists(e.key.clone()),
                "DoesNotExist" => Requirement::DoesNotExist(e.key.clone()),
                other => {
                    return Err(at(&format!(
                        "unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)"
                    )));
                }
            };
            reqs.push(req);
        }
        Ok(Selector { reqs })
    }

    /// Whether `labels` satisfies every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.reqs.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }

    /// Whether this is the empty selector (matches everything).
    pub fn is_everything(&self) -> bool {
        self.reqs.is_empty()
    }
}

impl std::fmt::Display for Selector {
    /// Kubernetes' label-selector string form (`a=b,c in (d,e),!f`); `{}` for everything.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.reqs.is_empty() {
            return f.write_str("{}");
        }
        let join = |vs: &BTreeSet<String>| vs.iter().cloned().collect::<Vec<_>>().join(",");
        let parts: Vec<String> = self
            .reqs
            .iter()
            .map(|r| match r {
                Requirement::In(k, vs) if vs.len() == 1 => format!("{k}={}", join(vs)),
                Requirement::In(k, vs) => format!("{k} in ({})", join(vs)),
                Requirement::NotIn(k, vs) => format!("{k} notin ({})", join(vs)),
                Requirement::Exists(k) => k.clone(),
                Requirement::DoesNotExist(k) => format!("!{k}"),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}
