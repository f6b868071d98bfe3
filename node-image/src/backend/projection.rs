//! Projection heads: a small MLP after any encoder that maps its vectors into a shared embedding
//! space (CLIP's text/visual projections, trained by `prism train shared-space`).
//!
//! A model folder with a `projection.safetensors` is served through its head: the node's vectors
//! are `normalize(head(encoder(x)))` and `/info` reports the head's output dimension. The file holds
//! `projection.{i}.weight` [out, in] and `projection.{i}.bias` [out] for i = 0..n, with GELU
//! between layers (none after the last). The same [`ProjectionHead::forward`] runs in training
//! (over candle `Var`s) and serving, so what was measured is what is served.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{BackendError, Encoder, LoadedModel, Prepared};

/// File name inside a model folder.
pub const FILE: &str = "projection.safetensors";

/// Layers of a head, input side first: (weight [out, in], bias [out]).
#[derive(Clone, Debug)]
pub struct ProjectionHead {
    pub layers: Vec<(Tensor, Tensor)>,
}

impl ProjectionHead {
    pub fn in_dim(&self) -> usize {
        self.layers.first().map(|(w, _)| w.dims()[1]).unwrap_or(0)
    }

    pub fn out_dim(&self) -> usize {
        self.layers.last().map(|(w, _)| w.dims()[0]).unwrap_or(0)
    }

    /// [batch, in] -> [batch, out], L2-normalised rows.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for (i, (w, b)) in self.layers.iter().enumerate() {
            if i > 0 {
                h = h.gelu_erf()?;
            }
            h = h.matmul(&w.t()?)?.broadcast_add(b)?;
        }
        l2_rows(&h)
    }

    /// Reads a head file, checking the layer chain is consistent.
    pub fn load(path: &Path, device: &Device) -> Result<Self, BackendError> {
        let e = |m: String| BackendError::Load(format!("{}: {m}", path.display()));
        let tensors = candle_core::safetensors::load(path, device).map_err(|x| e(x.to_string()))?;
        let mut layers = Vec::new();
        while let Some(w) = tensors.get(&format!("projection.{}.weight", layers.len())) {
            let b = tensors
                .get(&format!("projection.{}.bias", layers.len()))
                .ok_or_else(|| e(format!("projection.{}.bias is missing", layers.len())))?;
            let (w, b) = (
                w.to_dtype(DType::F32).map_err(|x| e(x.to_string()))?,
                b.to_dtype(DType::F32).map_err(|x| e(x.to_string()))?,
            );
            if w.rank() != 2 || b.dims() != [w.dims()[0]] {
                return Err(e(format!("layer {} has weight {:?} and bias {:?}", layers.len(), w.dims(), b.dims())));
            }
            if let Some((prev, _)) = layers.last() {
                let prev: &Tensor = prev;
                if prev.dims()[0] != w.dims()[1] {
                    return Err(e(format!(
                        "layer {} takes {} inputs but the layer before gives {}",
                        layers.len(),
                        w.dims()[1],
                        prev.dims()[0]
                    )));
                }
            }
            layers.push((w, b));
        }
        if layers.is_empty() {
            return Err(e("no projection.0.weight: not a projection head".into()));
        }
        Ok(Self { layers })
    }

    /// Writes the head in the format [`ProjectionHead::load`] reads.
    pub fn save(&self, path: &Path) -> Result<(), BackendError> {
        let mut map = std::collections::HashMap::new();
        for (i, (w, b)) in self.layers.iter().enumerate() {
            map.insert(format!("projection.{i}.weight"), w.to_device(&Device::Cpu)?.contiguous()?);
            map.insert(format!("projection.{i}.bias"), b.to_device(&Device::Cpu)?.contiguous()?);
        }
        candle_core::safetensors::save(&map, path)
            .map_err(|x| BackendError::Load(format!("writing {}: {x}", path.display())))
    }
}

/// Row-wise L2 normalisation; the epsilon keeps a zero row at zero instead of NaN.
pub fn l2_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?;
    x.broadcast_div(&norm)
}

/// Puts the folder's head (when it has one) after the model's encoder.
pub fn attach(mut model: LoadedModel, dir: &Path) -> Result<LoadedModel, BackendError> {
    let path = dir.join(FILE);
    if !path.is_file() {
        return Ok(model);
    }
    let head = ProjectionHead::load(&path, &Device::Cpu)?;
    if head.in_dim() != model.info.dim {
        return Err(BackendError::Load(format!(
            "{} expects {}-d vectors but the {} model gives {}-d; it was trained for another model",
            path.display(),
            head.in_dim(),
            model.info.architecture,
            model.info.dim
        )));
    }
    model.info.dim = head.out_dim();
    model.encoder = Box::new(ProjectedEncoder { inner: model.encoder, head });
    Ok(model)
}

struct ProjectedEncoder {
    inner: Box<dyn Encoder>,
    head: ProjectionHead,
}

impl Encoder for ProjectedEncoder {
    fn encode_batch(&mut self, batch: &[Prepared]) -> Result<Vec<Vec<f32>>, BackendError> {
        let vectors = self.inner.encode_batch(batch)?;
        let (n, d) = (vectors.len(), self.head.in_dim());
        let x = Tensor::from_vec(vectors.into_iter().flatten().collect::<Vec<f32>>(), (n, d), &Device::Cpu)?;
        Ok(self.head.forward(&x)?.to_vec2::<f32>()?)
    }
}
