//! Dynamic batching and the model thread.
//!
//! Request path: [`Infer::embed`] preprocesses on the caller's tokio task, then appends one
//! [`Entry`] to a bounded queue and awaits a `oneshot` with its deadline.
//!
//! The batcher task (tokio) first reserves the single slot of the channel to the model thread, and
//! only then forms a batch: while the model is busy, requests keep accumulating in the queue, so
//! batches grow with load without any tuning (TEI's `queue.rs`). When the model is idle it waits at
//! most `max_wait` after the oldest entry arrived for more items, up to `max_batch` items and
//! `max_batch_tokens` of cost (TEI's budget: a batch of long inputs costs what it computes, not
//! how many there are; one input over the budget still runs, alone). Entries
//! whose client has gone (receiver dropped: connection closed or deadline hit) are skipped and
//! counted as `dropped`; entries past their deadline are answered with a timeout.
//!
//! The model thread is a plain `std::thread` owning the [`Encoder`]: candle's blocking compute never
//! runs on a tokio worker.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prism_api::wire::node::{EmbedInput, NodeTimings};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::backend::{Encoder, LoadedModel, ModelInfo, Prepared, Preprocessor};
use crate::error::NodeError;
use crate::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct InferConfig {
    /// Most inputs per forward pass.
    pub max_batch: usize,
    /// Most cost per forward pass, in [`Prepared::cost`] units (tokens of text, frames computed
    /// of audio, one per image, one per modality vector of a fusion input).
    pub max_batch_tokens: usize,
    /// How long an idle model waits for more inputs after the first one arrived.
    pub max_wait: Duration,
    /// Most requests waiting in the queue; beyond this, requests are refused (429).
    pub max_queue: usize,
    /// Most inputs in one request.
    pub max_inputs: usize,
    /// Deadline of a request that does not carry one.
    pub default_deadline: Duration,
}

/// Result of a successful request.
#[derive(Debug)]
pub struct EmbedOutput {
    pub embeddings: Vec<Vec<f32>>,
    pub timings: NodeTimings,
    /// Tokens of all inputs together, for token-based models.
    pub prompt_tokens: Option<u64>,
}

struct Served {
    embeddings: Vec<Vec<f32>>,
    queue: Duration,
    inference: Duration,
    batch_size: usize,
}

struct Entry {
    items: Vec<Prepared>,
    /// The items' [`Prepared::cost`] summed once at enqueue: the batcher reads it under the
    /// queue lock on every wake-up.
    cost: usize,
    enqueued: Instant,
    deadline: Instant,
    deadline_ms: u64,
    reply: oneshot::Sender<Result<Served, NodeError>>,
}

struct Queue {
    entries: Mutex<VecDeque<Entry>>,
    notify: Notify,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        // A panic while holding this lock cannot leave the deque half-updated (push/pop are
        // atomic from our side), so a poisoned lock is safe to keep using.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Handle to a loaded, warmed model: cheap to clone, shared by HTTP and gRPC.
#[derive(Clone)]
pub struct Infer {
    queue: Arc<Queue>,
    preprocessor: Arc<dyn Preprocessor>,
    pub info: ModelInfo,
    pub config: InferConfig,
    metrics: Metrics,
}

/// Decrements `prism_node_inflight` however the request ends (including a dropped future when the
/// client disconnects).
struct InflightGuard(Metrics);
impl InflightGuard {
    fn new(m: &Metrics) -> Self {
        m.inflight.with_label_values(&m.label_values()).inc();
        Self(m.clone())
    }
}
impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.with_label_values(&self.0.label_values()).dec();
    }
}

impl Infer {
    /// Starts the model thread, warms the model up (one real forward pass) and the batcher task.
    /// Returns once the model is ready to serve; must be called inside a tokio runtime.
    pub async fn start(model: LoadedModel, config: InferConfig, metrics: Metrics) -> Result<Self, NodeError> {
        let LoadedModel { info, preprocessor, encoder } = model;
        let warm = preprocessor.preprocess(&preprocessor.warmup_input())?;
        // Capacity 1: one batch may wait while another runs; everything else stays in the queue
        // where it can still join a bigger batch, be dropped, or time out.
        let (batch_tx, batch_rx) = mpsc::channel::<Vec<Entry>>(1);
        let (ready_tx, ready_rx) = oneshot::channel();
        let thread_metrics = metrics.clone();
        let budget = Budget::of(&config);
        std::thread::Builder::new()
            .name("prism-model".into())
            .spawn(move || model_thread(encoder, warm, batch_rx, ready_tx, budget, thread_metrics))
            .map_err(|e| NodeError::Inference(format!("spawning the model thread: {e}")))?;
        ready_rx.await.map_err(|_| NodeError::Inference("model thread exited during warm-up".into()))??;

        let queue = Arc::new(Queue { entries: Mutex::new(VecDeque::new()), notify: Notify::new() });
        tokio::spawn(batcher(queue.clone(), batch_tx, config.clone(), metrics.clone()));
        Ok(Self { queue, preprocessor, info, config, metrics })
    }

    /// Embeds `inputs` (all of this node's modality). `deadline_ms` overrides the default deadline.
    pub async fn embed(&self, inputs: &[EmbedInput], deadline_ms: Option<u64>) -> Result<EmbedOutput, NodeError> {
        let received = Instant::now();
        let _inflight = InflightGuard::new(&self.metrics);
        let result = self.embed_inner(inputs, deadline_ms, received).await;
        match &result {
            Ok(_) => self.metrics.observe(&self.metrics.request_duration, received.elapsed().as_secs_f64()),
            Err(e) => self.metrics.fail(e.kind()),
        }
        result
    }

    async fn embed_inner(
        &self,
        inputs: &[EmbedInput],
        deadline_ms: Option<u64>,
        received: Instant,
    ) -> Result<EmbedOutput, NodeError> {
        if inputs.is_empty() {
            return Err(NodeError::Validation("`inputs` is empty; send at least one input".into()));
        }
        if inputs.len() > self.config.max_inputs {
            return Err(NodeError::Validation(format!(
                "{} inputs in one request; this node accepts at most {} (split the request)",
                inputs.len(),
                self.config.max_inputs
            )));
        }
        // Refuse before tokenising when the queue is already full: overload must stay cheap.
        if self.queue.lock().len() >= self.config.max_queue {
            return Err(self.overloaded());
        }
        let deadline_ms = deadline_ms.unwrap_or(self.config.default_deadline.as_millis() as u64);
        let deadline = received + Duration::from_millis(deadline_ms);

        let t = Instant::now();
        let items = inputs
            .iter()
            .enumerate()
            .map(|(i, input)| {
                self.preprocessor.preprocess(input).map_err(|e| match NodeError::from(e) {
                    NodeError::Validation(m) => NodeError::Validation(format!("inputs[{i}]: {m}")),
                    other => other,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let preprocess = t.elapsed();
        self.metrics.observe(&self.metrics.preprocess_duration, preprocess.as_secs_f64());
        let prompt_tokens = items.iter().map(|p| p.tokens.map(|n| n as u64)).sum::<Option<u64>>();

        let (tx, rx) = oneshot::channel();
        {
            let mut q = self.queue.lock();
            if q.len() >= self.config.max_queue {
                return Err(self.overloaded());
            }
            let cost = items.iter().map(|p| p.cost).sum();
            q.push_back(Entry { items, cost, enqueued: Instant::now(), deadline, deadline_ms, reply: tx });
            self.metrics.queue_size.with_label_values(&self.metrics.label_values()).set(q.len() as i64);
        }
        self.queue.notify.notify_one();

        // On timeout `rx` is dropped here, which the batcher sees as a gone client and skips.
        let served = match tokio::time::timeout_at(deadline.into(), rx).await {
            Err(_) => return Err(NodeError::Timeout(deadline_ms)),
            Ok(Err(_)) => return Err(NodeError::Inference("the model thread stopped".into())),
            Ok(Ok(r)) => r?,
        };
        Ok(EmbedOutput {
            embeddings: served.embeddings,
            timings: NodeTimings {
                queue_ms: served.queue.as_secs_f64() * 1e3,
                preprocess_ms: preprocess.as_secs_f64() * 1e3,
                inference_ms: served.inference.as_secs_f64() * 1e3,
                batch_size: served.batch_size,
            },
            prompt_tokens,
        })
    }

    fn overloaded(&self) -> NodeError {
        NodeError::Overloaded(format!(
            "queue full ({} requests waiting, --max-queue {}); retry later or on another replica",
            self.config.max_queue, self.config.max_queue
        ))
    }
}

/// What one forward pass may hold.
#[derive(Clone, Copy, Debug)]
struct Budget {
    items: usize,
    cost: usize,
}

impl Budget {
    fn of(cfg: &InferConfig) -> Self {
        Self { items: cfg.max_batch.max(1), cost: cfg.max_batch_tokens.max(1) }
    }

    /// Whether a pass holding `items` inputs of `cost` has room for `more_items` of `more_cost`
    /// (an empty pass always has: an input over the budget runs alone).
    fn fits(&self, items: usize, cost: usize, more_items: usize, more_cost: usize) -> bool {
        items == 0 || (items + more_items <= self.items && cost + more_cost <= self.cost)
    }

    /// Lengths of the consecutive passes that `costs` (in running order) split into.
    fn passes(&self, costs: impl IntoIterator<Item = usize>) -> Vec<usize> {
        let mut out = Vec::new();
        let (mut n, mut c) = (0, 0);
        for cost in costs {
            if !self.fits(n, c, 1, cost) {
                out.push(n);
                (n, c) = (0, 0);
            }
            n += 1;
            c += cost;
        }
        if n > 0 {
            out.push(n);
        }
        out
    }
}

async fn batcher(queue: Arc<Queue>, batch_tx: mpsc::Sender<Vec<Entry>>, cfg: InferConfig, metrics: Metrics) {
    let budget = Budget::of(&cfg);
    loop {
        // Wait for the model thread to have room before choosing a batch.
        let Ok(permit) = batch_tx.reserve().await else { return };
        // Wait for work. `notify_one` stores a permit when nobody waits, so no wake-up is lost
        // between the check and the await.
        loop {
            if !queue.lock().is_empty() {
                break;
            }
            queue.notify.notified().await;
        }
        // Give an idle model up to `max_wait` (from the oldest arrival) to collect a fuller batch.
        loop {
            let (pending, pending_cost, oldest) = {
                let q = queue.lock();
                let (n, c) = q.iter().fold((0, 0), |(n, c), e| (n + e.items.len(), c + e.cost));
                (n, c, q.front().map(|e| e.enqueued))
            };
            let Some(oldest) = oldest else { break };
            let until = oldest + cfg.max_wait;
            if pending >= budget.items || pending_cost >= budget.cost || Instant::now() >= until {
                break;
            }
            tokio::select! {
                _ = queue.notify.notified() => {}
                _ = tokio::time::sleep_until(until.into()) => {}
            }
        }
        let now = Instant::now();
        let mut batch = Vec::new();
        let (mut n, mut cost) = (0, 0);
        {
            let mut q = queue.lock();
            while let Some(front) = q.front() {
                if front.reply.is_closed() {
                    // Past its deadline the handler already answered 504 and counted `timeout`;
                    // otherwise the client left (connection closed) and this is a `dropped`.
                    if now < front.deadline {
                        metrics.fail("dropped");
                    }
                    q.pop_front();
                    continue;
                }
                if now >= front.deadline {
                    if let Some(e) = q.pop_front() {
                        let _ = e.reply.send(Err(NodeError::Timeout(e.deadline_ms)));
                    }
                    continue;
                }
                if !budget.fits(n, cost, front.items.len(), front.cost) {
                    break;
                }
                n += front.items.len();
                cost += front.cost;
                if let Some(e) = q.pop_front() {
                    batch.push(e);
                }
            }
            metrics.queue_size.with_label_values(&metrics.label_values()).set(q.len() as i64);
        }
        if batch.is_empty() {
            continue;
        }
        permit.send(batch);
    }
}

fn model_thread(
    mut encoder: Box<dyn Encoder>,
    warm: Prepared,
    mut rx: mpsc::Receiver<Vec<Entry>>,
    ready: oneshot::Sender<Result<(), NodeError>>,
    budget: Budget,
    metrics: Metrics,
) {
    // Warm-up: one real forward pass (allocations, kernels, page-faulting the weights) so the first
    // client request is not the slow one; /ready turns true only after it succeeded.
    let warm_result = run_encoder(&mut *encoder, std::slice::from_ref(&warm)).map(|_| ());
    let failed = warm_result.is_err();
    let _ = ready.send(warm_result);
    if failed {
        return;
    }
    while let Some(entries) = rx.blocking_recv() {
        let started = Instant::now();
        let span = tracing::debug_span!("batch", entries = entries.len());
        let _enter = span.enter();
        // Flatten and sort by cost so each pass pads to a similar length; cut into passes within
        // the budget (an entry bigger than the budget was taken alone and is split here).
        let mut order: Vec<(usize, usize)> =
            entries.iter().enumerate().flat_map(|(e, en)| (0..en.items.len()).map(move |i| (e, i))).collect();
        order.sort_by_key(|&(e, i)| entries[e].items[i].cost);
        let passes = budget.passes(order.iter().map(|&(e, i)| entries[e].items[i].cost));
        let total = order.len();
        let mut results: Vec<Vec<Option<Vec<f32>>>> = entries.iter().map(|en| vec![None; en.items.len()]).collect();
        let mut error: Option<NodeError> = None;
        let mut entries = entries;
        // Move the items out so chunks can be passed as slices in sorted order.
        let mut items: Vec<Vec<Option<Prepared>>> =
            entries.iter_mut().map(|en| std::mem::take(&mut en.items).into_iter().map(Some).collect()).collect();
        let mut start = 0;
        for len in passes {
            let chunk = &order[start..start + len];
            start += len;
            let batch: Vec<Prepared> = chunk.iter().filter_map(|&(e, i)| items[e][i].take()).collect();
            metrics.observe(&metrics.batch_size, batch.len() as f64);
            match run_encoder(&mut *encoder, &batch) {
                Ok(vecs) if vecs.len() == chunk.len() => {
                    for (&(e, i), v) in chunk.iter().zip(vecs) {
                        results[e][i] = Some(v);
                    }
                }
                Ok(vecs) => {
                    error = Some(NodeError::Inference(format!(
                        "encoder returned {} vectors for {} inputs",
                        vecs.len(),
                        chunk.len()
                    )));
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, "forward pass failed");
                    error = Some(e);
                    break;
                }
            }
        }
        let inference = started.elapsed();
        metrics.observe(&metrics.inference_duration, inference.as_secs_f64());
        for (entry, res) in entries.into_iter().zip(results) {
            let queue_time = started.saturating_duration_since(entry.enqueued);
            metrics.observe(&metrics.queue_duration, queue_time.as_secs_f64());
            let reply = match &error {
                Some(e) => Err(NodeError::Inference(e.to_string())),
                None => res
                    .into_iter()
                    .collect::<Option<Vec<_>>>()
                    .map(|embeddings| Served { embeddings, queue: queue_time, inference, batch_size: total })
                    .ok_or_else(|| NodeError::Inference("missing vector in batch result".into())),
            };
            // The client may have gone meanwhile; nothing to do then.
            let _ = entry.reply.send(reply);
        }
    }
}

/// Runs the encoder, turning a panic inside the model code into an error so one bad batch cannot
/// kill the model thread (and with it every later request).
fn run_encoder(encoder: &mut dyn Encoder, batch: &[Prepared]) -> Result<Vec<Vec<f32>>, NodeError> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| encoder.encode_batch(batch))) {
        Ok(r) => r.map_err(NodeError::from),
        Err(_) => Err(NodeError::Inference("the model panicked on this batch".into())),
    }
}

/// Re-export for transports that want to trace a request.
pub fn request_span(request_id: &str, transport: &'static str) -> tracing::Span {
    tracing::info_span!("embed", request_id = %request_id, transport)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_respect_both_limits_and_run_an_oversized_input_alone() {
        let b = Budget { items: 4, cost: 100 };
        // Short inputs: the item limit cuts.
        assert_eq!(b.passes([10; 9]), vec![4, 4, 1]);
        // Long inputs: the token budget cuts before the item limit.
        assert_eq!(b.passes([30, 30, 30, 30, 30]), vec![3, 2]);
        // Sorted ascending, mixed: 10+20+30+40 = 100 fits exactly; 60 then 90 each alone.
        assert_eq!(b.passes([10, 20, 30, 40, 60, 90]), vec![4, 1, 1]);
        // One input over the whole budget still runs, alone, and nothing is lost.
        assert_eq!(b.passes([5, 500, 5]), vec![1, 1, 1]);
        assert_eq!(b.passes(std::iter::empty()), Vec::<usize>::new());
        // Whatever the costs, every input lands in exactly one pass.
        let costs: Vec<usize> = (0..50).map(|i| (i * 37) % 120).collect();
        let p = b.passes(costs.iter().copied());
        assert_eq!(p.iter().sum::<usize>(), costs.len());
        let mut at = 0;
        for len in p {
            let pass = &costs[at..at + len];
            assert!(len <= 4 && (len == 1 || pass.iter().sum::<usize>() <= 100), "{pass:?}");
            at += len;
        }
    }
}
