//! kubectl-style YAML for both kinds goes through the Rust types without losing anything: every
//! field a user wrote comes back with the same value (defaults may be added, nothing dropped).

use std::path::Path;

use prism_api::manifest::{parse, Manifest};
use serde::Deserialize;

/// Whether every field of `want` is present in `have` with an equal value.
fn contains(want: &serde_json::Value, have: &serde_json::Value, path: &str, missing: &mut Vec<String>) {
    use serde_json::Value;
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => {
            for (k, v) in w {
                match h.get(k) {
                    Some(hv) => contains(v, hv, &format!("{path}.{k}"), missing),
                    None => missing.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(w), Value::Array(h)) if w.len() == h.len() => {
            for (i, (a, b)) in w.iter().zip(h).enumerate() {
                contains(a, b, &format!("{path}[{i}]"), missing);
            }
        }
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) if a == b => {}
        (a, b) => missing.push(format!("{path}: wrote {a}, got back {b}")),
    }
}

#[test]
fn examples_round_trip_without_loss() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
            .filter(|v| !v.is_null())
            .collect();
        let parsed = parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(docs.len(), parsed.len());
        for (doc, m) in docs.iter().zip(&parsed) {
            let back = match m {
                Manifest::Node(n) => serde_json::to_value(n).unwrap(),
                Manifest::Pipeline(p) => serde_json::to_value(p).unwrap(),
            };
            let mut missing = Vec::new();
            contains(doc, &back, "", &mut missing);
            assert!(missing.is_empty(), "{}: lost in the round trip: {missing:?}", path.display());
            // And the serialized form parses back to the same object.
            let again = serde_yaml::to_string(&back).unwrap();
            let reparsed = parse(&again).unwrap();
            assert_eq!(format!("{:?}", reparsed[0]), format!("{m:?}"));
            checked += 1;
        }
    }
    assert!(checked >= 6, "expected the examples to hold at least 6 resources, checked {checked}");
}
