//! `inference.GRPCInferenceService` (the Open Inference Protocol v2 over gRPC), served on the
//! router's gRPC port next to `prism.v1.Router`. A thin adapter: tensors go through
//! [`crate::oip`] exactly as the HTTP ones do.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::oip::{self, Content, Oip, OipError, OutputSpec, RawInput};

/// Generated from api/proto/inference/grpc_service.proto.
pub mod pb {
    tonic::include_proto!("inference");
}

pub use pb::grpc_inference_service_client::GrpcInferenceServiceClient;
pub use pb::grpc_inference_service_server::GrpcInferenceServiceServer;

pub struct OipGrpc {
    oip: Arc<Oip>,
    tokens: Arc<Vec<String>>,
}

impl OipGrpc {
    pub fn new(oip: Arc<Oip>, tokens: Vec<String>) -> Self {
        Self { oip, tokens: Arc::new(tokens) }
    }

    /// Same bearer-token rule as `prism.v1.Router`.
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        crate::auth::authorize_grpc(&self.tokens, req)
    }
}

fn request_id<T>(req: &Request<T>) -> String {
    req.metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

fn param_i64(p: &std::collections::HashMap<String, pb::InferParameter>, key: &str) -> Option<i64> {
    match p.get(key)?.parameter_choice {
        Some(pb::infer_parameter::ParameterChoice::Int64Param(i)) => Some(i),
        _ => None,
    }
}

/// The transport-neutral request: raw contents (what tritonclient sends) or typed contents.
pub fn to_request(r: pb::ModelInferRequest) -> Result<oip::Request, OipError> {
    if !r.raw_input_contents.is_empty() && r.raw_input_contents.len() != r.inputs.len() {
        return Err(OipError::BadRequest(format!(
            "raw_input_contents has {} entries for {} inputs; send one per input, in order",
            r.raw_input_contents.len(),
            r.inputs.len()
        )));
    }
    let mut raw = r.raw_input_contents.into_iter();
    let mut inputs = Vec::with_capacity(r.inputs.len());
    for t in r.inputs {
        let content = match (raw.next(), t.contents) {
            (Some(_), Some(c)) if c != pb::InferTensorContents::default() => {
                return Err(OipError::BadInput {
                    input: t.name,
                    message: "has both typed contents and raw_input_contents; send one".into(),
                })
            }
            (Some(b), _) => Content::Raw(b),
            (None, Some(c)) => {
                if !c.bytes_contents.is_empty() {
                    Content::Bytes(c.bytes_contents)
                } else if !c.fp32_contents.is_empty() {
                    Content::Fp32(c.fp32_contents)
                } else if !c.uint_contents.is_empty() {
                    Content::Uint(c.uint_contents)
                } else if c == pb::InferTensorContents::default() {
                    Content::Missing
                } else {
                    return Err(OipError::BadInput {
                        input: t.name,
                        message: format!("typed contents of another datatype than {} are not accepted", t.datatype),
                    });
                }
            }
            (None, None) => Content::Missing,
        };
        let sample_rate = param_i64(&t.parameters, "sample_rate");
        inputs.push(RawInput { name: t.name, datatype: t.datatype, shape: t.shape, sample_rate, content });
    }
    let outputs = OutputSpec {
        binary_default: true,
        requested: (!r.outputs.is_empty()).then(|| r.outputs.into_iter().map(|o| (o.name, None)).collect()),
    };
    Ok(oip::Request { id: r.id, inputs, outputs })
}

#[tonic::async_trait]
impl pb::grpc_inference_service_server::GrpcInferenceService for OipGrpc {
    async fn server_live(&self, _: Request<pb::ServerLiveRequest>) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse { ready: self.oip.router().is_ready() }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let snap = self.oip.router().snapshot();
        let model = oip::resolve(&snap, &r.name, &r.version)?;
        Ok(Response::new(pb::ModelReadyResponse { ready: self.oip.model_ready(&snap, &model) }))
    }

    async fn server_metadata(
        &self,
        request: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "prism-router".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: oip::EXTENSIONS.iter().map(|s| s.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let m = self.oip.model_metadata(&r.name, &r.version).await?;
        let tensors = |v: Vec<oip::TensorMeta>| {
            v.into_iter()
                .map(|t| pb::model_metadata_response::TensorMetadata {
                    name: t.name,
                    datatype: t.datatype.into(),
                    shape: t.shape,
                })
                .collect()
        };
        Ok(Response::new(pb::ModelMetadataResponse {
            name: m.name,
            versions: m.versions,
            platform: m.platform,
            inputs: tensors(m.inputs),
            outputs: tensors(m.outputs),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        self.authorize(&request)?;
        let id = request_id(&request);
        let r = request.into_inner();
        let (model, version) = (r.model_name.clone(), r.model_version.clone());
        let span = tracing::info_span!("oip_grpc_infer", model = %prism_api::wire::frontdoor::clip(&model, 64), request_id = %id);
        let answer = async {
            let req = to_request(r)?;
            req.outputs.binary(&model)?;
            self.oip.infer(&model, &version, req, &id).await
        }
        .instrument(span)
        .await?;
        let shape = vec![answer.embeddings.len() as i64, answer.dim() as i64];
        let raw = answer.le_bytes();
        let parameters = answer
            .parameters
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    pb::InferParameter {
                        parameter_choice: Some(pb::infer_parameter::ParameterChoice::StringParam(v.clone())),
                    },
                )
            })
            .collect();
        let mut out = Response::new(pb::ModelInferResponse {
            model_name: answer.model,
            model_version: oip::VERSION.into(),
            id: answer.id,
            parameters,
            outputs: vec![pb::model_infer_response::InferOutputTensor {
                name: oip::OUTPUT.into(),
                datatype: "FP32".into(),
                shape,
                parameters: Default::default(),
                contents: None,
            }],
            // tritonclient reads raw_output_contents only.
            raw_output_contents: vec![raw],
        });
        if let Ok(v) = id.parse() {
            out.metadata_mut().insert("x-request-id", v);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(
        name: &str,
        dt: &str,
        shape: Vec<i64>,
        contents: Option<pb::InferTensorContents>,
    ) -> pb::model_infer_request::InferInputTensor {
        pb::model_infer_request::InferInputTensor {
            name: name.into(),
            datatype: dt.into(),
            shape,
            parameters: Default::default(),
            contents,
        }
    }

    #[test]
    fn raw_and_typed_contents_decode_alike() {
        let typed = pb::ModelInferRequest {
            inputs: vec![input(
                "text",
                "BYTES",
                vec![2],
                Some(pb::InferTensorContents {
                    bytes_contents: vec![b"a".to_vec(), b"bc".to_vec()],
                    ..Default::default()
                }),
            )],
            ..Default::default()
        };
        let raw = pb::ModelInferRequest {
            inputs: vec![input("text", "BYTES", vec![2], None)],
            raw_input_contents: vec![[&1u32.to_le_bytes()[..], b"a", &2u32.to_le_bytes(), b"bc"].concat()],
            ..Default::default()
        };
        let a = oip::decode(to_request(typed).unwrap().inputs.remove(0)).unwrap();
        let b = oip::decode(to_request(raw).unwrap().inputs.remove(0)).unwrap();
        assert_eq!(a, b);
        let mismatched = pb::ModelInferRequest {
            inputs: vec![input("text", "BYTES", vec![1], None), input("x", "BYTES", vec![1], None)],
            raw_input_contents: vec![vec![]],
            ..Default::default()
        };
        assert!(to_request(mismatched).unwrap_err().to_string().contains("1 entries for 2 inputs"));
    }
}
