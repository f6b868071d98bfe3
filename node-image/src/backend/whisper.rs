//! Whisper encoder audio node (`--architecture whisper-encoder`), e.g. whisper-base converted by
//! `scripts/convert-whisper.py` (HF `WhisperModel` tensor names, `model.encoder.*`).
//!
//! Input: a WAV file (RIFF, PCM 8/16/24/32-bit or 32-bit float), 16 kHz, at most 30 s. Other rates
//! are rejected rather than resampled: a silent resampler of our own would be a quality choice the
//! client cannot see; `sox in.wav -r 16000 out.wav` does it well on their side. Multi-channel audio
//! is averaged to mono (lossless in intent: whisper is a mono model).
//!
//! Front end: the HF `WhisperFeatureExtractor` log-mel (pad to 30 s, centred STFT with reflect
//! padding, n_fft 400, hop 160, periodic Hann, power spectrum, 80 Slaney mel bins, log10, clamp to
//! max - 8, (x + 4) / 4), computed on the request path. Encoder: conv1 + GELU, conv2 (stride 2) +
//! GELU, positions, pre-norm blocks, final LayerNorm. Whisper was trained on 30 s windows, and
//! by default (`--audio-window full`) every clip is padded to one. `--audio-window clip` runs the
//! encoder over the clip's own frames only (the first positions, the padding never computed),
//! which changes the vectors a little and the cost a lot: a 2 s clip is 100 frames, not 1500.
//! The embedding is the mean over the encoder frames that cover real audio (not the padding),
//! L2-normalised.

use std::io::Cursor;
use std::sync::Arc;

use base64::Engine;
use candle_core::{Device, Module, Tensor};
use candle_nn::{Conv1d, Conv1dConfig, LayerNorm};
use prism_api::wire::node::EmbedInput;
use rustfft::num_complex::Complex;
use serde::Deserialize;

use super::cpu::prenorm::Shape;
use super::transformer::{self as core, Act, Blocks, WHISPER_NAMES};
use super::{
    device_name, AudioWindow, BackendError, Encoder, LoadSpec, LoadedModel, ModelInfo, Prepared, Preprocessor,
    TokenStates,
};

pub const SAMPLE_RATE: u32 = 16_000;
pub const N_FFT: usize = 400;
pub const HOP: usize = 160;
pub const N_SAMPLES: usize = 30 * SAMPLE_RATE as usize;
pub const N_FRAMES: usize = N_SAMPLES / HOP; // 3000 mel frames per 30 s window

#[derive(Debug, Clone, Deserialize)]
pub struct WhisperConfig {
    pub d_model: usize,
    pub encoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub num_mel_bins: usize,
    pub max_source_positions: usize,
    #[serde(default = "default_act")]
    pub activation_function: String,
}

fn default_act() -> String {
    "gelu".into()
}

/// Decodes a WAV byte string to mono f32 samples in [-1, 1], validating rate and length.
pub fn decode_wav(bytes: &[u8]) -> Result<Vec<f32>, BackendError> {
    let bad = |m: String| BackendError::Validation(m);
    let reader = hound::WavReader::new(Cursor::new(bytes))
        .map_err(|e| bad(format!("audio_base64 is not a readable WAV file: {e}")))?;
    let spec = reader.spec();
    if spec.sample_rate != SAMPLE_RATE {
        return Err(bad(format!(
            "audio must be sampled at 16000 Hz (whisper's rate), got {} Hz; resample it first, e.g. `sox in.wav -r 16000 out.wav`",
            spec.sample_rate
        )));
    }
    let channels = spec.channels.max(1) as usize;
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader
            .into_samples::<f32>()
            .collect::<Result<_, _>>()
            .map_err(|e| bad(format!("reading WAV samples: {e}")))?,
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample.clamp(1, 32) - 1)) as f32;
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<Result<_, _>>()
                .map_err(|e| bad(format!("reading WAV samples: {e}")))?
        }
    };
    let mono: Vec<f32> = interleaved.chunks(channels).map(|c| c.iter().sum::<f32>() / c.len() as f32).collect();
    if mono.is_empty() {
        return Err(bad("audio has no samples".into()));
    }
    if mono.len() > N_SAMPLES {
        return Err(bad(format!(
            "audio is {:.1} s long; whisper-encoder embeds at most 30 s per input (split longer audio)",
            mono.len() as f64 / SAMPLE_RATE as f64
        )));
    }
    if mono.iter().any(|x| !x.is_finite()) {
        return Err(bad("audio contains NaN or infinite samples".into()));
    }
    Ok(mono)
}

/// Slaney-style mel filter bank (librosa's default, which whisper's mel_filters.npz was made with):
/// `n_mels` rows of `1 + n_fft/2` weights.
pub fn mel_filters(sr: f64, n_fft: usize, n_mels: usize) -> Vec<f32> {
    let hz_to_mel = |f: f64| {
        let (f_sp, min_log_hz, min_log_mel, logstep) = (200.0 / 3.0, 1000.0, 15.0, (6.4f64).ln() / 27.0);
        if f >= min_log_hz {
            min_log_mel + (f / min_log_hz).ln() / logstep
        } else {
            f / f_sp
        }
    };
    let mel_to_hz = |m: f64| {
        let (f_sp, min_log_hz, min_log_mel, logstep) = (200.0 / 3.0, 1000.0, 15.0, (6.4f64).ln() / 27.0);
        if m >= min_log_mel {
            min_log_hz * (logstep * (m - min_log_mel)).exp()
        } else {
            f_sp * m
        }
    };
    let n_bins = 1 + n_fft / 2;
    let fft_freqs: Vec<f64> = (0..n_bins).map(|k| k as f64 * sr / n_fft as f64).collect();
    let (lo, hi) = (hz_to_mel(0.0), hz_to_mel(sr / 2.0));
    let mel_f: Vec<f64> = (0..n_mels + 2).map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (n_mels + 1) as f64)).collect();
    let mut w = vec![0f32; n_mels * n_bins];
    for i in 0..n_mels {
        let enorm = 2.0 / (mel_f[i + 2] - mel_f[i]);
        for (k, f) in fft_freqs.iter().enumerate() {
            let lower = (f - mel_f[i]) / (mel_f[i + 1] - mel_f[i]);
            let upper = (mel_f[i + 2] - f) / (mel_f[i + 2] - mel_f[i + 1]);
            w[i * n_bins + k] = (lower.min(upper).max(0.0) * enorm) as f32;
        }
    }
    w
}

/// Whisper's log-mel front end (see the module docs). Returns `[n_mels, 3000]` row-major.
pub struct LogMel {
    n_mels: usize,
    filters: Vec<f32>,
    window: Vec<f32>,
    fft: Arc<dyn rustfft::Fft<f32>>,
}

impl LogMel {
    pub fn new(n_mels: usize) -> Self {
        // Periodic Hann (torch.hann_window default), as in whisper's STFT.
        let window = (0..N_FFT)
            .map(|i| (0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / N_FFT as f64).cos()) as f32)
            .collect();
        let fft = rustfft::FftPlanner::<f32>::new().plan_fft_forward(N_FFT);
        Self { n_mels, filters: mel_filters(SAMPLE_RATE as f64, N_FFT, n_mels), window, fft }
    }

    pub fn compute(&self, samples: &[f32]) -> Vec<f32> {
        // Pad (never trim: inputs over 30 s are rejected earlier) to 30 s, then reflect-pad by
        // n_fft/2 on both sides (torch.stft center=True), which needs >= 201 samples: guaranteed
        // by the 30 s padding.
        let mut x = samples.to_vec();
        x.resize(N_SAMPLES, 0.0);
        let half = N_FFT / 2;
        let mut padded = Vec::with_capacity(N_SAMPLES + N_FFT);
        padded.extend((1..=half).rev().map(|i| x[i]));
        padded.extend_from_slice(&x);
        padded.extend((0..half).map(|i| x[N_SAMPLES - 2 - i]));

        let n_bins = 1 + N_FFT / 2;
        // A frame wholly inside the zero padding has no energy: its log-mel is log10(1e-10) =
        // -10 whatever the filters, so only the frames that reach real samples are transformed
        // (a 1 s clip: 101 of 3000 frames, ~30x less work per request).
        let silent = 1e-10f32.log10();
        let mut mel = vec![silent; self.n_mels * N_FRAMES];
        let live = (samples.len() + half).div_ceil(HOP).min(N_FRAMES);
        let mut buf = vec![Complex::new(0f32, 0f32); N_FFT];
        let mut power = vec![0f32; n_bins];
        // torch.stft yields N_FRAMES + 1 frames; whisper drops the last one.
        for t in 0..live {
            let frame = &padded[t * HOP..t * HOP + N_FFT];
            for (b, (s, w)) in buf.iter_mut().zip(frame.iter().zip(&self.window)) {
                *b = Complex::new(s * w, 0.0);
            }
            self.fft.process(&mut buf);
            for (p, c) in power.iter_mut().zip(&buf[..n_bins]) {
                *p = c.norm_sqr();
            }
            for m in 0..self.n_mels {
                let row = &self.filters[m * n_bins..(m + 1) * n_bins];
                let e: f32 = row.iter().zip(&power).map(|(a, b)| a * b).sum();
                mel[m * N_FRAMES + t] = e.max(1e-10).log10();
            }
        }
        let max = mel.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for v in mel.iter_mut() {
            *v = (v.max(max - 8.0) + 4.0) / 4.0;
        }
        mel
    }
}

/// Number of encoder frames (after conv2's stride 2) that cover `n_samples` of real audio.
pub fn real_encoder_frames(n_samples: usize) -> usize {
    let mel_frames = n_samples.div_ceil(HOP);
    mel_frames.div_ceil(2).clamp(1, N_FRAMES / 2)
}

/// One preprocessed clip: its log-mel window and how many encoder frames are real audio.
pub struct AudioFeatures {
    pub mel: Vec<f32>,
    pub real_frames: usize,
}

/// Extracts the WAV bytes of an audio input, or says why the input is not audio.
pub fn input_audio(input: &EmbedInput) -> Result<Vec<u8>, BackendError> {
    let msg = "this is an audio node: each input must be {\"audio_base64\": \"<16 kHz WAV, base64>\"}";
    let EmbedInput::Item(item) = input else {
        return Err(BackendError::Validation(msg.into()));
    };
    let (Some(b64), None, None, None) = (&item.audio_base64, &item.text, &item.image_base64, &item.embeddings) else {
        return Err(BackendError::Validation(msg.into()));
    };
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| BackendError::Validation(format!("audio_base64 is not valid base64: {e}")))
}

pub struct WhisperPreprocessor {
    logmel: LogMel,
    window: AudioWindow,
    /// How far (in encoder frames) the real frames' outputs can see past the clip's end: layers x
    /// band radius under sliding-window attention, `None` under full attention.
    reach: Option<usize>,
}

/// Encoder frames to compute for a clip of `real_frames`. [`AudioWindow::Clip`]: those frames
/// only. [`AudioWindow::Full`]: enough that they come out as in the whole 30 s window: all 1500
/// under full attention; under a band of radius r over l layers, frame t depends only on frames
/// up to t + l·r, so the rest of the window is never computed.
pub fn frames_to_compute(real_frames: usize, reach: Option<usize>, window: AudioWindow) -> usize {
    match (window, reach) {
        (AudioWindow::Clip, _) => real_frames.min(N_FRAMES / 2),
        (AudioWindow::Full, Some(reach)) => (real_frames + reach).min(N_FRAMES / 2),
        (AudioWindow::Full, None) => N_FRAMES / 2,
    }
}

impl Preprocessor for WhisperPreprocessor {
    fn preprocess(&self, input: &EmbedInput) -> Result<Prepared, BackendError> {
        let samples = decode_wav(&input_audio(input)?)?;
        let real_frames = real_encoder_frames(samples.len());
        let mel = self.logmel.compute(&samples);
        // A clip costs its own frames; under AudioWindow::Full, a whole 30 s window (1500
        // encoder positions), or under a sliding window its frames and the band's reach.
        Ok(Prepared::new(frames_to_compute(real_frames, self.reach, self.window), AudioFeatures { mel, real_frames }))
    }

    fn warmup_input(&self) -> EmbedInput {
        // One second of a 440 Hz tone: exercises the whole path with a valid WAV.
        let samples: Vec<f32> = (0..SAMPLE_RATE)
            .map(|i| 0.3 * (2.0 * std::f32::consts::PI * 440.0 * i as f32 / SAMPLE_RATE as f32).sin())
            .collect();
        EmbedInput::Item(prism_api::wire::node::InputItem {
            audio_base64: Some(base64::engine::general_purpose::STANDARD.encode(wav_bytes(&samples))),
            ..Default::default()
        })
    }
}

/// Encodes mono f32 samples as a 16 kHz PCM16 WAV (warm-up input, tests).
pub fn wav_bytes(samples: &[f32]) -> Vec<u8> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: SAMPLE_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut out = Cursor::new(Vec::new());
    // Writing to memory cannot fail for I/O reasons; a failure would only leave the buffer short,
    // which the preprocessor then rejects as an invalid WAV rather than panicking.
    if let Ok(mut w) = hound::WavWriter::new(&mut out, spec) {
        for s in samples {
            let _ = w.write_sample((s.clamp(-1.0, 1.0) * 32767.0) as i16);
        }
        let _ = w.finalize();
    }
    out.into_inner()
}

pub struct WhisperEncoder {
    conv1: Conv1d,
    conv2: Conv1d,
    positions: Tensor,
    blocks: Blocks,
    ln_post: LayerNorm,
    n_mels: usize,
    device: Device,
    /// See [`WhisperPreprocessor::reach`].
    reach: Option<usize>,
    window: AudioWindow,
}

impl WhisperEncoder {
    /// Encoder states of the first `frames` positions [b, frames, d] for a [b, n_mels, 3000]
    /// log-mel batch (whisper's own output is `frames` = 1500). Under sliding-window
    /// attention the first `frames - reach` of them equal those of the whole window (see
    /// [`frames_to_compute`]); under full attention only `frames = 1500` is whisper.
    pub fn forward_frames(&self, mel: &Tensor, frames: usize) -> candle_core::Result<Tensor> {
        // conv2 output t reads mel frames 2t-2..=2t+2: 2·frames + 2 of them keep it exact.
        let mel_frames = (2 * frames + 2).min(mel.dim(2)?);
        let x = self.conv1.forward(&mel.narrow(2, 0, mel_frames)?)?.gelu_erf()?;
        let x = self.conv2.forward(&x)?.gelu_erf()?;
        let x = x.transpose(1, 2)?;
        let n = x.dim(1)?.min(frames);
        let x = x.narrow(1, 0, n)?;
        let x = x.broadcast_add(&self.positions.narrow(0, 0, n)?)?;
        let x = self.blocks.forward(&x)?;
        self.ln_post.forward(&x)
    }
}

impl Encoder for WhisperEncoder {
    fn encode_batch(&mut self, batch: &[Prepared]) -> Result<Vec<Vec<f32>>, BackendError> {
        self.item_states(batch)?.iter().map(|(frames, n)| core::mean_pool_l2(frames, *n)).collect()
    }

    fn encode_tokens(&mut self, batch: &[Prepared]) -> Result<Vec<TokenStates>, BackendError> {
        self.item_states(batch)?
            .into_iter()
            .map(|(frames, n)| {
                let frames = frames.narrow(0, 0, n.min(frames.dim(0)?))?;
                Ok(TokenStates { dim: frames.dim(1)?, values: frames.flatten_all()?.to_vec1()? })
            })
            .collect()
    }
}

impl WhisperEncoder {
    /// Each item's encoder states [frames, d] with its number of real frames, in batch order.
    /// Items run together when they need the same frames (a padded 30 s window needs all 1500;
    /// clips of one length); a clip computed over its own frames runs apart from longer ones, or
    /// it would attend to frames past its end that it never has alone.
    fn item_states(&self, batch: &[Prepared]) -> Result<Vec<(Tensor, usize)>, BackendError> {
        let items: Vec<&AudioFeatures> =
            batch.iter().map(|p| p.payload::<AudioFeatures>()).collect::<Result<_, _>>()?;
        let mut groups: std::collections::BTreeMap<usize, Vec<usize>> = std::collections::BTreeMap::new();
        for (i, it) in items.iter().enumerate() {
            // Under Full the whole batch is one group: the longest item's frames (1500, or its
            // reach under a band) keep every item exact.
            let key = match self.window {
                AudioWindow::Full => 0,
                AudioWindow::Clip => frames_to_compute(it.real_frames, self.reach, self.window),
            };
            groups.entry(key).or_default().push(i);
        }
        let mut out: Vec<Option<(Tensor, usize)>> = vec![None; items.len()];
        for idx in groups.into_values() {
            let group: Vec<&AudioFeatures> = idx.iter().map(|i| items[*i]).collect();
            let states = self.states(&group)?;
            for (k, i) in idx.into_iter().enumerate() {
                out[i] = Some((states.get(k)?, items[i].real_frames));
            }
        }
        out.into_iter().map(|s| s.ok_or_else(|| BackendError::Inference("an item was not encoded".into()))).collect()
    }

    /// Encoder states [b, frames, d] of a batch, as many frames as its longest clip needs.
    fn states(&self, items: &[&AudioFeatures]) -> Result<Tensor, BackendError> {
        let mut flat = Vec::with_capacity(items.len() * self.n_mels * N_FRAMES);
        for it in items {
            flat.extend_from_slice(&it.mel);
        }
        let mel = Tensor::from_vec(flat, (items.len(), self.n_mels, N_FRAMES), &self.device)?;
        let longest = items.iter().map(|it| it.real_frames).max().unwrap_or(1);
        Ok(self.forward_frames(&mel, frames_to_compute(longest, self.reach, self.window))?)
    }
}

pub fn load(spec: &LoadSpec) -> Result<LoadedModel, BackendError> {
    let device = spec.device.resolve()?;
    let cfg: WhisperConfig = serde_json::from_str(&core::read_model_file(&spec.dir, "config.json")?)
        .map_err(|e| BackendError::Load(format!("config.json is not a whisper config: {e}")))?;
    if cfg.max_source_positions * 2 != N_FRAMES {
        return Err(BackendError::Load(format!(
            "max_source_positions {} does not match 30 s windows (1500)",
            cfg.max_source_positions
        )));
    }
    let act = Act::from_hf(&cfg.activation_function)?;
    let vb = core::var_builder(spec, &device)?;
    let vb = if vb.contains_tensor("model.encoder.conv1.weight") { vb.pp("model.encoder") } else { vb.pp("encoder") };
    let d = cfg.d_model;
    let radius = spec.attention_window.map(core::band_radius);
    let reach = radius.map(|r| r * cfg.encoder_layers);
    let c1 = Conv1dConfig { padding: 1, stride: 1, ..Default::default() };
    let c2 = Conv1dConfig { padding: 1, stride: 2, ..Default::default() };
    let e = core::load_err("whisper encoder weights");
    let layers: Vec<candle_nn::VarBuilder> = (0..cfg.encoder_layers).map(|i| vb.pp(format!("layers.{i}"))).collect();
    let shape = Shape { hidden: d, heads: cfg.encoder_attention_heads, ffn: cfg.encoder_ffn_dim, eps: 1e-5 };
    let blocks = Blocks::load(&layers, &WHISPER_NAMES, shape, act, radius, &device, "whisper encoder weights")?;
    tracing::info!(kernels = blocks.kernels(), "audio encoder blocks");
    let encoder = WhisperEncoder {
        conv1: candle_nn::conv1d(cfg.num_mel_bins, d, 3, c1, vb.pp("conv1")).map_err(&e)?,
        conv2: candle_nn::conv1d(d, d, 3, c2, vb.pp("conv2")).map_err(&e)?,
        positions: vb.get((cfg.max_source_positions, d), "embed_positions.weight").map_err(&e)?,
        blocks,
        ln_post: candle_nn::layer_norm(d, 1e-5, vb.pp("layer_norm")).map_err(&e)?,
        n_mels: cfg.num_mel_bins,
        device: device.clone(),
        reach,
        window: spec.audio_window,
    };
    Ok(LoadedModel {
        info: ModelInfo {
            modality: "audio".into(),
            architecture: "whisper-encoder".into(),
            dim: d,
            device: device_name(&device),
            max_input_tokens: None,
            classifier: None,
        },
        preprocessor: Arc::new(WhisperPreprocessor {
            logmel: LogMel::new(cfg.num_mel_bins),
            reach,
            window: spec.audio_window,
        }),
        encoder: Box::new(encoder),
    })
}
