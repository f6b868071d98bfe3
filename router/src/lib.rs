//! prism-router: the data plane of a MultimodalPipeline.
//!
//! Layers (pure first, I/O last):
//! - [`balancer`]: replica choice R = argmax(alpha*A - beta*L) under P_fail < delta,
//!   power-of-two-choices among near-ties, outlier ejection; no I/O, property-tested.
//! - [`fusion`]: weighted / attention fusion and de-fusion; [`plan`]: pipeline -> per-modality
//!   settings, request validation, degradation decision.
//! - [`engine`]: routing-table state, node calls with retries, parallel fan-out.
//! - [`http`] (axum) and [`grpc`] (tonic) front doors over one [`error::RouterError`] table;
//!   [`openai`]: the OpenAI-compatible embeddings and models surface (pure parts);
//!   [`oip`] + [`oip_grpc`]: the Open Inference Protocol v2 (KServe / Triton clients).
//! - [`config`] (files) and [`cluster`] (the ConfigMap, watched through the API): hot reload.
//! - [`memory`]: the seam prism-memory plugs into (request log, cached answers).

pub mod auth;
pub mod balancer;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod error;
pub mod fusion;
pub mod grpc;
pub mod http;
pub mod memory;
pub mod metrics;
pub mod oip;
pub mod oip_grpc;
pub mod openai;
pub mod openapi;
pub mod plan;

pub use engine::{EngineOptions, Router};
pub use error::RouterError;
