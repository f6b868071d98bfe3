//! `prism train from-corrections`: the memory loop's model update (theta <- theta - eta * grad
//! L_correction). Users' corrections say which label a past request should have matched; the
//! current revision's projection head is fine-tuned on them (with replay of its original training
//! pairs, so what it knew is kept) and written as a new revision folder.
//!
//! Input: the router's training set (`GET /v1/memory/corrections`), which carries each request's
//! inputs when the pipeline logs them verbatim (`memory.inputs: full`). A correction trains when
//! its `answer` names a label (`{"label": "seven"}` or the label's index) and its request has an
//! input of the head's modality; the others are counted by reason, never silently dropped.
//!
//! The gain is measured on corrections held out of training (one in five, by request id), before
//! and after, and the paired data's own held-out split shows nothing was forgotten.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use prism_api::wire::node::EmbedInput;
use serde::{Deserialize, Serialize};

use super::{
    contrastive_loss, io, link_model_folder, retrieval_top1, rows, same_label_targets, Manifest, SplitMix64, TrainError,
};
use crate::backend::projection::{self, ProjectionHead};
use crate::backend::{self, BackendError, DeviceChoice, LoadSpec};

#[derive(Clone, Debug)]
pub struct CorrectionsConfig {
    /// The router's export: `{"corrections": [...]}` or a bare array.
    pub corrections: PathBuf,
    /// Which input of each request the head reads (`text`, `audio`).
    pub modality: String,
    /// The encoder architecture of `model` (`bert`, `whisper-encoder`).
    pub architecture: String,
    /// The revision being corrected: a model folder with `projection.safetensors`.
    pub model: PathBuf,
    /// The space's anchor (vision) folder and the paired data it was trained on.
    pub vision_model: PathBuf,
    pub data: PathBuf,
    /// The new revision's folder.
    pub out: PathBuf,
    pub steps: usize,
    pub batch: usize,
    pub learning_rate: f64,
    pub temperature: f64,
    pub seed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CorrectionsReport {
    pub corrections_trained: usize,
    pub corrections_held_out: usize,
    /// Corrections not used, by reason.
    pub skipped: BTreeMap<String, usize>,
    /// Top-1 on the held-out corrections with the parent revision, and with the new one.
    pub before_top1: f64,
    pub after_top1: f64,
    pub correction_gain: f64,
    /// Top-1 on the paired data's held-out split (must not fall: nothing forgotten).
    pub data_before_top1: f64,
    pub data_after_top1: f64,
    pub parent: PathBuf,
    pub steps: usize,
    pub train_seconds: f64,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Export {
    Wrapped { corrections: Vec<serde_json::Value> },
    Bare(Vec<serde_json::Value>),
}

/// One usable correction: the input, the label it should match, whether it is held out.
struct Example {
    input: EmbedInput,
    label: usize,
    held_out: bool,
}

fn examples(cfg: &CorrectionsConfig, labels: &[String]) -> Result<(Vec<Example>, BTreeMap<String, usize>), TrainError> {
    let raw = std::fs::read(&cfg.corrections).map_err(io(&cfg.corrections))?;
    let export: Export = serde_json::from_slice(&raw).map_err(|e| {
        TrainError::Data(format!(
            "{}: not the router's training set (GET /v1/memory/corrections): {e}",
            cfg.corrections.display()
        ))
    })?;
    let list = match export {
        Export::Wrapped { corrections } | Export::Bare(corrections) => corrections,
    };
    let (mut out, mut skipped) = (Vec::new(), BTreeMap::<String, usize>::new());
    let mut skip = |why: &str| *skipped.entry(why.to_string()).or_default() += 1;
    for c in &list {
        let label = match &c["answer"]["label"] {
            serde_json::Value::String(name) => labels.iter().position(|l| l == name),
            serde_json::Value::Number(n) => n.as_u64().map(|i| i as usize).filter(|i| *i < labels.len()),
            _ => {
                skip("no answer.label");
                continue;
            }
        };
        let Some(label) = label else {
            skip("answer.label is not a label of the data");
            continue;
        };
        let input = &c["inputs"][cfg.modality.as_str()];
        if input.is_null() {
            skip(&format!("no {} input", cfg.modality));
            continue;
        }
        if input.get("sha256").is_some() {
            skip("input logged as a hash (set the pipeline's memory.inputs: full to train on it)");
            continue;
        }
        let Ok(input) = serde_json::from_value::<EmbedInput>(input.clone()) else {
            skip("input is not an embed input");
            continue;
        };
        let id = c["requestId"].as_str().unwrap_or_default();
        // One in five held out, by a hash of the id: stable across runs and exports.
        let held_out =
            id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)) % 5 == 0;
        out.push(Example { input, label, held_out });
    }
    Ok((out, skipped))
}

/// Fine-tunes the head of `cfg.model` on the corrections and writes the new revision.
pub fn train_from_corrections(
    cfg: &CorrectionsConfig,
    progress: &mut dyn FnMut(String),
) -> Result<CorrectionsReport, TrainError> {
    let manifest = Manifest::read(&cfg.data)?;
    let (examples, skipped) = examples(cfg, &manifest.labels)?;
    let (train_ex, held_ex): (Vec<&Example>, Vec<&Example>) = examples.iter().partition(|e| !e.held_out);
    progress(format!("corrections: {} to train on, {} held out, skipped {:?}", train_ex.len(), held_ex.len(), skipped));
    if train_ex.is_empty() || held_ex.is_empty() {
        return Err(TrainError::Data(format!(
            "{}: {} usable corrections (skipped: {skipped:?}); need some to train on and some (1 in 5) to measure the gain",
            cfg.corrections.display(),
            examples.len()
        )));
    }
    let head_path = cfg.model.join(projection::FILE);
    if !head_path.is_file() {
        return Err(TrainError::Data(format!(
            "{} has no {}: from-corrections fine-tunes a shared-space head (make one with `prism train shared-space`)",
            cfg.model.display(),
            projection::FILE
        )));
    }
    let parent = ProjectionHead::load(&head_path, &Device::Cpu)?;

    // The anchors and the replay set come from the paired data (cached vectors).
    if cfg.modality != "text" && cfg.modality != "audio" {
        return Err(TrainError::Data(format!("--modality {}: heads exist for text and audio", cfg.modality)));
    }
    // Whisper's padded window, as the nodes serve by default.
    let aw = crate::backend::AudioWindow::Full;
    let images = manifest.embed("vision", "vit", &cfg.vision_model, &cfg.data, aw, progress)?;
    let replay = manifest.embed(&cfg.modality, &cfg.architecture, &cfg.model, &cfg.data, aw, progress)?;
    let raw = embed_inputs(cfg, examples.iter().map(|e| &e.input))?;
    let (mut corr_train, mut corr_train_labels, mut corr_held, mut corr_held_labels) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (e, v) in examples.iter().zip(raw) {
        if e.held_out {
            corr_held.push(v);
            corr_held_labels.push(e.label);
        } else {
            corr_train.extend(v);
            corr_train_labels.push(e.label);
        }
    }
    let d = parent.in_dim();
    let corr_train = Tensor::from_vec(corr_train, (corr_train_labels.len(), d), &Device::Cpu)?;

    // Start from the parent's weights.
    let vars: Vec<(Var, Var)> = parent
        .layers
        .iter()
        .map(|(w, b)| Ok((Var::from_tensor(w)?, Var::from_tensor(b)?)))
        .collect::<candle_core::Result<_>>()?;
    let head =
        ProjectionHead { layers: vars.iter().map(|(w, b)| (w.as_tensor().clone(), b.as_tensor().clone())).collect() };
    let before_top1 = retrieval_top1(&parent, &corr_held, &corr_held_labels, &images)?;
    let data_before_top1 = retrieval_top1(&parent, &replay.test, &replay.test_labels, &images)?;
    let mut opt = AdamW::new(
        vars.into_iter().flat_map(|(w, b)| [w, b]).collect(),
        ParamsAdamW { lr: cfg.learning_rate, weight_decay: 1e-4, ..Default::default() },
    )?;
    let classes = manifest.labels.len();
    let mut images_by_label = vec![Vec::new(); classes];
    images.train_labels.iter().enumerate().for_each(|(i, l)| images_by_label[*l].push(i as u32));
    if let Some(l) = corr_train_labels.iter().chain(&replay.train_labels).find(|l| images_by_label[**l].is_empty()) {
        return Err(TrainError::Data(format!("label {} has no train image to anchor it", manifest.labels[*l])));
    }
    let mut rng = SplitMix64(cfg.seed);
    let started = Instant::now();
    // Half of each batch from the corrections (what must change), half replayed from the
    // original pairs (what must not).
    let half = (cfg.batch / 2).max(1);
    for step in 1..=cfg.steps {
        let mut labels = Vec::new();
        let mut from_corrections = Vec::new();
        let mut from_replay = Vec::new();
        for k in 0..cfg.batch {
            if k < half {
                let i = rng.below(corr_train_labels.len());
                from_corrections.push(i as u32);
                labels.push(corr_train_labels[i]);
            } else {
                let i = rng.below(replay.train_labels.len());
                from_replay.push(i as u32);
                labels.push(replay.train_labels[i]);
            }
        }
        let mut parts = vec![rows(&corr_train, from_corrections)?];
        if !from_replay.is_empty() {
            parts.push(rows(&replay.train, from_replay)?);
        }
        let x = Tensor::cat(&parts, 0)?;
        let anchors: Vec<u32> =
            labels.iter().map(|l| images_by_label[*l][rng.below(images_by_label[*l].len())]).collect();
        let v = rows(&images.train, anchors)?;
        let loss = contrastive_loss(&head.forward(&x)?, &v, &same_label_targets(&labels)?, cfg.temperature)?;
        opt.backward_step(&loss)?;
        if step % 50 == 0 || step == cfg.steps {
            progress(format!("train: step {step}/{} loss {:.4}", cfg.steps, loss.to_scalar::<f32>()?));
        }
    }
    let after_top1 = retrieval_top1(&head, &corr_held, &corr_held_labels, &images)?;
    let report = CorrectionsReport {
        corrections_trained: corr_train_labels.len(),
        corrections_held_out: corr_held_labels.len(),
        skipped,
        before_top1,
        after_top1,
        correction_gain: after_top1 - before_top1,
        data_before_top1,
        data_after_top1: retrieval_top1(&head, &replay.test, &replay.test_labels, &images)?,
        parent: cfg.model.clone(),
        steps: cfg.steps,
        train_seconds: started.elapsed().as_secs_f64(),
    };
    link_model_folder(&cfg.model, &cfg.out)?;
    head.save(&cfg.out.join(projection::FILE))?;
    let metrics = cfg.out.join("metrics.json");
    std::fs::write(&metrics, serde_json::to_vec_pretty(&report).map_err(|e| TrainError::Data(e.to_string()))?)
        .map_err(io(&metrics))?;
    let card = cfg.out.join("model_card.md");
    std::fs::write(
        &card,
        format!(
            "# Revision from corrections (generated by `prism train from-corrections`)\n\n\
             Parent: {parent}. {ct} corrections trained on, {ch} held out; skipped: {sk:?}.\n\n\
             | top-1 | parent | this revision |\n|---|---|---|\n\
             | held-out corrections | {b:.3} | {a:.3} |\n| paired data, held-out split | {db:.3} | {da:.3} |\n\n\
             correction_gain = {g:+.3}. Roll it out by pointing the ModalityNode's `model.uri` here with a new \
             `model.revision`.\n",
            parent = cfg.model.display(),
            ct = report.corrections_trained,
            ch = report.corrections_held_out,
            sk = report.skipped,
            b = report.before_top1,
            a = report.after_top1,
            db = report.data_before_top1,
            da = report.data_after_top1,
            g = report.correction_gain,
        ),
    )
    .map_err(io(&card))?;
    Ok(report)
}

/// Raw-encoder vectors (no head) of the corrections' inputs, in order.
fn embed_inputs<'a>(
    cfg: &CorrectionsConfig,
    inputs: impl Iterator<Item = &'a EmbedInput>,
) -> Result<Vec<Vec<f32>>, TrainError> {
    let spec = LoadSpec::new(cfg.model.clone(), DeviceChoice::Auto);
    let mut model = (backend::lookup(&cfg.architecture)?.load)(&spec)?;
    let mut out = Vec::new();
    for input in inputs {
        let p = model.preprocessor.preprocess(input).map_err(|e| match e {
            BackendError::Validation(m) => TrainError::Data(format!("a correction's input: {m}")),
            other => other.into(),
        })?;
        out.extend(model.encoder.encode_batch(&[p])?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_labelled_verbatim_inputs_train_and_every_skip_has_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.json");
        let rows = serde_json::json!({"corrections": [
            {"requestId": "a", "rating": 0.0, "answer": {"label": "seven"}, "inputs": {"text": "sieben"}},
            {"requestId": "b", "rating": 0.0, "answer": {"label": 3}, "inputs": {"text": {"text": "drei"}}},
            {"requestId": "c", "rating": 1.0, "inputs": {"text": "eins"}},
            {"requestId": "d", "rating": 0.0, "answer": {"label": "eleven"}, "inputs": {"text": "elf"}},
            {"requestId": "e", "rating": 0.0, "answer": {"label": "two"}, "inputs": {"text": {"sha256": "ab"}}},
            {"requestId": "f", "rating": 0.0, "answer": {"label": "two"}, "inputs": {"vision": {"image_base64": "x"}}},
        ]});
        std::fs::write(&file, rows.to_string()).unwrap();
        let cfg = CorrectionsConfig {
            corrections: file,
            modality: "text".into(),
            architecture: "bert".into(),
            model: dir.path().into(),
            vision_model: dir.path().into(),
            data: dir.path().into(),
            out: dir.path().join("out"),
            steps: 1,
            batch: 2,
            learning_rate: 1e-3,
            temperature: 0.1,
            seed: 1,
        };
        let labels: Vec<String> = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (ex, skipped) = examples(&cfg, &labels).unwrap();
        assert_eq!(ex.iter().map(|e| e.label).collect::<Vec<_>>(), vec![7, 3]);
        assert_eq!(skipped.values().sum::<usize>(), 4, "{skipped:?}");
        assert!(skipped.keys().any(|k| k.contains("memory.inputs: full")), "{skipped:?}");
        assert!(skipped.contains_key("no answer.label") && skipped.contains_key("no text input"), "{skipped:?}");
        // A file that is not the router's export is an error that says what was expected.
        std::fs::write(&cfg.corrections, "{\"rows\": 1}").unwrap();
        let err = examples(&cfg, &labels).err().unwrap().to_string();
        assert!(err.contains("GET /v1/memory/corrections"), "{err}");
    }
}
