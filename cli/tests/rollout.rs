//! Canary rollouts end to end under `prism up`: real node processes (all-MiniLM-L6-v2), a real
//! router with memory, a user who corrects answers through `POST /v1/memory/corrections`.
//!
//! 1. The manifest's text model is changed to a deliberately worse revision (the same encoder
//!    with a random 384x384 projection head): a canary starts with half the traffic, the user's
//!    corrections show its answers are wrong, and it is rolled back without anyone acting;
//!    revision 1 keeps serving and the bad revision is not retried.
//! 2. The model is changed to a good revision (the same weights under a new revision): its
//!    canary passes the analysis and is promoted; every replica then runs it.
//!
//! No request fails during either rollout.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{models, Up};
use serde_json::{json, Value};

fn manifest(dir: &str, revision: &str) -> String {
    format!(
        r#"
apiVersion: prism.dev/v1alpha1
kind: ModalityNode
metadata: {{name: text}}
spec:
  modality: text
  model: {{uri: pvc://models/{dir}, architecture: bert, revision: "{revision}"}}
  replicas: {{min: 1, max: 1}}
  batching: {{maxBatch: 8, maxWaitMs: 2}}
  device: cpu
  rollout:
    steps: [{{weight: 50, pauseSeconds: 4}}]
    analysis: {{minCalls: 20, minCorrections: 10, maxAccuracyDrop: 0.1, maxLatencyRatio: 3}}
---
apiVersion: prism.dev/v1alpha1
kind: MultimodalPipeline
metadata: {{name: canary}}
spec:
  nodes: [{{name: text, required: true}}]
  memory: {{enabled: true}}
"#
    )
}

/// Labelled sentences: the user's notion of a right answer is "the answer vector is nearest to
/// the centroid of its own label" (centroids measured on revision 1).
const LABELLED: &[(&str, &[&str])] = &[
    ("dogs", &["a puppy chasing a ball in the park", "my dog barks at the mailman", "the retriever fetched the stick"]),
    (
        "cars",
        &[
            "the engine of my car overheated",
            "he parked the sedan in the garage",
            "electric vehicles need charging stations",
        ],
    ),
    ("food", &["a bowl of spicy ramen noodles", "she baked fresh bread this morning", "the pizza had too much cheese"]),
    ("weather", &["heavy rain is expected tomorrow", "the snowstorm closed the highway", "a sunny and warm afternoon"]),
    (
        "music",
        &["the guitarist played a long solo", "the orchestra tuned their violins", "a catchy pop song on the radio"],
    ),
];

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-12)
}

struct User {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    router: String,
    centroids: BTreeMap<&'static str, Vec<f64>>,
    failed: u64,
}

/// One answer: (revision that served it, vector).
async fn infer(http: &reqwest::Client, router: &str, text: &str) -> Result<(String, String, Vec<f64>), String> {
    let r = http
        .post(format!("{router}/v1/infer"))
        .json(&json!({"inputs": {"text": text}}))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status();
    let body: Value = r.json().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("HTTP {status}: {body}"));
    }
    let text = &body["modalities"]["text"];
    let v: Vec<f64> = text["embedding"].as_array().ok_or("no embedding")?.iter().filter_map(Value::as_f64).collect();
    Ok((
        body["id"].as_str().unwrap_or_default().to_string(),
        text["replica"]["revision"].as_str().unwrap_or_default().to_string(),
        v,
    ))
}

impl User {
    fn new(router: &str) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let mut centroids = BTreeMap::new();
        for (label, texts) in LABELLED {
            let mut c = vec![0.0; 384];
            for t in *texts {
                let (_, _, v) = rt.block_on(infer(&http, router, t)).expect("revision 1 answers");
                c.iter_mut().zip(&v).for_each(|(c, x)| *c += x);
            }
            centroids.insert(*label, c);
        }
        Self { rt, http, router: router.to_string(), centroids, failed: 0 }
    }

    /// Asks one labelled sentence, judges the answer, sends the correction. Returns the revision
    /// that answered and whether it was right.
    fn ask_and_correct(&mut self, i: usize) -> Option<(String, bool)> {
        let (label, texts) = LABELLED[i % LABELLED.len()];
        let text = texts[(i / LABELLED.len()) % texts.len()];
        let (id, revision, v) = match self.rt.block_on(infer(&self.http, &self.router, text)) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("request failed: {e}");
                self.failed += 1;
                return None;
            }
        };
        let best = self
            .centroids
            .iter()
            .max_by(|a, b| cosine(a.1, &v).total_cmp(&cosine(b.1, &v)))
            .map(|(l, _)| *l)
            .unwrap_or_default();
        let right = best == label;
        let url = format!("{}/v1/memory/corrections", self.router);
        let body = json!({"requestId": id, "correct": right});
        let req = self.http.post(url).json(&body).timeout(Duration::from_secs(10));
        let r = self.rt.block_on(async move { req.send().await }).expect("correction sent");
        assert!(r.status().is_success(), "correction accepted: {}", r.status());
        Some((revision, right))
    }

    /// Asks and corrects until `done` holds (bounded by `timeout`); per revision: (answers, right).
    fn until(
        &mut self,
        up: &Up,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> BTreeMap<String, (u32, u32)> {
        let start = Instant::now();
        let mut seen: BTreeMap<String, (u32, u32)> = BTreeMap::new();
        let mut i = 0;
        while !done(&up.state()) {
            assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}; state: {}", up.state());
            if let Some((rev, right)) = self.ask_and_correct(i) {
                let e = seen.entry(rev).or_default();
                e.0 += 1;
                e.1 += u32::from(right);
            }
            i += 1;
        }
        println!("{what}: answers per revision (total, right): {seen:?} in {:.1}s", start.elapsed().as_secs_f64());
        seen
    }
}

fn last_history(state: &Value) -> (String, String, String) {
    let h = &state["nodes"][0]["history"];
    let last = h.as_array().and_then(|a| a.last()).cloned().unwrap_or(Value::Null);
    let s = |k: &str| last[k].as_str().unwrap_or_default().to_string();
    (s("revision"), s("outcome"), s("reason"))
}

/// A model folder = the MiniLM files (symlinked) + optionally a random 384x384 projection head.
fn model_folder(models: &Path, into: &Path, random_head: bool) {
    std::fs::create_dir_all(into).unwrap();
    let src = models.join("all-minilm-l6-v2");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::os::unix::fs::symlink(e.path(), into.join(e.file_name())).unwrap();
    }
    if random_head {
        let script = r#"
import sys, numpy as np
from safetensors.numpy import save_file
rng = np.random.default_rng(7)
save_file({"projection.0.weight": rng.standard_normal((384, 384)).astype(np.float32),
           "projection.0.bias": np.zeros(384, dtype=np.float32)}, sys.argv[1])
"#;
        let out = into.join("projection.safetensors");
        let st = std::process::Command::new("python3").args(["-c", script]).arg(&out).status().expect("python3");
        assert!(st.success(), "writing the random head needs numpy + safetensors (scripts/install-deps.sh)");
    }
}

#[test]
fn worse_revision_is_rolled_back_and_better_one_promoted_without_manual_action() {
    let tmp = tempfile::tempdir().unwrap();
    let models_dir = tmp.path().join("models");
    std::os::unix::fs::symlink(models().join("all-minilm-l6-v2"), {
        std::fs::create_dir_all(&models_dir).unwrap();
        models_dir.join("minilm")
    })
    .unwrap();
    model_folder(&models(), &models_dir.join("minilm-random-head"), true);
    model_folder(&models(), &models_dir.join("minilm-copy"), false);

    let up = Up::start(tmp.path(), &manifest("minilm", "1"), &models_dir);
    let mut user = User::new(&up.router);

    // 1. A worse revision: rolled back by the analysis alone.
    std::fs::write(&up.manifest, manifest("minilm-random-head", "2")).unwrap();
    up.wait_for("the canary of revision 2 to be ready", Duration::from_secs(120), |u| {
        let s = u.state();
        s["nodes"][0]["canary"]["revision"] == "2"
            && s["nodes"][0]["replicas"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["revision"] == "2" && r["ready"] == true))
    });
    let seen = user.until(&up, "rollback of revision 2", Duration::from_secs(120), |s| last_history(s).0 == "2");
    let (rev, outcome, reason) = last_history(&up.state());
    assert_eq!((rev.as_str(), outcome.as_str()), ("2", "RolledBack"), "{reason}");
    assert!(reason.contains("accuracy"), "rolled back for its accuracy: {reason}");
    let (n2, right2) = seen.get("2").copied().unwrap_or_default();
    let (n1, right1) = seen.get("1").copied().unwrap_or_default();
    assert!(n2 >= 10, "the canary served its share before the verdict: {seen:?}");
    assert!(f64::from(right2) / f64::from(n2) < 0.6, "revision 2 is really worse: {seen:?}");
    assert!(f64::from(right1) / f64::from(n1.max(1)) > 0.9, "revision 1 answers right: {seen:?}");
    let s = up.state();
    assert_eq!(s["nodes"][0]["revision"], "1");
    assert!(s["nodes"][0]["canary"].is_null());
    // Revision 1 serves everything again, and revision 2 is not retried while the spec names it.
    up.wait_for("the canary replica to leave", Duration::from_secs(10), |u| {
        u.state()["nodes"][0]["replicas"].as_array().is_some_and(|r| r.iter().all(|r| r["revision"] == "1"))
    });
    let after = user.until(&up, "3 s of answers after the rollback", Duration::from_secs(60), {
        let start = Instant::now();
        move |_| start.elapsed() > Duration::from_secs(3)
    });
    assert_eq!(after.keys().collect::<Vec<_>>(), vec!["1"], "only revision 1 answers: {after:?}");
    assert!(up.state()["nodes"][0]["canary"].is_null(), "a rolled-back revision is not retried");

    // 2. A good revision: the canary passes and is promoted.
    std::fs::write(&up.manifest, manifest("minilm-copy", "3")).unwrap();
    let seen = user.until(&up, "promotion of revision 3", Duration::from_secs(150), |s| last_history(s).0 == "3");
    let (rev, outcome, reason) = last_history(&up.state());
    assert_eq!((rev.as_str(), outcome.as_str()), ("3", "Promoted"), "{reason}");
    assert!(seen.get("3").is_some_and(|(n, _)| *n >= 10), "the canary was analysed on real traffic: {seen:?}");
    up.wait_for("every replica on revision 3", Duration::from_secs(120), |u| {
        u.state()["nodes"][0]["replicas"]
            .as_array()
            .is_some_and(|r| !r.is_empty() && r.iter().all(|r| r["revision"] == "3" && r["ready"] == true))
    });
    assert_eq!(up.state()["nodes"][0]["revision"], "3");
    let outcomes: Vec<String> = up.state()["nodes"][0]["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| format!("{}:{}", h["revision"].as_str().unwrap(), h["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(outcomes, ["1:Deployed", "2:RolledBack", "3:Promoted"]);
    assert_eq!(user.failed, 0, "no request failed during either rollout");
}
