//! `prism train shared-space` end to end on real weights and real data: scikit-learn's digits,
//! their names embedded by all-MiniLM-L6-v2, the names spoken by espeak-ng through whisper-base.
//! A subset keeps it short (whisper over each clip's own frames costs ~0.1 s a clip on two cores; `make
//! bench-models` runs the whole set). The folders it writes must serve the shared space through
//! the node's normal loader: "seven" lands nearer a handwritten 7 than any other digit.

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use prism_api::wire::node::{EmbedInput, InputItem};
use prism_node::backend::{self, DeviceChoice, LoadSpec, LoadedModel};
use serde_json::{json, Value};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A smaller paired set over the real files: every held-out image and phrasing, 400 train
/// images, train speech from two accents and held-out speech from one unseen accent.
fn subset(data: &Path, to: &Path) {
    let m: Value =
        serde_json::from_slice(&std::fs::read(data.join("manifest.json")).expect(
            "no .cache/data/digits-pairs/manifest.json: run `make models` (it runs scripts/make-digits-pairs.py)",
        ))
        .unwrap();
    let images: Vec<&Value> = m["images"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["split"] == "test")
        .chain(m["images"].as_array().unwrap().iter().filter(|i| i["split"] == "train").take(400))
        .collect();
    let audio: Vec<&Value> = m["audio"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| {
            let v = a["voice"].as_str().unwrap();
            v.starts_with("en-gb+") || v.starts_with("en-us+") || v == "en-029+m1"
        })
        .collect();
    for d in ["images", "audio"] {
        std::os::unix::fs::symlink(data.join(d), to.join(d)).unwrap();
    }
    let sub = json!({"labels": m["labels"], "images": images, "texts": m["texts"], "audio": audio});
    std::fs::write(to.join("manifest.json"), serde_json::to_vec(&sub).unwrap()).unwrap();
}

fn load(arch: &str, dir: &Path) -> LoadedModel {
    backend::load(arch, &LoadSpec::new(dir.to_path_buf(), DeviceChoice::Cpu))
        .unwrap_or_else(|e| panic!("loading {} as {arch}: {e}", dir.display()))
}

fn embed(model: &mut LoadedModel, input: EmbedInput) -> Vec<f32> {
    let p = model.preprocessor.preprocess(&input).unwrap();
    model.encoder.encode_batch(&[p]).unwrap().remove(0)
}

fn file_item(path: &Path, audio: bool) -> EmbedInput {
    let b64 = Some(base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap()));
    EmbedInput::Item(if audio {
        InputItem { audio_base64: b64, ..Default::default() }
    } else {
        InputItem { image_base64: b64, ..Default::default() }
    })
}

/// `prism train <args>` over `data` with the three encoders of `make models`, into `out`.
fn prism_train(args: &[&str], data: &Path, out: &Path) -> std::process::Output {
    let models = repo().join(".cache/models");
    Command::new(env!("CARGO_BIN_EXE_prism"))
        .arg("train")
        .args(args)
        .arg("--data")
        .arg(data)
        .arg("--text-model")
        .arg(models.join("all-minilm-l6-v2"))
        .arg("--vision-model")
        .arg(models.join("vit-digits"))
        .arg("--audio-model")
        .arg(models.join("whisper-base-encoder"))
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn metric(line: &str, key: &str) -> f64 {
    let v = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} in {line}"));
    v.parse().unwrap()
}

#[test]
fn trained_heads_put_text_and_speech_next_to_the_right_digit_images() {
    let data = repo().join(".cache/data/digits-pairs");
    let tmp = tempfile::tempdir().unwrap();
    let sub = tmp.path().join("data");
    std::fs::create_dir(&sub).unwrap();
    subset(&data, &sub);
    let out = tmp.path().join("space");
    let run = prism_train(&["shared-space", "--steps", "300"], &sub, &out);
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "prism train failed:\n{stderr}");
    assert!(stderr.contains("train: step 300/300 loss"), "progress lines:\n{stderr}");
    let line = stdout.lines().find(|l| l.starts_with("train: ")).expect("summary line");
    // Held out: 500 images, 4 unseen phrasings per digit, speech in an accent never heard.
    let (text, audio) = (metric(line, "text_to_image_top1"), metric(line, "audio_to_image_top1"));
    assert!(text >= 0.8, "text->image top-1 {text} (chance 0.1): {line}");
    assert!(audio >= 0.5, "audio->image top-1 {audio} (chance 0.1): {line}");
    let report: Value = serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    assert!(report["text_to_image_top1_untrained"].as_f64().unwrap() < text - 0.3, "{report}");
    assert!(report["audio_to_image_top1_untrained"].as_f64().unwrap() < audio - 0.3, "{report}");
    assert!(std::fs::read_to_string(out.join("model_card.md")).unwrap().contains("| text |"));
    // The classification head every folder serves: held-out digits by label, per modality and mixed.
    let label = |k: &str| metric(line, &format!("label_top1_{k}"));
    assert!(label("vision") >= 0.8, "vision labels top-1 {} (chance 0.1): {line}", label("vision"));
    assert!(label("text") >= 0.8, "text labels top-1 {} (chance 0.1): {line}", label("text"));
    assert!(label("audio") >= 0.5, "audio labels top-1 {} (chance 0.1): {line}", label("audio"));
    assert!(label("fused") >= label("audio"), "mixing the three loses to audio alone: {line}");

    // The written folders are served through the node's loader, heads applied.
    let mut vision = load("vit", &out.join("vision"));
    let mut text_model = load("bert", &out.join("text"));
    let mut audio_model = load("whisper-encoder", &out.join("audio"));
    assert_eq!((text_model.info.dim, audio_model.info.dim), (vision.info.dim, vision.info.dim));
    let m: Value = serde_json::from_slice(&std::fs::read(sub.join("manifest.json")).unwrap()).unwrap();
    let held_out_image = |label: u64| {
        let file =
            m["images"].as_array().unwrap().iter().find(|i| i["split"] == "test" && i["label"] == label).unwrap()
                ["file"]
                .as_str()
                .unwrap()
                .to_string();
        sub.join(file)
    };
    let images: Vec<Vec<f32>> = (0..10).map(|l| embed(&mut vision, file_item(&held_out_image(l), false))).collect();
    // Served vectors, nearest of one held-out image per digit: every held-out phrasing, and most
    // clips of the unseen accent (the training report above counts over all 500 images).
    let nearest = |v: &[f32]| {
        let sims: Vec<f32> = images.iter().map(|img| dot(v, img)).collect();
        sims.iter().enumerate().fold(0, |b, (i, s)| if *s > sims[b] { i } else { b })
    };
    const NAMES: [&str; 10] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"];
    let (mut text_hits, mut speech_hits) = (0, 0);
    for (label, name) in NAMES.iter().enumerate() {
        let t = embed(&mut text_model, EmbedInput::Text(format!("a photo of the digit {name}")));
        text_hits += usize::from(nearest(&t) == label);
        let s = embed(&mut audio_model, file_item(&sub.join(format!("audio/en-029+m1-{label}.wav")), true));
        speech_hits += usize::from(nearest(&s) == label);
    }
    // The served labels: the head loaded beside each model, applied to what it serves.
    let head = text_model.info.classifier.clone().expect("the text folder serves classifier.json");
    assert_eq!(vision.info.classifier.as_ref().map(|c| c.labels.clone()), Some(NAMES.map(String::from).to_vec()));
    let named = NAMES
        .iter()
        .filter(|name| {
            head.classify(&embed(&mut text_model, EmbedInput::Text(format!("the number {name}"))))[0].label == **name
        })
        .count();
    assert!(named >= 9, "served text labels named the digit {named}/10 times");
    eprintln!("served: text {text_hits}/10, speech {speech_hits}/10, text labels {named}/10 ({line})");
    assert!(text_hits >= 9, "served text heads found the right digit {text_hits}/10 times");
    assert!(speech_hits >= 6, "served speech heads found the right digit {speech_hits}/10 times");

    // A head trained for another encoder is refused with a reason, not served wrongly.
    let wrong = tmp.path().join("wrong");
    std::fs::create_dir(&wrong).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(out.join("text").join(f), wrong.join(f)).unwrap();
    }
    std::fs::copy(out.join("audio/projection.safetensors"), wrong.join("projection.safetensors")).unwrap();
    let err = backend::load("bert", &LoadSpec::new(wrong, DeviceChoice::Cpu))
        .err()
        .expect("a 512-d head on a 384-d model must not load");
    assert!(err.to_string().contains("trained for another model"), "{err}");

    corrections_through_the_router_improve_the_space(tmp.path(), &out, &sub);
}

/// One blocking HTTP/1.1 exchange with a JSON body; (status, parsed body).
fn http(method: &str, url: &str, body: Option<&Value>) -> (u16, Value) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_once('/').map(|(a, p)| (a, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let json = raw.split_once("\r\n\r\n").and_then(|(_, b)| serde_json::from_str(b).ok()).unwrap_or(Value::Null);
    (status, json)
}

/// The memory loop as a user runs it: `prism up` serves the trained text head with memory on
/// (inputs logged verbatim), users query in German, which the English-trained head has never
/// seen, and correct the answers with the right digit; the router's training set feeds `prism
/// train from-corrections`, whose new revision must find the right digit for German phrasings
/// held out of training far more often, and keep what it knew (English held-out split).
fn corrections_through_the_router_improve_the_space(tmp: &Path, space: &Path, data: &Path) {
    use std::io::{BufRead, BufReader};
    const GERMAN: [&str; 10] = ["null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"];
    const NAMES: [&str; 10] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"];
    const PHRASES: [&str; 10] = [
        "{w}",
        "die Zahl {w}",
        "die Ziffer {w}",
        "eine handgeschriebene {w}",
        "Nummer {w}",
        "ein Bild der Zahl {w}",
        "eine {w} von Hand geschrieben",
        "das ist eine {w}",
        "zeig mir eine {w}",
        "ich suche die {w}",
    ];
    let manifest = tmp.join("digits.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: prism.dev/v1alpha1\nkind: ModalityNode\nmetadata: {{name: text}}\nspec:\n  modality: text\n  model: {{uri: 'file://{}', architecture: bert, revision: '1'}}\n  device: cpu\n---\napiVersion: prism.dev/v1alpha1\nkind: MultimodalPipeline\nmetadata: {{name: digits}}\nspec:\n  nodes:\n  - {{name: text, required: true}}\n  memory: {{enabled: true, inputs: full}}\n",
            space.join("text").display()
        ),
    )
    .unwrap();
    let mut up = Command::new(env!("CARGO_BIN_EXE_prism"))
        .args(["up", "-f", manifest.to_str().unwrap(), "--port", "0", "--prometheus", "off"])
        .arg("--state-dir")
        .arg(tmp.join("state"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = up.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(u) = line.strip_prefix("router: ") {
                let _ = tx.send(u.trim().to_string());
            }
        }
    });
    let router = rx.recv_timeout(std::time::Duration::from_secs(180)).expect("prism up printed `router: URL`");
    let exported = {
        let t0 = std::time::Instant::now();
        while http("GET", &format!("{router}/ready"), None).0 != 200 {
            assert!(t0.elapsed().as_secs() < 120, "router not ready");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        // The node's classification head reaches the client: the text modality's labels, and
        // the answer's labels (the mixture over the modalities with a head; here the one).
        let ask = json!({"inputs": {"text": "a photo of the digit seven"}});
        let (status, v) = http("POST", &format!("{router}/v1/infer"), Some(&ask));
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["modalities"]["text"]["labels"][0]["label"], "seven", "{v}");
        assert_eq!(v["labels"][0]["label"], "seven", "{v}");
        assert!(v["labels"][0]["score"].as_f64().unwrap() > 0.5, "{v}");
        for (label, word) in GERMAN.iter().enumerate() {
            for p in PHRASES {
                let q = p.replace("{w}", word);
                let (status, v) = http("POST", &format!("{router}/v1/infer"), Some(&json!({"inputs": {"text": q}})));
                assert_eq!((status, &v["recorded"]), (200, &json!(true)), "{v}");
                let correction = json!({"requestId": v["id"], "correct": false, "answer": {"label": NAMES[label]}});
                let (status, v) = http("POST", &format!("{router}/v1/memory/corrections"), Some(&correction));
                assert_eq!(status, 201, "{v}");
            }
        }
        let (status, v) = http("GET", &format!("{router}/v1/memory/corrections"), None);
        assert_eq!(status, 200);
        v
    };
    // SAFETY: SIGTERM to the prism up this test started; it stops its node and router.
    unsafe {
        libc::kill(up.id() as libc::pid_t, libc::SIGTERM);
    }
    let _ = up.wait();
    assert_eq!(exported["corrections"].as_array().map(Vec::len), Some(100));
    let corrections = tmp.join("corrections.json");
    std::fs::write(&corrections, exported.to_string()).unwrap();

    let parent_head = std::fs::read(space.join("text/projection.safetensors")).unwrap();
    let rev2 = tmp.join("text-rev2");
    let run = Command::new(env!("CARGO_BIN_EXE_prism"))
        .args(["train", "from-corrections", "--modality", "text"])
        .arg("--corrections")
        .arg(&corrections)
        .arg("--model")
        .arg(space.join("text"))
        .arg("--vision-model")
        .arg(space.join("vision"))
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(&rev2)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "from-corrections failed:\n{}", String::from_utf8_lossy(&run.stderr));
    let line = stdout.lines().find(|l| l.starts_with("train: ")).expect("summary line");
    eprintln!("{line}");
    let gain = metric(line, "correction_gain");
    assert!(gain >= 0.3, "corrections must measurably help on held-out German phrasings: {line}");
    assert!(metric(line, "after_top1") >= 0.8, "{line}");
    assert!(metric(line, "data_after_top1") >= metric(line, "data_before_top1") - 0.05, "English forgotten: {line}");
    // The parent revision is untouched (the new folder links its weights, never its head).
    assert_eq!(std::fs::read(space.join("text/projection.safetensors")).unwrap(), parent_head);
    let mut served = load("bert", &rev2);
    assert_eq!(served.info.dim, 64);
    let _ = embed(&mut served, EmbedInput::Text("die Ziffer sieben".into()));
}

/// `prism train fusion` as `make train-fusion` runs it, on the whole corrupted set (whisper's
/// ~8 min over its 240 noisy clips is paid once: the vectors are cached in the data folder, and
/// the folders it writes are the ones `make demo` serves). The trained fusion must beat the best
/// single modality by the 0.10 top-1, and the written folders must serve it: labels
/// from the fusion node's own head, for held-out pairs run through the real encoders.
#[test]
fn trained_fusion_nodes_beat_each_modality_alone_on_corrupted_digits() {
    let data = repo().join(".cache/data/digits-pairs");
    let models = repo().join(".cache/models");
    let out = models.join("digits-fusion");
    let run = prism_train(&["fusion"], &data, &out);
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "prism train fusion failed:\n{stderr}");
    assert!(stderr.contains("train mot-fusion: step 3000/3000 loss"), "progress lines:\n{stderr}");
    let line = stdout.lines().find(|l| l.starts_with("train: ")).expect("summary line");
    let (fused, single) = (metric(line, "fusion_top1"), metric(line, "best_single_top1"));
    assert!(fused >= single + 0.10, "trained fusion {fused} vs best single modality {single}: {line}");
    assert!(metric(line, "late_fusion_top1") < fused, "late fusion beats the trained nodes: {line}");
    assert!(metric(line, "perceiver_top1") > single, "perceiver below the best single modality: {line}");
    let card = std::fs::read_to_string(out.join("model_card.md")).unwrap();
    assert!(card.contains("| mot-fusion |"), "{card}");

    // Held-out pairs through the real encoders and the served folders: one per digit, a wiped
    // image and its name cut short under noise, in an accent never heard in training.
    let m: Value = serde_json::from_slice(&std::fs::read(data.join("manifest.json")).unwrap()).unwrap();
    let first = |kind: &str, label: u64| {
        let items = m["corrupted"][kind].as_array().unwrap();
        let item = items.iter().find(|i| i["split"] == "test" && i["label"] == label).unwrap();
        data.join(item["file"].as_str().unwrap())
    };
    let mut vision = load("vit", &models.join("vit-digits"));
    let mut audio = load("whisper-encoder", &models.join("whisper-base-encoder"));
    let pairs: Vec<(Vec<f32>, Vec<f32>)> = (0..10u64)
        .map(|l| {
            (
                embed(&mut vision, file_item(&first("images", l), false)),
                embed(&mut audio, file_item(&first("audio", l), true)),
            )
        })
        .collect();
    const NAMES: [&str; 10] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"];
    for (arch, folder) in [("mot-fusion", "mot"), ("perceiver-fusion", "perceiver")] {
        let mut node = load(arch, &out.join(folder));
        let head = node.info.classifier.clone().expect("the fusion folder serves classifier.json");
        assert_eq!(head.labels, NAMES.map(String::from).to_vec());
        let fuse = |node: &mut LoadedModel, mods: &[(&str, &Vec<f32>)]| {
            let map = mods.iter().map(|(k, v)| (k.to_string(), (*v).clone())).collect();
            embed(node, EmbedInput::Item(InputItem { embeddings: Some(map), ..Default::default() }))
        };
        let mut hits = 0;
        for (l, (v, a)) in pairs.iter().enumerate() {
            let fused = fuse(&mut node, &[("vision", v), ("audio", a)]);
            hits += usize::from(head.classify(&fused)[0].label == NAMES[l]);
            // A modality missing still gets an answer over the ten digits.
            assert_eq!(head.classify(&fuse(&mut node, &[("audio", a)])).len(), 10);
        }
        eprintln!("{arch}: served labels right for {hits}/10 held-out pairs ({line})");
        assert!(hits >= 6, "{arch}: served labels named the digit {hits}/10 times");
    }
}

/// `prism train fusion --tokens` on a small corrupted subset (one train and one held-out item per
/// digit and modality, 100 steps): both networks train on the same batches over patch, frame and
/// word tokens, the report compares them per training FLOP, and the folders serve token inputs.
#[test]
fn token_fusion_compares_mot_with_dense_and_serves_token_sequences() {
    let data = repo().join(".cache/data/digits-pairs");
    let tmp = tempfile::tempdir().unwrap();
    let m: Value = serde_json::from_slice(&std::fs::read(data.join("manifest.json")).unwrap()).unwrap();
    let pick = |kind: &str| -> Vec<Value> {
        let items = m["corrupted"][kind].as_array().unwrap();
        (0..10u64)
            .flat_map(|l| {
                ["train", "test"].map(|split| {
                    items.iter().find(|i| i["label"] == l && i["split"] == split).cloned().expect("an item per digit")
                })
            })
            .collect()
    };
    std::os::unix::fs::symlink(data.join("corrupted"), tmp.path().join("corrupted")).unwrap();
    let sub = json!({"labels": m["labels"], "images": [], "texts": m["texts"], "audio": [],
        "corrupted": {"images": pick("images"), "audio": pick("audio"), "recipe": m["corrupted"]["recipe"]}});
    std::fs::write(tmp.path().join("manifest.json"), serde_json::to_vec(&sub).unwrap()).unwrap();
    let out = tmp.path().join("out");
    let run = prism_train(&["fusion", "--tokens", "--steps", "100"], tmp.path(), &out);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "prism train fusion --tokens failed:\n{stderr}");
    assert!(stderr.contains("tokens per input vision 16 audio 16 text 8"), "{stderr}");
    let line = String::from_utf8_lossy(&run.stdout).lines().find(|l| l.starts_with("train: ")).unwrap().to_string();
    assert!(line.contains("mot_flops_vs_dense="), "{line}");
    let r: Value = serde_json::from_slice(&std::fs::read(out.join("tokens/metrics.json")).unwrap()).unwrap();
    assert_eq!(r["curve"].as_array().unwrap().len(), 1, "one evaluation per 100 steps: {r}");
    assert!(r["mot_params"].as_u64() > r["dense_params"].as_u64(), "the MoT has per-modality weights: {r}");
    for (key, v) in [("mot_loss", &r["mot_loss"]), ("dense_loss", &r["dense_loss"])] {
        assert!(v.as_f64().is_some_and(|x| x.is_finite() && x > 0.0), "{key}: {r}");
    }

    // The folders serve: 16 patch tokens and 16 frame tokens in, ten digit scores out; a pooled
    // vector where tokens are expected is refused with the expected length.
    let models = repo().join(".cache/models");
    let image = file_item(&data.join(pick("images")[1]["file"].as_str().unwrap()), false);
    let clip = file_item(&data.join(pick("audio")[1]["file"].as_str().unwrap()), true);
    let tokens = |arch: &str, dir: &str, input: EmbedInput| {
        let mut model = load(arch, &models.join(dir));
        let p = model.preprocessor.preprocess(&input).unwrap();
        model.encoder.encode_tokens(&[p]).unwrap().remove(0).resample(16)
    };
    let (v, a) = (tokens("vit", "vit-digits", image), tokens("whisper-encoder", "whisper-base-encoder", clip));
    for (arch, folder) in [("mot-fusion", "mot"), ("dense-fusion", "dense")] {
        let mut node = load(arch, &out.join("tokens").join(folder));
        let head = node.info.classifier.clone().expect("classifier.json");
        let map = [("vision".to_string(), v.clone()), ("audio".to_string(), a.clone())].into();
        let fused = embed(&mut node, EmbedInput::Item(InputItem { embeddings: Some(map), ..Default::default() }));
        assert_eq!(head.classify(&fused).len(), 10);
        let pooled = [("vision".to_string(), vec![0.1f32; 64])].into();
        let err = node
            .preprocessor
            .preprocess(&EmbedInput::Item(InputItem { embeddings: Some(pooled), ..Default::default() }))
            .expect_err("a pooled vector is not 16 tokens");
        assert!(err.to_string().contains("expects 1024"), "{arch}: {err}");
    }
}
