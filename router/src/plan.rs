//! The pipeline as the router enforces it: which modality maps to which pipeline node
//! (role, weight, required), request validation, and the degradation decision. Pure.

use std::collections::{BTreeMap, BTreeSet};

use prism_api::pipeline::{MissingOptional, MissingRequired, NodeRole, PipelineNode};
use prism_api::{MultimodalPipelineSpec, RoutingTable};

use crate::error::RouterError;

/// How one modality takes part in the pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct ModalityConfig {
    pub role: NodeRole,
    pub weight: f64,
    pub required: bool,
}

/// Per-modality configuration derived from a pipeline spec and a routing table.
///
/// The routing table lists endpoints per modality, each naming its ModalityNode; the pipeline
/// lists nodes with role, weight and `required`. A modality takes the settings of the pipeline
/// node that serves it (matched by node name, else by a node named like the modality); a
/// modality the pipeline does not mention is an optional encoder of weight 1, so a table alone
/// (`prism up` without a pipeline file) is enough to route.
pub fn modality_configs(spec: &MultimodalPipelineSpec, table: &RoutingTable) -> BTreeMap<String, ModalityConfig> {
    let by_name: BTreeMap<&str, &PipelineNode> = spec.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    table
        .modalities
        .iter()
        .map(|(m, eps)| {
            let node =
                eps.iter().find_map(|e| by_name.get(e.node.as_str())).or_else(|| by_name.get(m.as_str())).copied();
            let cfg = match node {
                Some(n) => ModalityConfig { role: n.role, weight: n.weight, required: n.required },
                None => ModalityConfig { role: NodeRole::Encoder, weight: 1.0, required: false },
            };
            (m.clone(), cfg)
        })
        .collect()
}

/// Reject requests the pipeline cannot serve: no inputs, or a modality that is not an encoder
/// modality of this pipeline. (A modality with no ready replica is *known*: that degrades.)
pub fn validate_modalities<'a>(
    requested: impl IntoIterator<Item = &'a String>,
    configs: &BTreeMap<String, ModalityConfig>,
) -> Result<(), RouterError> {
    let mut any = false;
    for m in requested {
        any = true;
        match configs.get(m) {
            Some(c) if c.role == NodeRole::Encoder => {}
            Some(_) => {
                return Err(RouterError::Validation(format!(
                    "modality '{m}' is served by a fusion node; send the encoder modalities and the router fuses them"
                )))
            }
            None => {
                let known: Vec<&str> =
                    configs.iter().filter(|(_, c)| c.role == NodeRole::Encoder).map(|(k, _)| k.as_str()).collect();
                return Err(RouterError::UnknownModality {
                    modality: m.clone(),
                    known: if known.is_empty() { "(none: no routing table loaded)".into() } else { known.join(", ") },
                });
            }
        }
    }
    if !any {
        return Err(RouterError::Validation("`inputs` is empty: send at least one modality".into()));
    }
    Ok(())
}

/// What to answer once the fan-out is over.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Every requested modality was served.
    Whole,
    /// Serve what we have, marked degraded.
    Partial { missing: Vec<String>, reason: String },
    /// A required modality is missing and the policy says `cached`: look up the cache.
    Cached { missing: Vec<String>, reason: String },
    /// Fail with 503 and this message.
    Fail(String),
}

/// Apply `degradation` to the modalities that could not be served (`missing`, with why).
pub fn decide(
    spec: &MultimodalPipelineSpec,
    configs: &BTreeMap<String, ModalityConfig>,
    served: &BTreeSet<String>,
    missing: &BTreeMap<String, String>,
) -> Decision {
    if missing.is_empty() {
        return Decision::Whole;
    }
    let names: Vec<String> = missing.keys().cloned().collect();
    let why: Vec<String> = missing.iter().map(|(m, r)| format!("{m}: {r}")).collect();
    let why = why.join("; ");
    let required: Vec<&String> = names.iter().filter(|m| configs.get(*m).is_some_and(|c| c.required)).collect();
    if !required.is_empty() {
        let req: Vec<&str> = required.iter().map(|s| s.as_str()).collect();
        let reason = format!("required modality {} has no healthy replica ({why})", req.join(", "));
        return match spec.degradation.on_missing_required {
            MissingRequired::Fail => Decision::Fail(reason),
            MissingRequired::Cached => Decision::Cached { missing: names, reason },
        };
    }
    if served.is_empty() {
        return Decision::Fail(format!("no requested modality could be served ({why})"));
    }
    match spec.degradation.on_missing_optional {
        MissingOptional::Partial => Decision::Partial {
            missing: names,
            reason: format!("optional modality unavailable, answered from the rest ({why})"),
        },
        MissingOptional::Fail => {
            Decision::Fail(format!("modality unavailable and degradation.onMissingOptional is fail ({why})"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prism_api::pipeline::DegradationSpec;
    use prism_api::RouteEndpoint;

    fn spec(nodes: Vec<PipelineNode>) -> MultimodalPipelineSpec {
        serde_json::from_value(serde_json::json!({"nodes": nodes})).unwrap()
    }

    fn pnode(name: &str, role: NodeRole, weight: f64, required: bool) -> PipelineNode {
        PipelineNode { name: name.into(), role, weight, required, accuracy: 0.9 }
    }

    fn table() -> RoutingTable {
        let ep = |node: &str| RouteEndpoint {
            endpoint: format!("http://127.0.0.1:1/{node}"),
            node: node.into(),
            revision: "1".into(),
            weight: 1.0,
            accuracy: 0.9,
            ready: true,
        };
        let mut t = RoutingTable { pipeline: "p".into(), generation: 1, ..Default::default() };
        t.modalities.insert("text".into(), vec![ep("minilm")]);
        t.modalities.insert("audio".into(), vec![ep("whisper")]);
        t.modalities.insert("fusion".into(), vec![ep("perceiver")]);
        t.modalities.insert("caption".into(), vec![ep("unlisted")]);
        t
    }

    #[test]
    fn configs_follow_node_names_then_modality_names_then_defaults() {
        let s = spec(vec![
            pnode("minilm", NodeRole::Encoder, 3.0, true),
            pnode("perceiver", NodeRole::Fusion, 1.0, false),
            pnode("audio", NodeRole::Encoder, 0.5, false),
        ]);
        let c = modality_configs(&s, &table());
        assert_eq!(c["text"], ModalityConfig { role: NodeRole::Encoder, weight: 3.0, required: true });
        assert_eq!(c["fusion"].role, NodeRole::Fusion);
        assert_eq!(c["audio"].weight, 0.5);
        assert_eq!(c["caption"], ModalityConfig { role: NodeRole::Encoder, weight: 1.0, required: false });
    }

    #[test]
    fn validation_rejects_unknown_fusion_and_empty() {
        let s = spec(vec![pnode("perceiver", NodeRole::Fusion, 1.0, false)]);
        let c = modality_configs(&s, &table());
        let unknown = validate_modalities([&"smell".to_string()], &c).unwrap_err();
        assert!(unknown.to_string().contains("smell") && unknown.to_string().contains("text"), "{unknown}");
        assert!(validate_modalities([&"fusion".to_string()], &c).is_err());
        assert!(validate_modalities(std::iter::empty(), &c).is_err());
        assert!(validate_modalities([&"text".to_string(), &"audio".to_string()], &c).is_ok());
    }

    #[test]
    fn degradation_policy() {
        let mut s = spec(vec![pnode("minilm", NodeRole::Encoder, 1.0, true)]);
        let c = modality_configs(&s, &table());
        let served: BTreeSet<String> = ["text".to_string()].into();
        let mut missing = BTreeMap::new();
        assert_eq!(decide(&s, &c, &served, &missing), Decision::Whole);
        missing.insert("audio".to_string(), "connection refused".to_string());
        match decide(&s, &c, &served, &missing) {
            Decision::Partial { missing, reason } => {
                assert_eq!(missing, vec!["audio"]);
                assert!(reason.contains("connection refused"));
            }
            d => panic!("{d:?}"),
        }
        // Nothing served at all: no partial answer is possible.
        assert!(matches!(decide(&s, &c, &BTreeSet::new(), &missing), Decision::Fail(_)));
        // Required modality missing: fail, naming it; or cached when asked.
        let mut missing_req = BTreeMap::new();
        missing_req.insert("text".to_string(), "ejected".to_string());
        let served_audio: BTreeSet<String> = ["audio".to_string()].into();
        match decide(&s, &c, &served_audio, &missing_req) {
            Decision::Fail(m) => assert!(m.contains("text"), "{m}"),
            d => panic!("{d:?}"),
        }
        s.degradation = DegradationSpec { on_missing_required: MissingRequired::Cached, ..Default::default() };
        assert!(matches!(decide(&s, &c, &served_audio, &missing_req), Decision::Cached { .. }));
        s.degradation = DegradationSpec { on_missing_optional: MissingOptional::Fail, ..Default::default() };
        assert!(matches!(decide(&s, &c, &served, &missing), Decision::Fail(_)));
    }
}
