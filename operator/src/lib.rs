//! Prism's control plane: reconcilers for ModalityNode and MultimodalPipeline, the autoscaler
//! and failover loops. Pure decision functions live beside thin API adapters.

pub mod crds;
