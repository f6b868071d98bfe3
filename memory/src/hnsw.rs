//! A flat-array HNSW graph (Malkov & Yashunin) for unit vectors, cosine by dot product.
//!
//! Why our own: hnsw_rs keeps each point behind an `RwLock` with its neighbours in `Vec`s and
//! allocates per search; FAISS was 3.8x faster at search and 3.6x at build on the same data.
//! Here, as in FAISS and hnswlib, everything lives in flat arrays sized once:
//! - vectors: `capacity * dim` floats, written once per slot;
//! - level-0 links: `capacity * (1 + 2M)` u32 (a count, then the neighbours);
//! - upper-level links only for nodes that have upper levels (about 1 in M), found through
//!   `upper_start`, a prefix sum over the levels each slot will have.
//!
//! The arrays are allocated zeroed (calloc: pages are mapped on first touch), so a graph sized
//! for growth costs memory only as it fills.
//!
//! Concurrency: inserts run in parallel (each takes a per-node spin lock while it edits that
//! node's list); searches take no lock. A reader may see a list mid-edit, but every id in any
//! list names a node whose vector was published before it was linked (Release/Acquire on its
//! state), so a search only ever follows complete nodes. A slot's level is a hash of its id, so
//! a rebuild of the same data gives the same graph shape.

use std::cell::{RefCell, UnsafeCell};
use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

use crate::vector::{dot, dot4, dot_bf16, to_bf16, widen_bf16};

/// The highest level a node can have: with M = 16 a level above 8 is a one-in-2^32 event.
const MAX_LEVEL: usize = 15;
/// Slot states: never written, being written by an inserter, searchable.
const EMPTY: u8 = 0;
const WRITING: u8 = 1;
const READY: u8 = 2;
/// `entry` when the graph is empty.
const NO_ENTRY: u64 = u64::MAX;

/// A candidate: distance (1 - cosine) and slot, ordered by distance then slot (a total order,
/// so heaps never see NaN surprises).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Dist(f32, u32);

impl Eq for Dist {}

impl PartialOrd for Dist {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Dist {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

/// How the graph stores its vectors. Queries stay f32 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    #[default]
    F32,
    /// bfloat16: half the memory per vector; each element keeps 8 bits of mantissa, which
    /// moves cosines by about 1e-3 and recall by less (measured in `make bench-memory`).
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!("vector precision must be f32 or bf16, got {other:?}")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

/// The vector arrays: one of them is used, per [`Precision`].
enum Vectors {
    F32(Box<[UnsafeCell<f32>]>),
    Bf16(Box<[UnsafeCell<u16>]>),
}

/// The graph. `Sync`: see the module docs for why unlocked reads are sound.
pub struct Hnsw {
    dim: usize,
    capacity: usize,
    /// Links per node on upper levels; level 0 keeps twice as many.
    m: usize,
    ef_construction: usize,
    vectors: Vectors,
    state: Box<[AtomicU8]>,
    locks: Box<[AtomicBool]>,
    links0: Box<[AtomicU32]>,
    /// Start of slot i's upper-level lists in `upper` (in lists of `1 + m` words).
    upper_start: Box<[u32]>,
    upper: Box<[AtomicU32]>,
    /// (level << 32) | slot of the entry point, or NO_ENTRY.
    entry: AtomicU64,
    /// Serialises raising the entry point (rare: a new top level).
    entry_lock: Mutex<()>,
    ready: AtomicU32,
}

// SAFETY: `vectors` is the only non-Sync field. A slot's vector is written once, by the one
// inserter that moved its state EMPTY -> WRITING, before the state becomes READY (Release).
// Readers read a vector only after observing READY (Acquire), so no read overlaps the write.
unsafe impl Sync for Hnsw {}

/// A zeroed slice of `n` atomics: calloc'd, so untouched pages cost no memory.
fn zeroed_u32(n: usize) -> Box<[AtomicU32]> {
    let raw: Box<[u32]> = vec![0u32; n].into_boxed_slice();
    // SAFETY: AtomicU32 has the same size, alignment and bit validity as u32.
    unsafe { Box::from_raw(Box::into_raw(raw) as *mut [AtomicU32]) }
}

fn zeroed_cells<T: Copy + Default>(n: usize) -> Box<[UnsafeCell<T>]> {
    let raw: Box<[T]> = vec![T::default(); n].into_boxed_slice();
    // SAFETY: UnsafeCell<T> has the same in-memory representation as T.
    unsafe { Box::from_raw(Box::into_raw(raw) as *mut [UnsafeCell<T>]) }
}

/// Slot `slot`'s `dim` elements of `cells` as a plain slice.
///
/// # Safety
/// The slot must be READY, or owned (WRITING) by the caller after it wrote it: its elements
/// are never written again (see `unsafe impl Sync for Hnsw`).
unsafe fn row<T>(cells: &[UnsafeCell<T>], slot: usize, dim: usize) -> &[T] {
    let start = slot * dim;
    std::slice::from_raw_parts(cells[start..start + dim].as_ptr() as *const T, dim)
}

fn zeroed_u8(n: usize) -> Box<[AtomicU8]> {
    let raw: Box<[u8]> = vec![0u8; n].into_boxed_slice();
    // SAFETY: AtomicU8 has the same size, alignment and bit validity as u8.
    unsafe { Box::from_raw(Box::into_raw(raw) as *mut [AtomicU8]) }
}

fn zeroed_bool(n: usize) -> Box<[AtomicBool]> {
    let raw: Box<[u8]> = vec![0u8; n].into_boxed_slice();
    // SAFETY: AtomicBool has the size and alignment of u8, and 0 is a valid `false`.
    unsafe { Box::from_raw(Box::into_raw(raw) as *mut [AtomicBool]) }
}

/// The level of slot `id`: -ln(u) / ln(M), u uniform in (0, 1] from a hash of the id.
fn level_of(id: u32, m: usize) -> usize {
    // splitmix64: a well-mixed hash, so levels are independent of insertion order.
    let mut z = u64::from(id).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let u = ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let level = (-u.ln() / (m as f64).ln()).floor();
    (level as usize).min(MAX_LEVEL)
}

thread_local! {
    /// Visited marks for searches on this thread: a generation number per slot, so a search
    /// starts with an O(1) reset instead of clearing (or allocating) a set. One byte a slot
    /// (cleared every 255 searches): a quarter of the cache footprint of u32 marks, which shows
    /// in the search tail.
    static VISITED: RefCell<(u8, Vec<u8>)> = const { RefCell::new((0, Vec::new())) };
}

/// Per-search visited set over `capacity` slots (borrowed from the thread-local).
struct Visited<'a> {
    generation: u8,
    marks: &'a mut Vec<u8>,
}

impl Visited<'_> {
    /// True the first time `slot` is seen in this search.
    #[inline]
    fn first_visit(&mut self, slot: u32) -> bool {
        let m = &mut self.marks[slot as usize];
        if *m == self.generation {
            false
        } else {
            *m = self.generation;
            true
        }
    }
}

fn with_visited<R>(capacity: usize, f: impl FnOnce(&mut Visited<'_>) -> R) -> R {
    VISITED.with(|cell| {
        let mut guard = cell.borrow_mut();
        let (generation, marks) = &mut *guard;
        if marks.len() < capacity {
            marks.resize(capacity, 0);
        }
        *generation = generation.wrapping_add(1);
        if *generation == 0 {
            marks.iter_mut().for_each(|m| *m = 0);
            *generation = 1;
        }
        let mut v = Visited { generation: *generation, marks };
        f(&mut v)
    })
}

/// Holds a node's spin lock; edits of one neighbour list are a few hundred nanoseconds.
struct NodeLock<'a>(&'a AtomicBool);

impl Drop for NodeLock<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Hnsw {
    /// An empty graph for up to `capacity` vectors of `dim` floats. `m` links per node (2m on
    /// level 0); `ef_construction` candidates per insertion.
    pub fn new(dim: usize, capacity: usize, m: usize, ef_construction: usize, precision: Precision) -> Self {
        let m = m.max(2);
        let mut upper_start = Vec::with_capacity(capacity + 1);
        let mut total = 0u64;
        for id in 0..capacity {
            upper_start.push(u32::try_from(total).unwrap_or(u32::MAX));
            total += level_of(id as u32, m) as u64;
        }
        upper_start.push(u32::try_from(total).unwrap_or(u32::MAX));
        Self {
            dim,
            capacity,
            m,
            ef_construction: ef_construction.max(m),
            vectors: match precision {
                Precision::F32 => Vectors::F32(zeroed_cells(capacity * dim)),
                Precision::Bf16 => Vectors::Bf16(zeroed_cells(capacity * dim)),
            },
            state: zeroed_u8(capacity),
            locks: zeroed_bool(capacity),
            links0: zeroed_u32(capacity * (1 + 2 * m)),
            upper_start: upper_start.into_boxed_slice(),
            upper: zeroed_u32(total as usize * (1 + m)),
            entry: AtomicU64::new(NO_ENTRY),
            entry_lock: Mutex::new(()),
            ready: AtomicU32::new(0),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Vectors inserted and searchable.
    pub fn len(&self) -> usize {
        self.ready.load(Ordering::Acquire) as usize
    }

    /// Bytes the arrays hold once full (the resident size grows toward this as slots fill).
    #[cfg(test)]
    pub fn precision(&self) -> Precision {
        match self.vectors {
            Vectors::F32(_) => Precision::F32,
            Vectors::Bf16(_) => Precision::Bf16,
        }
    }

    fn ready_slot(&self, slot: usize) -> bool {
        slot < self.capacity && self.state[slot].load(Ordering::Acquire) == READY
    }

    /// Copy the vector in `slot` (widened to f32) into `out`, once it is searchable.
    pub fn copy_vector(&self, slot: usize, out: &mut Vec<f32>) -> bool {
        if !self.ready_slot(slot) {
            return false;
        }
        self.load(slot, out);
        true
    }

    /// Cosine of unit query `q` with the vector in `slot`, once it is searchable.
    pub fn similarity(&self, slot: usize, q: &[f32]) -> Option<f32> {
        (self.ready_slot(slot) && q.len() == self.dim).then(|| self.dot_q(q, slot))
    }

    /// The vector of a READY slot (or the caller's own, written) as f32.
    fn load(&self, slot: usize, out: &mut Vec<f32>) {
        // SAFETY: callers only pass READY slots or their own written slot.
        match &self.vectors {
            Vectors::F32(v) => {
                out.clear();
                out.extend_from_slice(unsafe { row(v, slot, self.dim) });
            }
            Vectors::Bf16(v) => widen_bf16(unsafe { row(v, slot, self.dim) }, out),
        }
    }

    #[inline]
    fn dot_q(&self, q: &[f32], slot: usize) -> f32 {
        // SAFETY: only READY slots are reached (through links, which only name READY nodes, or
        // checked by the caller).
        match &self.vectors {
            Vectors::F32(v) => dot(q, unsafe { row(v, slot, self.dim) }),
            Vectors::Bf16(v) => dot_bf16(q, unsafe { row(v, slot, self.dim) }),
        }
    }

    /// Ask for the first cache line of `slot`'s vector ahead of its distance: the walk's time
    /// is mostly memory latency (hnswlib and FAISS do the same); the hardware prefetcher
    /// follows the rest of the row.
    #[inline]
    fn prefetch(&self, slot: u32) {
        #[cfg(target_arch = "x86_64")]
        {
            let offset = slot as usize * self.dim;
            let ptr = match &self.vectors {
                Vectors::F32(v) => v.get(offset).map(|c| c.get() as *const i8),
                Vectors::Bf16(v) => v.get(offset).map(|c| c.get() as *const i8),
            };
            if let Some(ptr) = ptr {
                // SAFETY: a prefetch is a hint; it never faults and reads nothing into Rust.
                unsafe { std::arch::x86_64::_mm_prefetch(ptr, std::arch::x86_64::_MM_HINT_T0) };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = slot;
    }

    /// Ask for all of `slot`'s vector: for the row about to be read next, when one line ahead
    /// is not enough to hide the misses of the other 23 (384 f32).
    #[inline]
    fn prefetch_row(&self, slot: u32) {
        #[cfg(target_arch = "x86_64")]
        {
            let (ptr, bytes) = match &self.vectors {
                Vectors::F32(v) => (v.get(slot as usize * self.dim).map(|c| c.get() as *const i8), self.dim * 4),
                Vectors::Bf16(v) => (v.get(slot as usize * self.dim).map(|c| c.get() as *const i8), self.dim * 2),
            };
            if let Some(ptr) = ptr {
                for off in (0..bytes).step_by(64) {
                    // SAFETY: a prefetch is a hint; it never faults and reads nothing into Rust.
                    unsafe { std::arch::x86_64::_mm_prefetch(ptr.wrapping_add(off), std::arch::x86_64::_MM_HINT_T0) };
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = slot;
    }

    /// Distances from `q` to up to four slots, four rows at a time where they are f32.
    #[inline]
    fn distances(&self, q: &[f32], slots: &[u32], out: &mut [f32; 4]) {
        match (&self.vectors, slots) {
            // SAFETY: only READY slots are reached (see `dot_q`).
            (Vectors::F32(v), &[a, b, c, d]) => {
                let r = |s: u32| unsafe { row(v, s as usize, self.dim) };
                let dots = dot4(q, [r(a), r(b), r(c), r(d)]);
                for (o, x) in out.iter_mut().zip(dots) {
                    *o = 1.0 - x;
                }
            }
            _ => {
                for (o, &s) in out.iter_mut().zip(slots) {
                    *o = self.distance(q, s);
                }
            }
        }
    }

    #[inline]
    fn distance(&self, q: &[f32], slot: u32) -> f32 {
        1.0 - self.dot_q(q, slot as usize)
    }

    /// The list of `slot` at `level`: (count word, neighbour words).
    #[inline]
    fn list(&self, slot: u32, level: usize) -> &[AtomicU32] {
        if level == 0 {
            let w = 1 + 2 * self.m;
            &self.links0[slot as usize * w..(slot as usize + 1) * w]
        } else {
            let w = 1 + self.m;
            let start = (self.upper_start[slot as usize] as usize + level - 1) * w;
            &self.upper[start..start + w]
        }
    }

    fn max_links(&self, level: usize) -> usize {
        if level == 0 {
            2 * self.m
        } else {
            self.m
        }
    }

    /// A snapshot of a neighbour list (may be mid-edit; every id in it is a READY node).
    #[inline]
    fn neighbours(&self, slot: u32, level: usize, out: &mut Vec<u32>) {
        let list = self.list(slot, level);
        let n = (list[0].load(Ordering::Acquire) as usize).min(list.len() - 1);
        out.clear();
        out.extend(list[1..=n].iter().map(|a| a.load(Ordering::Relaxed)));
    }

    fn lock(&self, slot: u32) -> NodeLock<'_> {
        let l = &self.locks[slot as usize];
        while l.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            std::hint::spin_loop();
        }
        NodeLock(l)
    }

    fn set_list(&self, slot: u32, level: usize, ids: &[u32]) {
        let list = self.list(slot, level);
        let n = ids.len().min(list.len() - 1);
        for (w, id) in list[1..=n].iter().zip(ids) {
            w.store(*id, Ordering::Relaxed);
        }
        list[0].store(n as u32, Ordering::Release);
    }

    /// Greedy walk on one level toward `q` (ef = 1).
    fn greedy(&self, q: &[f32], mut cur: Dist, level: usize, scratch: &mut Vec<u32>) -> Dist {
        loop {
            let mut improved = false;
            self.neighbours(cur.1, level, scratch);
            for &n in scratch.iter() {
                let d = Dist(self.distance(q, n), n);
                if d < cur {
                    cur = d;
                    improved = true;
                }
            }
            if !improved {
                return cur;
            }
        }
    }

    /// Beam search on one level: the `ef` nearest found from `entry`, nearest first.
    /// Nodes that `accept` refuses (deleted records) are walked through but never returned, so
    /// deletions cost neither recall nor a rebuild.
    fn search_level(
        &self,
        q: &[f32],
        entry: &[Dist],
        ef: usize,
        level: usize,
        visited: &mut Visited<'_>,
        accept: &dyn Fn(u32) -> bool,
    ) -> Vec<Dist> {
        let mut candidates: BinaryHeap<std::cmp::Reverse<Dist>> = BinaryHeap::with_capacity(ef * 2);
        let mut found: BinaryHeap<Dist> = BinaryHeap::with_capacity(ef + 1);
        for &e in entry {
            if visited.first_visit(e.1) {
                candidates.push(std::cmp::Reverse(e));
                if accept(e.1) {
                    found.push(e);
                }
            }
        }
        while found.len() > ef {
            found.pop();
        }
        let mut scratch = Vec::with_capacity(2 * self.m);
        while let Some(std::cmp::Reverse(c)) = candidates.pop() {
            if found.len() >= ef && found.peek().is_some_and(|worst| c.0 > worst.0) {
                break;
            }
            self.neighbours(c.1, level, &mut scratch);
            scratch.retain(|&n| visited.first_visit(n));
            // The first line of every new neighbour at once (the misses overlap; the hardware
            // follows the rest of each row). Whole rows asked for ahead were slower, build and
            // search: 24 lines each fill the line buffers, and a prefetch then waits like a load.
            for &n in &scratch {
                self.prefetch(n);
            }
            let mut dists = [0f32; 4];
            for (i, &n) in scratch.iter().enumerate() {
                if i % 4 == 0 {
                    let batch = &scratch[i..scratch.len().min(i + 4)];
                    self.distances(q, batch, &mut dists);
                }
                let d = Dist(dists[i % 4], n);
                if found.len() < ef || found.peek().is_some_and(|worst| d < *worst) {
                    candidates.push(std::cmp::Reverse(d));
                    if accept(n) {
                        found.push(d);
                        if found.len() > ef {
                            found.pop();
                        }
                    }
                }
            }
        }
        found.into_sorted_vec()
    }

    /// The heuristic of the paper (alg. 4): keep a candidate only if it is closer to the base
    /// than to every neighbour already kept, so links spread in all directions.
    ///
    /// Most of a build's time is here (every full neighbour list is re-selected when a new node
    /// links to it), so f32 rows are compared where they lie, with no copy of the candidate.
    fn select(&self, sorted: &[Dist], max: usize) -> Vec<u32> {
        let mut kept: Vec<u32> = Vec::with_capacity(max);
        let mut cv = Vec::new();
        for (i, &c) in sorted.iter().enumerate() {
            if kept.len() >= max {
                break;
            }
            if let Some(next) = sorted.get(i + 1) {
                self.prefetch_row(next.1);
            }
            let keep = match &self.vectors {
                // SAFETY: candidates and kept links are READY slots (or the caller's own).
                Vectors::F32(v) => {
                    let cr = unsafe { row(v, c.1 as usize, self.dim) };
                    let r = |k: u32| unsafe { row(v, k as usize, self.dim) };
                    // Four kept rows at a time: a kept candidate is compared with every one,
                    // and the four chains overlap (a rejection wastes at most three dots).
                    let mut groups = kept.chunks_exact(4);
                    let rest = groups.remainder();
                    let far = |d: f32| 1.0 - d > c.0;
                    groups.all(|g| dot4(cr, [r(g[0]), r(g[1]), r(g[2]), r(g[3])]).into_iter().all(far))
                        && rest.iter().all(|&k| far(dot(cr, r(k))))
                }
                Vectors::Bf16(_) => {
                    self.load(c.1 as usize, &mut cv);
                    kept.iter().all(|&k| self.distance(&cv, k) > c.0)
                }
            };
            if keep {
                kept.push(c.1);
            }
        }
        kept
    }

    /// Insert `v` (unit length, `dim` floats) at `slot`. Safe to call from many threads at
    /// once for different slots. Returns false (and does nothing) if `slot` is out of range,
    /// already used, or `v` has the wrong size.
    pub fn insert(&self, slot: usize, v: &[f32]) -> bool {
        if slot >= self.capacity || v.len() != self.dim {
            return false;
        }
        if self.state[slot].compare_exchange(EMPTY, WRITING, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            return false;
        }
        let start = slot * self.dim;
        // SAFETY (both arms): this thread owns the slot (WRITING); nobody reads it before READY.
        match &self.vectors {
            Vectors::F32(cells) => {
                for (cell, x) in cells[start..start + self.dim].iter().zip(v) {
                    unsafe { *cell.get() = *x };
                }
            }
            Vectors::Bf16(cells) => {
                for (cell, x) in cells[start..start + self.dim].iter().zip(v) {
                    unsafe { *cell.get() = to_bf16(*x) };
                }
            }
        }
        let id = slot as u32;
        let level = level_of(id, self.m);
        self.state[slot].store(READY, Ordering::Release);

        let mut entry = self.entry.load(Ordering::Acquire);
        if entry == NO_ENTRY {
            let _g = self.entry_lock.lock().unwrap_or_else(|p| p.into_inner());
            entry = self.entry.load(Ordering::Acquire);
            if entry == NO_ENTRY {
                self.entry.store((level as u64) << 32 | u64::from(id), Ordering::Release);
                self.ready.fetch_add(1, Ordering::AcqRel);
                return true;
            }
        }
        let (top, ep) = ((entry >> 32) as usize, entry as u32);
        // The caller's f32 vector is the query (with bf16 storage, more precise than the copy).
        let q = v;
        let mut scratch = Vec::with_capacity(2 * self.m);
        let mut cur = Dist(self.distance(q, ep), ep);
        for l in (level + 1..=top).rev() {
            cur = self.greedy(q, cur, l, &mut scratch);
        }
        let mut entries = vec![cur];
        for l in (0..=level.min(top)).rev() {
            let found = with_visited(self.capacity, |vis| {
                vis.first_visit(id);
                self.search_level(q, &entries, self.ef_construction, l, vis, &|_| true)
            });
            // As FAISS: up to 2m links on level 0 from the start, not only when others link
            // back (hnswlib's m). At 1M vectors m alone cost 2 points of recall@10.
            let chosen = self.select(&found, self.max_links(l));
            {
                // Another inserter may already have linked itself to this node on this level
                // (it is reachable from above): keep those links in the choice.
                let _g = self.lock(id);
                let mut merged = Vec::new();
                self.neighbours(id, l, &mut merged);
                if merged.is_empty() {
                    self.set_list(id, l, &chosen);
                } else {
                    let extra: Vec<u32> = chosen.iter().copied().filter(|c| !merged.contains(c)).collect();
                    merged.extend(extra);
                    let mut all: Vec<Dist> = merged.iter().map(|&s| Dist(self.distance(q, s), s)).collect();
                    all.sort_unstable();
                    let kept = self.select(&all, self.max_links(l));
                    self.set_list(id, l, &kept);
                }
            }
            for &n in &chosen {
                self.link_back(n, id, l);
            }
            entries = found;
        }
        if level > top {
            let _g = self.entry_lock.lock().unwrap_or_else(|p| p.into_inner());
            let now = self.entry.load(Ordering::Acquire);
            if now == NO_ENTRY || (now >> 32) < level as u64 {
                self.entry.store((level as u64) << 32 | u64::from(id), Ordering::Release);
            }
        }
        self.ready.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Add `new` to `node`'s list at `level`, shrinking it by the heuristic when full.
    fn link_back(&self, node: u32, new: u32, level: usize) {
        let _g = self.lock(node);
        let list = self.list(node, level);
        let n = list[0].load(Ordering::Acquire) as usize;
        let max = self.max_links(level);
        if n < max {
            list[1 + n].store(new, Ordering::Relaxed);
            list[0].store(n as u32 + 1, Ordering::Release);
            return;
        }
        let mut base = Vec::with_capacity(self.dim);
        self.load(node as usize, &mut base);
        let slots: Vec<u32> =
            list[1..=n].iter().map(|a| a.load(Ordering::Relaxed)).chain(std::iter::once(new)).collect();
        let mut all = Vec::with_capacity(slots.len());
        let mut d4 = [0f32; 4];
        for batch in slots.chunks(4) {
            self.distances(&base, batch, &mut d4);
            all.extend(batch.iter().zip(d4).map(|(&s, d)| Dist(d, s)));
        }
        all.sort_unstable();
        let kept = self.select(&all, max);
        self.set_list(node, level, &kept);
    }

    /// The `k` nearest slots to `q` (unit length) with their distance (1 - cosine), nearest
    /// first, exploring `ef` candidates on level 0.
    #[cfg(test)]
    pub fn search(&self, q: &[f32], k: usize, ef: usize) -> Vec<(u32, f32)> {
        self.search_filtered(q, k, ef, &|_| true)
    }

    /// [`Self::search`] returning only slots that `accept` takes (the others are still walked).
    pub fn search_filtered(&self, q: &[f32], k: usize, ef: usize, accept: &dyn Fn(u32) -> bool) -> Vec<(u32, f32)> {
        let entry = self.entry.load(Ordering::Acquire);
        if entry == NO_ENTRY || q.len() != self.dim || k == 0 {
            return Vec::new();
        }
        let (top, ep) = ((entry >> 32) as usize, entry as u32);
        let mut scratch = Vec::with_capacity(2 * self.m);
        let mut cur = Dist(self.distance(q, ep), ep);
        for l in (1..=top).rev() {
            cur = self.greedy(q, cur, l, &mut scratch);
        }
        let found = with_visited(self.capacity, |vis| self.search_level(q, &[cur], ef.max(k), 0, vis, accept));
        found.into_iter().take(k).map(|d| (d.1, d.0)).collect()
    }

    /// Insert rows `0..count` at `first + i` on `threads` threads; `row(i, buf)` fills `buf`
    /// with row i (returning false skips it), so a rebuild reads from the old graph without
    /// copying it whole.
    pub fn insert_parallel(
        &self,
        first: usize,
        count: usize,
        threads: usize,
        row: &(dyn Fn(usize, &mut Vec<f32>) -> bool + Sync),
    ) {
        let next = AtomicU32::new(0);
        let work = || {
            let mut buf = Vec::with_capacity(self.dim);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= count {
                    return;
                }
                if row(i, &mut buf) {
                    self.insert(first + i, &buf);
                }
            }
        };
        std::thread::scope(|s| {
            for _ in 1..threads.max(1) {
                s.spawn(work);
            }
            work();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vector::normalised;

    fn rng(seed: &mut u64) -> f32 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        (*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }

    fn data(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut s = seed;
        (0..n).map(|_| normalised(&(0..dim).map(|_| rng(&mut s)).collect::<Vec<_>>()).unwrap()).collect()
    }

    fn exact(data: &[Vec<f32>], q: &[f32], k: usize) -> Vec<u32> {
        let mut all: Vec<Dist> = data.iter().enumerate().map(|(i, v)| Dist(1.0 - dot(q, v), i as u32)).collect();
        all.sort_unstable();
        all.into_iter().take(k).map(|d| d.1).collect()
    }

    fn build(vs: &[Vec<f32>], capacity: usize, m: usize, ef: usize, precision: Precision, threads: usize) -> Hnsw {
        let g = Hnsw::new(vs[0].len(), capacity, m, ef, precision);
        g.insert_parallel(0, vs.len(), threads, &|i, buf| {
            buf.clear();
            buf.extend_from_slice(&vs[i]);
            true
        });
        g
    }

    #[test]
    fn finds_the_exact_neighbours_of_most_queries_when_built_on_several_threads() {
        let (n, dim, k) = (5000, 32, 10);
        let vs = data(n, dim, 7);
        let queries = data(200, dim, 99);
        for precision in [Precision::F32, Precision::Bf16] {
            let g = build(&vs, n, 16, 200, precision, 4);
            assert_eq!(g.len(), n);
            let mut hit = 0;
            for q in &queries {
                let want = exact(&vs, q, k);
                let got: Vec<u32> = g.search(q, k, 96).into_iter().map(|x| x.0).collect();
                hit += got.iter().filter(|x| want.contains(x)).count();
            }
            let recall = hit as f64 / (queries.len() * k) as f64;
            assert!(recall >= 0.95, "{precision:?}: recall@10 {recall}");
        }
    }

    #[test]
    fn every_inserted_vector_finds_itself_first() {
        let vs = data(3000, 24, 3);
        let g = Hnsw::new(24, 4000, 8, 100, Precision::F32);
        for (i, v) in vs.iter().enumerate() {
            assert!(g.insert(i, v));
        }
        let misses = vs.iter().enumerate().filter(|(i, v)| g.search(v, 1, 64).first().map(|x| x.0) != Some(*i as u32));
        assert!(misses.count() <= 3, "a vector's nearest neighbour is itself");
        let (slot, d) = g.search(&vs[5], 1, 64)[0];
        assert_eq!(slot, 5);
        assert!(d.abs() < 1e-5);
    }

    #[test]
    fn refuses_reused_out_of_range_and_mis_sized_slots() {
        let g = Hnsw::new(4, 2, 4, 8, Precision::F32);
        assert!(g.search(&[1.0, 0.0, 0.0, 0.0], 3, 8).is_empty(), "empty graph");
        assert!(g.insert(0, &[1.0, 0.0, 0.0, 0.0]));
        assert!(!g.insert(0, &[0.0, 1.0, 0.0, 0.0]), "slot 0 is taken");
        assert!(!g.insert(2, &[0.0, 1.0, 0.0, 0.0]), "past capacity");
        assert!(!g.insert(1, &[0.0, 1.0]), "wrong dim");
        let mut out = Vec::new();
        assert!(g.copy_vector(0, &mut out));
        assert_eq!(out, vec![1.0, 0.0, 0.0, 0.0]);
        assert!(!g.copy_vector(1, &mut out));
        assert_eq!(g.similarity(0, &[0.6, 0.8, 0.0, 0.0]), Some(0.6));
        assert_eq!(g.similarity(1, &[0.6, 0.8, 0.0, 0.0]), None);
        assert_eq!(g.len(), 1);
        assert_eq!(g.search(&[0.0, 0.0, 1.0, 0.0], 3, 8).len(), 1);
    }

    #[test]
    fn bf16_storage_keeps_cosines_within_a_hundredth() {
        let vs = data(500, 384, 5);
        let g = build(&vs, 500, 8, 64, Precision::Bf16, 1);
        assert_eq!(g.precision(), Precision::Bf16);
        for (i, v) in vs.iter().enumerate().step_by(37) {
            let s = g.similarity(i, v).unwrap();
            assert!((s - 1.0).abs() < 1e-2, "self-similarity {s}");
            let other = &vs[(i + 1) % vs.len()];
            assert!((g.similarity(i, other).unwrap() - dot(v, other)).abs() < 1e-2);
        }
    }

    #[test]
    fn searches_running_during_inserts_only_return_complete_nodes() {
        let (n, dim) = (4000, 16);
        let vs = data(n, dim, 11);
        let g = Hnsw::new(dim, n, 8, 64, Precision::F32);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut searches = 0;
                let mut out = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    for (slot, _) in g.search(&vs[searches % n], 5, 32) {
                        assert!(g.copy_vector(slot as usize, &mut out), "slot {slot} returned before it was ready");
                    }
                    searches += 1;
                }
                searches
            });
            g.insert_parallel(0, n, 2, &|i, buf| {
                buf.clear();
                buf.extend_from_slice(&vs[i]);
                true
            });
            stop.store(true, Ordering::Relaxed);
            assert!(reader.join().unwrap() > 0);
        });
        assert_eq!(g.len(), n);
    }

    #[test]
    fn levels_follow_the_geometric_law() {
        let n = 100_000u32;
        let upper = (0..n).filter(|id| level_of(*id, 16) > 0).count() as f64 / f64::from(n);
        assert!((upper - 1.0 / 16.0).abs() < 0.01, "share of nodes above level 0: {upper}");
        assert_eq!(level_of(42, 16), level_of(42, 16));
    }
}
