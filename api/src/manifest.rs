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

/// One resource from a manifest.
#[derive(Debug, Clone)]
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
