//! prism-node: one process serves one model of one modality over HTTP/JSON and gRPC.
//!
//! Layers (TEI style): [`backend`] holds the models behind the [`backend::Preprocessor`] /
//! [`backend::Encoder`] traits and the architecture registry; [`infer`] owns the batching queue and
//! the model thread; [`http`] and [`grpc`] are thin transports over [`infer::Infer`]; [`error`]
//! maps one error type to both transports; [`metrics`] holds the Prometheus series; [`fetch`] is
//! `prism-node fetch`, which downloads hf:// and oci:// models for the operator's init container;
//! [`gpu`] exports NVML telemetry of CUDA nodes; [`train`] is the candle training behind `prism train`.

pub mod backend;
pub mod error;
pub mod fetch;
pub mod gpu;
pub mod grpc;
pub mod http;
pub mod infer;
pub mod metrics;
pub mod train;

/// Generated from `api/proto/prism/v1/node.proto`.
pub mod pb {
    tonic::include_proto!("prism.v1");
}
