//! The memory store's vector index: cosine search over every logged vector, per (pipeline,
//! key, dimension). Exact while small; past [`ANN_MIN_VECTORS`] an HNSW graph ([`Hnsw`]) with
//! an exact scan of the vectors not yet in it.
//!
//! Each vector is held once: in its graph (slots below `indexed`) or in the flat `tail` until
//! the indexer thread moves it into the graph. Graph work never happens on the write path or
//! under the write lock: the indexer takes a job under a read lock, inserts into a graph that
//! searches keep using, and publishes under a short write lock. Retention hides records at
//! once (searches skip them) and compacts the graph in the background once half of it is dead,
//! so a prune never makes searches fall back to a full scan.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};

use prism_api::wire::router::InferResponse;
use serde::Serialize;

use crate::hnsw::{Hnsw, Precision};
use crate::log::Record;
use crate::vector::{dot, normalised};

/// Index key of a record's fused vector (modality names are the other keys).
pub const FUSED: &str = "fused";

/// A search hit.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Hit {
    pub id: String,
    pub pipeline: String,
    pub similarity: f64,
    pub at_ms: i64,
}

/// Below this many vectors per key, exact search is about as fast as the graph and never wrong.
pub const ANN_MIN_VECTORS: usize = 2048;
/// HNSW parameters: M = 16 links per node, ef_construction = 200 (the paper's defaults for
/// high recall); a search explores ef = max(MIN_EF_SEARCH, 4k) candidates.
const HNSW_M: usize = 16;
const HNSW_EF_CONSTRUCTION: usize = 200;
/// 96 kept recall@10 at 0.9999 on 100k vectors but only 0.988 on 1M (FAISS too, at the same
/// efSearch); 128 keeps it >= 0.99 at 1M (`make bench-memory`).
pub const MIN_EF_SEARCH: usize = 128;
/// Most vectors one background indexing batch inserts before publishing (searches see progress).
const INDEX_BATCH: usize = 4096;

/// The vectors of a response: each modality's and the fused one.
pub(crate) fn vectors_of(r: &InferResponse) -> Vec<(String, &[f32])> {
    let mut v: Vec<(String, &[f32])> =
        r.modalities.iter().map(|(m, res)| (m.clone(), res.embedding.as_slice())).collect();
    if let Some(e) = &r.embedding {
        v.push((FUSED.to_string(), e.as_slice()));
    }
    v
}

/// (pipeline, key, dimension): a model change that alters a modality's size starts a new index.
type IndexKey = (String, String, usize);

/// One indexed vector's record: id and time.
type Slot = (Arc<str>, i64);

/// The vectors of one (pipeline, key, dim).
struct KeyIndex {
    dim: usize,
    precision: Precision,
    slots: Vec<Slot>,
    /// Holds the vectors of `slots[..indexed]`, at the same positions.
    graph: Option<Arc<Hnsw>>,
    indexed: usize,
    /// Vectors of `slots[indexed..]`, row after row.
    tail: Vec<f32>,
    /// Retention: slots older than this are deleted (skipped by searches until compacted away).
    live_from_ms: i64,
    dead: usize,
    /// Bumped when positions change (compaction): a job computed against an older epoch is
    /// discarded.
    epoch: u64,
}

/// Work for the indexer, computed under a read lock and run without any lock.
pub(crate) struct IndexJob {
    key: IndexKey,
    epoch: u64,
    /// `indexed` when the job was made: an extend publishes only if it is unchanged.
    indexed: usize,
    /// `slots.len()` when the job was made.
    snapshot: usize,
    kind: JobKind,
}

enum JobKind {
    /// Insert `vectors` (the tail's first rows) into the existing graph at `indexed..`.
    Extend { graph: Arc<Hnsw>, vectors: Vec<f32> },
    /// Build a new graph from the live slots `keep` of the snapshot (too full, half dead, or
    /// none yet); `old` holds the vectors of positions below `indexed`, `tail` the rest.
    Rebuild { old: Option<Arc<Hnsw>>, tail: Vec<f32>, keep: Vec<usize>, capacity: usize, precision: Precision },
}

impl KeyIndex {
    fn new(dim: usize, precision: Precision) -> Self {
        Self {
            dim,
            precision,
            slots: Vec::new(),
            graph: None,
            indexed: 0,
            tail: Vec::new(),
            live_from_ms: i64::MIN,
            dead: 0,
            epoch: 0,
        }
    }

    fn live(&self) -> usize {
        self.slots.len() - self.dead
    }

    fn tail_row(&self, pos: usize) -> Option<&[f32]> {
        let start = pos.checked_sub(self.indexed)? * self.dim;
        self.tail.get(start..start + self.dim)
    }

    /// Cosine of unit query `q` with the vector at `pos`.
    fn similarity(&self, pos: usize, q: &[f32]) -> Option<f32> {
        if pos < self.indexed {
            self.graph.as_ref()?.similarity(pos, q)
        } else {
            Some(dot(self.tail_row(pos)?, q))
        }
    }

    fn copy_vector(&self, pos: usize, out: &mut Vec<f32>) -> bool {
        if pos < self.indexed {
            self.graph.as_ref().is_some_and(|g| g.copy_vector(pos, out))
        } else if let Some(v) = self.tail_row(pos) {
            out.clear();
            out.extend_from_slice(v);
            true
        } else {
            false
        }
    }

    fn hit(&self, pipeline: &str, pos: usize, similarity: f64) -> Option<Hit> {
        let (id, at_ms) = self.slots.get(pos)?;
        (*at_ms >= self.live_from_ms).then(|| Hit {
            id: id.to_string(),
            pipeline: pipeline.to_string(),
            similarity,
            at_ms: *at_ms,
        })
    }

    fn hits(&self, pipeline: &str, q: &[f32], k: usize, exact: bool, out: &mut Vec<Hit>) {
        let graph = if exact { None } else { self.graph.as_ref() };
        let scan_from = if graph.is_some() { self.indexed } else { 0 };
        if let Some(g) = graph {
            // Slots past `indexed` (a batch in flight) are in the exact tail below; deleted
            // slots are walked through but not returned.
            // With nothing deleted, skip the slot lookup: it is a cache miss per candidate.
            let none_dead = self.dead == 0;
            let live = |slot: u32| {
                let pos = slot as usize;
                pos < self.indexed && (none_dead || self.slots.get(pos).is_some_and(|s| s.1 >= self.live_from_ms))
            };
            for (slot, distance) in g.search_filtered(q, k, (4 * k).max(MIN_EF_SEARCH), &live) {
                out.extend(self.hit(pipeline, slot as usize, 1.0 - f64::from(distance)));
            }
        }
        for pos in scan_from..self.slots.len() {
            if let Some(s) = self.similarity(pos, q) {
                out.extend(self.hit(pipeline, pos, f64::from(s)));
            }
        }
    }

    fn job(&self, key: &IndexKey, max_batch: usize) -> Option<IndexJob> {
        let n = self.slots.len();
        let kind = match &self.graph {
            None if self.live() < ANN_MIN_VECTORS => return None,
            Some(g) if self.dead * 2 <= n && n <= g.capacity() => {
                if self.indexed == n {
                    return None;
                }
                let end = self.indexed.saturating_add(max_batch).min(n);
                let vectors = self.tail[..(end - self.indexed) * self.dim].to_vec();
                JobKind::Extend { graph: g.clone(), vectors }
            }
            _ => {
                let keep: Vec<usize> = (0..n).filter(|&p| self.slots[p].1 >= self.live_from_ms).collect();
                // Room to double before the next rebuild: amortised, each vector is inserted
                // about twice.
                let capacity = (keep.len() * 2).max(2 * ANN_MIN_VECTORS);
                JobKind::Rebuild {
                    old: self.graph.clone(),
                    tail: self.tail.clone(),
                    keep,
                    capacity,
                    precision: self.precision,
                }
            }
        };
        Some(IndexJob { key: key.clone(), epoch: self.epoch, indexed: self.indexed, snapshot: n, kind })
    }

    fn publish(&mut self, job: IndexJob, built: Option<Arc<Hnsw>>) {
        if self.epoch != job.epoch || self.indexed != job.indexed {
            return;
        }
        match job.kind {
            JobKind::Extend { vectors, .. } => {
                let rows = vectors.len() / self.dim;
                self.indexed += rows;
                self.tail.drain(..rows * self.dim);
                self.shrink_tail();
            }
            JobKind::Rebuild { keep, .. } => {
                let Some(graph) = built else { return };
                let mut slots: Vec<Slot> = keep.iter().map(|&p| self.slots[p].clone()).collect();
                slots.extend_from_slice(&self.slots[job.snapshot..]);
                let tail_from = (job.snapshot - self.indexed) * self.dim;
                self.tail.drain(..tail_from);
                self.shrink_tail();
                self.slots = slots;
                self.indexed = keep.len();
                self.graph = Some(graph);
                self.dead = self.slots.iter().filter(|s| s.1 < self.live_from_ms).count();
                self.epoch += 1;
            }
        }
    }

    /// Give back the tail's memory once the graph holds its vectors (drain keeps capacity: a
    /// key loaded at open would otherwise hold every vector twice).
    fn shrink_tail(&mut self) {
        if self.tail.capacity() > 2 * self.tail.len() + INDEX_BATCH * self.dim {
            self.tail.shrink_to_fit();
        }
    }

    /// Hide slots older than `cutoff_ms`. A key with no graph is compacted at once (it is
    /// small); a graph is compacted by the indexer once half of it is dead. A key left with
    /// too few live vectors for a graph goes back to exact search.
    fn retain_since(&mut self, cutoff_ms: i64) {
        self.live_from_ms = self.live_from_ms.max(cutoff_ms);
        self.dead = self.slots.iter().filter(|s| s.1 < self.live_from_ms).count();
        if self.dead == 0 || (self.graph.is_some() && self.live() >= ANN_MIN_VECTORS) {
            return;
        }
        let mut slots = Vec::with_capacity(self.live());
        let mut tail = Vec::with_capacity(self.live() * self.dim);
        let mut v = Vec::with_capacity(self.dim);
        for pos in 0..self.slots.len() {
            if self.slots[pos].1 >= self.live_from_ms && self.copy_vector(pos, &mut v) {
                tail.extend_from_slice(&v);
                slots.push(self.slots[pos].clone());
            }
        }
        *self = Self {
            slots,
            tail,
            live_from_ms: self.live_from_ms,
            epoch: self.epoch + 1,
            ..Self::new(self.dim, self.precision)
        };
    }
}

impl IndexJob {
    /// Run the graph work on `threads` threads, holding no lock. Returns the new graph of a
    /// rebuild.
    pub(crate) fn run(&self, threads: usize) -> Option<Arc<Hnsw>> {
        let dim = self.key.2;
        let copy = |v: &[f32], buf: &mut Vec<f32>| {
            buf.clear();
            buf.extend_from_slice(v);
            true
        };
        match &self.kind {
            JobKind::Extend { graph, vectors } => {
                let rows = vectors.len() / dim;
                graph.insert_parallel(self.indexed, rows, threads, &|i, buf| {
                    copy(&vectors[i * dim..(i + 1) * dim], buf)
                });
                None
            }
            JobKind::Rebuild { old, tail, keep, capacity, precision } => {
                let g = Hnsw::new(dim, *capacity, HNSW_M, HNSW_EF_CONSTRUCTION, *precision);
                g.insert_parallel(0, keep.len(), threads, &|i, buf| {
                    let p = keep[i];
                    match p.checked_sub(self.indexed) {
                        None => old.as_ref().is_some_and(|o| o.copy_vector(p, buf)),
                        Some(t) => tail.get(t * dim..(t + 1) * dim).is_some_and(|v| copy(v, buf)),
                    }
                });
                if g.len() != keep.len() {
                    // Unreachable by construction (the snapshot holds every kept vector); a
                    // graph with holes would lose hits, so publish nothing.
                    tracing::error!(key = ?self.key, built = g.len(), wanted = keep.len(), "vector index rebuild incomplete");
                    return None;
                }
                Some(Arc::new(g))
            }
        }
    }
}

/// Cosine search over every stored vector, per (pipeline, key): exact while small, HNSW past
/// [`ANN_MIN_VECTORS`]. Rebuilt from the file at open; appended after each commit. Public for
/// the benchmark (`make bench-memory`), which measures it without a SQLite file around it.
#[derive(Default)]
pub struct VectorIndex {
    by_key: HashMap<IndexKey, KeyIndex>,
    precision: Precision,
}

impl VectorIndex {
    /// An empty index whose graphs store vectors at `precision` (exact-scanned vectors not yet
    /// in a graph stay f32).
    pub fn with_precision(precision: Precision) -> Self {
        Self { by_key: HashMap::new(), precision }
    }

    /// Index one vector (normalised here; a zero or non-finite vector is skipped). It is
    /// searchable at once (exactly) and joins the graph at the next [`Self::catch_up`].
    pub fn insert(&mut self, pipeline: &str, key: &str, id: &str, at_ms: i64, v: &[f32]) {
        self.push(pipeline, key.to_string(), Arc::from(id), at_ms, v);
    }

    fn push(&mut self, pipeline: &str, key: String, id: Arc<str>, at_ms: i64, v: &[f32]) {
        if let Some(n) = normalised(v) {
            let dim = n.len();
            let precision = self.precision;
            let idx =
                self.by_key.entry((pipeline.to_string(), key, dim)).or_insert_with(|| KeyIndex::new(dim, precision));
            if at_ms < idx.live_from_ms {
                return;
            }
            idx.slots.push((id, at_ms));
            idx.tail.extend_from_slice(&n);
        }
    }

    /// Every vector of a record (its modalities' and the fused one), sharing one id.
    pub(crate) fn add(&mut self, rec: &Record) {
        let id: Arc<str> = Arc::from(rec.id.as_str());
        for (key, v) in vectors_of(&rec.response) {
            self.push(&rec.pipeline, key, id.clone(), rec.at_ms, v);
        }
    }

    /// Graph work due, at most `max_batch` vectors per extend.
    pub(crate) fn jobs(&self, max_batch: usize) -> Vec<IndexJob> {
        self.by_key.iter().filter_map(|(key, i)| i.job(key, max_batch)).collect()
    }

    pub(crate) fn publish(&mut self, job: IndexJob, built: Option<Arc<Hnsw>>) {
        if let Some(i) = self.by_key.get_mut(&job.key) {
            i.publish(job, built);
        }
    }

    /// Bring every graph up to date now, on all cores (the benchmark). The store's indexer
    /// thread does the same in the background, in batches.
    pub fn catch_up(&mut self) {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        loop {
            let jobs = self.jobs(usize::MAX);
            if jobs.is_empty() {
                return;
            }
            for job in jobs {
                let built = job.run(threads);
                self.publish(job, built);
            }
        }
    }

    /// Hits best first, and whether the search was exact.
    pub fn search(&self, pipeline: Option<&str>, key: &str, query: &[f32], k: usize, exact: bool) -> (Vec<Hit>, bool) {
        let Some(q) = normalised(query) else { return (Vec::new(), true) };
        let mut hits: Vec<Hit> = Vec::new();
        let mut was_exact = true;
        for ((p, kk, dim), idx) in &self.by_key {
            if kk != key || *dim != q.len() || pipeline.is_some_and(|want| want != p) {
                continue;
            }
            let use_graph = !exact && idx.graph.is_some();
            was_exact &= !use_graph;
            idx.hits(p, &q, k, !use_graph, &mut hits);
        }
        hits.sort_by(|a, b| b.similarity.total_cmp(&a.similarity).then(b.at_ms.cmp(&a.at_ms)));
        hits.truncate(k);
        (hits, was_exact)
    }

    /// Live (not deleted) vectors.
    pub fn len(&self) -> usize {
        self.by_key.values().map(KeyIndex::live).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Vectors waiting for their graph (exactly searched meanwhile) and deleted ones not yet
    /// compacted away: what the benchmark watches during writes and prunes.
    pub fn backlog(&self) -> (usize, usize) {
        self.by_key.values().fold((0, 0), |(t, d), i| {
            let waiting = if i.graph.is_some() || i.live() >= ANN_MIN_VECTORS { i.slots.len() - i.indexed } else { 0 };
            (t + waiting, d + i.dead)
        })
    }

    /// Delete every vector older than `cutoff_ms` (retention). Cheap under the write lock:
    /// deleted vectors are hidden at once and compacted away by the indexer.
    pub fn retain_since(&mut self, cutoff_ms: i64) {
        for idx in self.by_key.values_mut() {
            idx.retain_since(cutoff_ms);
        }
        self.by_key.retain(|_, i| !i.slots.is_empty() || i.graph.is_some());
    }
}

/// The store's indexer: keeps graphs up to date off the write path; ends with the store.
/// It uses one core fewer than the machine has, so request handling keeps one.
pub(crate) fn indexer_loop(index: Weak<RwLock<VectorIndex>>) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1));
    loop {
        let Some(idx) = index.upgrade() else { return };
        let jobs = idx.read().unwrap_or_else(|p| p.into_inner()).jobs(INDEX_BATCH);
        if jobs.is_empty() {
            drop(idx);
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        for job in jobs {
            let built = job.run(threads);
            idx.write().unwrap_or_else(|p| p.into_inner()).publish(job, built);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clustered unit vectors (like real embeddings: topics, not uniform noise), seeded.
    fn clustered(n: usize, dim: usize, clusters: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut state = seed;
        let mut next = move || {
            // xorshift64*: enough for test data, no extra dependency.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545F4914F6CDD1D) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        };
        let centers: Vec<Vec<f64>> = (0..clusters).map(|_| (0..dim).map(|_| next()).collect()).collect();
        (0..n).map(|i| centers[i % clusters].iter().map(|c| (c + 0.6 * next()) as f32).collect()).collect()
    }

    fn recall(idx: &VectorIndex, queries: &[Vec<f32>]) -> f64 {
        let mut found = 0;
        for q in queries {
            let (ann, exact) = idx.search(Some("p"), "text", q, 10, false);
            assert!(!exact);
            let truth = idx.search(Some("p"), "text", q, 10, true).0;
            found += ann.iter().filter(|h| truth.iter().any(|t| t.id == h.id)).count();
        }
        found as f64 / (queries.len() * 10) as f64
    }

    #[test]
    fn graph_search_agrees_with_exact_search_and_survives_growth_and_retention() {
        growth_and_retention(Precision::F32);
    }

    #[test]
    fn the_same_holds_with_bf16_vectors() {
        growth_and_retention(Precision::Bf16);
    }

    fn growth_and_retention(precision: Precision) {
        let mut idx = VectorIndex::with_precision(precision);
        let vs = clustered(9000, 64, 50, 7);
        for (i, v) in vs.iter().enumerate().take(4000) {
            idx.insert("p", "text", &format!("r{i}"), i as i64, v);
        }
        assert!(idx.search(Some("p"), "text", &vs[0], 10, false).1, "exact until the graph is built");
        idx.catch_up();
        // More after the graph: searchable at once through the exact tail.
        for (i, v) in vs.iter().enumerate().skip(4000) {
            idx.insert("p", "text", &format!("r{i}"), i as i64, v);
        }
        let (hits, exact) = idx.search(Some("p"), "text", &vs[8999], 1, false);
        assert!(!exact);
        assert_eq!(hits[0].id, "r8999", "a vector not yet in the graph is found");
        // 9000 > the first graph's capacity (8000): the catch-up rebuilds a bigger one.
        idx.catch_up();
        assert_eq!(idx.backlog(), (0, 0));
        let queries = clustered(100, 64, 50, 99);
        let r = recall(&idx, &queries);
        assert!(r >= 0.95, "recall@10: {r}");
        // Retention of a third: hidden at once, graph kept (no exact fallback).
        idx.retain_since(3000);
        assert_eq!(idx.len(), 6000);
        assert_eq!(idx.backlog(), (0, 3000));
        let (hits, exact) = idx.search(Some("p"), "text", &queries[0], 10, false);
        assert!(!exact);
        assert_eq!(hits.len(), 10);
        assert!(hits.iter().all(|h| h.at_ms >= 3000 && h.id == format!("r{}", h.at_ms)), "{hits:?}");
        let r = recall(&idx, &queries);
        assert!(r >= 0.95, "recall@10 with a third deleted: {r}");
        // Past half dead: compacted, positions renumbered, ids still right.
        idx.retain_since(6000);
        assert_eq!(idx.len(), 3000);
        idx.catch_up();
        assert_eq!(idx.backlog(), (0, 0));
        let (hits, _) = idx.search(Some("p"), "text", &queries[0], 10, false);
        assert!(hits.iter().all(|h| h.at_ms >= 6000 && h.id == format!("r{}", h.at_ms)), "{hits:?}");
        assert!(recall(&idx, &queries) >= 0.95);
        // Down to a few: back to exact, and a write older than the cutoff is not indexed.
        idx.retain_since(8500);
        assert_eq!(idx.len(), 500);
        assert!(idx.search(Some("p"), "text", &queries[0], 10, false).1);
        idx.insert("p", "text", "late", 10, &vs[0]);
        assert_eq!(idx.len(), 500);
    }

    #[test]
    fn vectors_of_another_size_get_their_own_index() {
        let mut idx = VectorIndex::default();
        idx.insert("p", "text", "small", 1, &[1.0, 0.0]);
        idx.insert("p", "text", "big", 2, &[0.0, 0.0, 1.0]);
        assert_eq!(idx.search(Some("p"), "text", &[1.0, 0.1], 5, false).0[0].id, "small");
        let (hits, _) = idx.search(Some("p"), "text", &[0.0, 0.0, 2.0], 5, false);
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].id, "big");
        assert!((hits[0].similarity - 1.0).abs() < 1e-6);
    }

    #[test]
    fn a_search_during_background_indexing_sees_every_vector_once() {
        let idx = Arc::new(RwLock::new(VectorIndex::default()));
        let vs = clustered(6000, 32, 40, 3);
        {
            let mut w = idx.write().unwrap();
            for (i, v) in vs.iter().enumerate() {
                w.insert("p", "text", &format!("r{i}"), i as i64, v);
            }
        }
        let weak = Arc::downgrade(&idx);
        let indexer = std::thread::spawn(move || indexer_loop(weak));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let r = idx.read().unwrap();
            let (hits, _) = r.search(Some("p"), "text", &vs[123], 50, false);
            let ids: std::collections::HashSet<&str> = hits.iter().map(|h| h.id.as_str()).collect();
            assert_eq!(ids.len(), hits.len(), "no vector is returned twice while a batch is in flight");
            assert_eq!(hits[0].id, "r123");
            if r.backlog().0 == 0 {
                break;
            }
            drop(r);
            assert!(std::time::Instant::now() < deadline, "indexer caught up");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        drop(idx);
        indexer.join().unwrap();
    }
}
