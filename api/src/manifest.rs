//! Reading the YAML a user would `kubectl apply`: multi-document files holding ModalityNodes
//! and MultimodalPipelines, checked with the same CEL rules the API server enforces plus the
//! cross-object checks a single object cannot express (a pipeline's nodes must exist).

use std::collections::BTreeSet;

use kube::ResourceExt;
use serde::Deserialize;
use thiserror::Error;

use crate::node::ModalityNode;
use crate::pipeline::{MultimodalPipeline, NodeRole};

/// Why a manifest was rejected. Messages name the document, object and field.
#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("document {doc}: not valid YAML: {source}")]
    Yaml { doc: usize, source: serde_yaml::Error },
    #[error("document {doc}: {kind} {name}: {source}")]
    Schema { doc: usize, kind: String, name: String, source: serde_json::Error },
    #[error("document {doc}: unsupported apiVersion/kind {api_version}/{kind}: Prism reads prism.dev/v1alpha1 ModalityNode and MultimodalPipeline")]
    UnsupportedKind { doc: usize, api_version: String, kind: String },
    #[error("document {doc}: {kind} has no metadata.name")]
    MissingName { doc: usize, kind: String },
    #[error("{kind} {name}: {message}")]
    Invalid { kind: String, name: String, message: String },
}

/// One resource from a manifest. Parsed once per file, so the size difference between the
/// variants costs nothing worth a Box.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Manifest {
    Node(ModalityNode),
    Pipeline(MultimodalPipeline),
}

/// Every Prism resource read from one or more manifest files.
#[derive(Debug, Clone, Default)]
pub struct ManifestSet {
    pub nodes: Vec<ModalityNode>,
    pub pipelines: Vec<MultimodalPipeline>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

/// Parses a (multi-document) YAML string. Documents of other kinds are an error, empty documents are skipped.
pub fn parse(yaml: &str) -> Result<Vec<Manifest>, ManifestError> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let doc = i + 1;
        let value = serde_yaml::Value::deserialize(de).map_err(|source| ManifestError::Yaml { doc, source })?;
        if value.is_null() {
            continue;
        }
        let json = serde_json::to_value(&value).map_err(|e| ManifestError::Schema {
            doc,
            kind: "?".into(),
            name: "?".into(),
            source: e,
        })?;
        let tm: TypeMeta = serde_json::from_value(json.clone()).map_err(|e| ManifestError::Schema {
            doc,
            kind: "?".into(),
            name: "?".into(),
            source: e,
        })?;
        let name = json.pointer("/metadata/name").and_then(|v| v.as_str()).unwrap_or("").to_string();
        if tm.api_version != format!("{}/{}", crate::GROUP, crate::VERSION) {
            return Err(ManifestError::UnsupportedKind { doc, api_version: tm.api_version, kind: tm.kind });
        }
        if name.is_empty() {
            return Err(ManifestError::MissingName { doc, kind: tm.kind });
        }
        let schema_err = |source| ManifestError::Schema { doc, kind: tm.kind.clone(), name: name.clone(), source };
        let crd = match tm.kind.as_str() {
            "ModalityNode" => Some(<ModalityNode as kube::CustomResourceExt>::crd()),
            "MultimodalPipeline" => Some(<MultimodalPipeline as kube::CustomResourceExt>::crd()),
            _ => None,
        };
        if let Some(crd) = crd {
            let problems = schema_errors(&json, &crd);
            if !problems.is_empty() {
                return Err(ManifestError::Invalid {
                    kind: tm.kind.clone(),
                    name: format!("{name} (document {doc})"),
                    message: format!("{} schema error(s):\n  - {}", problems.len(), problems.join("\n  - ")),
                });
            }
        }
        match tm.kind.as_str() {
            "ModalityNode" => out.push(Manifest::Node(serde_json::from_value(json).map_err(schema_err)?)),
            "MultimodalPipeline" => out.push(Manifest::Pipeline(serde_json::from_value(json).map_err(schema_err)?)),
            _ => return Err(ManifestError::UnsupportedKind { doc, api_version: tm.api_version, kind: tm.kind }),
        }
    }
    Ok(out)
}

impl ManifestSet {
    /// Parses and adds every resource in `yaml`.
    pub fn add_yaml(&mut self, yaml: &str) -> Result<(), ManifestError> {
        for m in parse(yaml)? {
            match m {
                Manifest::Node(n) => self.nodes.push(n),
                Manifest::Pipeline(p) => self.pipelines.push(p),
            }
        }
        Ok(())
    }

    pub fn node(&self, name: &str) -> Option<&ModalityNode> {
        self.nodes.iter().find(|n| n.name_any() == name)
    }

    /// Runs the CRDs' CEL rules on every object, then the checks across objects.
    /// Returns every problem found, not only the first.
    pub fn validate(&self) -> Result<(), Vec<ManifestError>> {
        let mut errors = Vec::new();
        let mut seen = BTreeSet::new();
        for n in &self.nodes {
            if !seen.insert(("ModalityNode", n.name_any())) {
                errors.push(invalid("ModalityNode", &n.name_any(), "defined more than once"));
            }
            if let Err(e) = n.validate_cel() {
                errors.push(invalid("ModalityNode", &n.name_any(), &e.to_string()));
            }
        }
        for p in &self.pipelines {
            let pname = p.name_any();
            if !seen.insert(("MultimodalPipeline", pname.clone())) {
                errors.push(invalid("MultimodalPipeline", &pname, "defined more than once"));
            }
            if let Err(e) = p.validate_cel() {
                errors.push(invalid("MultimodalPipeline", &pname, &e.to_string()));
            }
            for pn in &p.spec.nodes {
                match self.node(&pn.name) {
                    None => errors.push(invalid(
                        "MultimodalPipeline",
                        &pname,
                        &format!("spec.nodes: ModalityNode {:?} is not defined in the given manifests", pn.name),
                    )),
                    Some(n) => {
                        let is_fusion_node = n.spec.modality == crate::node::modality::FUSION;
                        if (pn.role == NodeRole::Fusion) != is_fusion_node {
                            errors.push(invalid(
                                "MultimodalPipeline",
                                &pname,
                                &format!(
                                    "spec.nodes[{}]: role {:?} does not match ModalityNode modality {:?} (role fusion goes with modality fusion)",
                                    pn.name, pn.role, n.spec.modality
                                ),
                            ))
                        }
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

fn invalid(kind: &str, name: &str, message: &str) -> ManifestError {
    ManifestError::Invalid { kind: kind.into(), name: name.into(), message: message.into() }
}

/// Checks a resource against its CRD's OpenAPI v3 schema (the structural subset the API server
/// enforces: types, required, enum, pattern, min/max, lengths, item counts, unknown fields),
/// returning each violation as `path: problem`. CEL rules are checked separately.
pub fn schema_errors(
    value: &serde_json::Value,
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Vec<String> {
    let mut errors = Vec::new();
    let schema = crd
        .spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| serde_json::to_value(s).ok());
    if let (Some(schema), Some(spec)) = (schema, value.get("spec")) {
        if let Some(spec_schema) = schema.pointer("/properties/spec") {
            check(spec, spec_schema, "spec", &mut errors);
        }
    }
    errors
}

fn check(v: &serde_json::Value, s: &serde_json::Value, path: &str, errors: &mut Vec<String>) {
    use serde_json::Value;
    if v.is_null() {
        if !s.get("nullable").and_then(Value::as_bool).unwrap_or(false) {
            errors.push(format!("{path}: must not be null"));
        }
        return;
    }
    let want = s.get("type").and_then(Value::as_str);
    let type_ok = match want {
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        _ => true,
    };
    if !type_ok {
        errors.push(format!("{path}: expected {}, got {}", want.unwrap_or("?"), json_type(v)));
        return;
    }
    if let Some(options) = s.get("enum").and_then(Value::as_array) {
        if !options.contains(v) {
            let list: Vec<String> = options.iter().map(|o| o.to_string()).collect();
            errors.push(format!("{path}: {v} is not one of {}", list.join(", ")));
        }
    }
    if let Some(n) = v.as_f64() {
        if let Some(min) = s.get("minimum").and_then(Value::as_f64) {
            if n < min {
                errors.push(format!("{path}: {v} is below the minimum {min}"));
            }
        }
        if let Some(max) = s.get("maximum").and_then(Value::as_f64) {
            if n > max {
                errors.push(format!("{path}: {v} is above the maximum {max}"));
            }
        }
    }
    if let Some(text) = v.as_str() {
        let len = text.chars().count() as u64;
        if let Some(min) = s.get("minLength").and_then(Value::as_u64) {
            if len < min {
                errors.push(format!("{path}: must be at least {min} characters"));
            }
        }
        if let Some(max) = s.get("maxLength").and_then(Value::as_u64) {
            if len > max {
                errors.push(format!("{path}: must be at most {max} characters"));
            }
        }
        if let Some(pattern) = s.get("pattern").and_then(Value::as_str) {
            match regex::Regex::new(pattern) {
                Ok(re) if !re.is_match(text) => errors.push(format!("{path}: {text:?} does not match {pattern}")),
                _ => {}
            }
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if let Some(min) = s.get("minItems").and_then(Value::as_u64) {
            if n < min {
                errors.push(format!("{path}: needs at least {min} item(s)"));
            }
        }
        if let Some(max) = s.get("maxItems").and_then(Value::as_u64) {
            if n > max {
                errors.push(format!("{path}: at most {max} item(s) allowed"));
            }
        }
        if let Some(item_schema) = s.get("items") {
            for (i, item) in items.iter().enumerate() {
                check(item, item_schema, &format!("{path}[{i}]"), errors);
            }
        }
    }
    if let Some(obj) = v.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        for req in s.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
            if !obj.contains_key(req) {
                errors.push(format!("{path}.{req}: required"));
            }
        }
        let preserve = s.get("x-kubernetes-preserve-unknown-fields").and_then(Value::as_bool).unwrap_or(false);
        for (k, child) in obj {
            match (props.and_then(|p| p.get(k)), s.get("additionalProperties")) {
                (Some(cs), _) => check(child, cs, &format!("{path}.{k}"), errors),
                (None, Some(extra)) if extra.is_object() => check(child, extra, &format!("{path}.{k}"), errors),
                (None, _) if props.is_some() && !preserve => errors.push(format!("{path}.{k}: unknown field")),
                _ => {}
            }
        }
    }
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}
