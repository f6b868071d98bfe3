//! prism-memory: the memory loop's store.
//!
//! - [`Memory`] (`store.rs`): the durable request log (group commit: a write is acknowledged only
//!   once it is durable), search over every logged vector, corrections aggregated per model
//!   revision, the corrections exported as a training set, retention by age and size. What is
//!   logged and the reads a store answers are `log.rs` (`LogBackend`), with one implementation
//!   per store: `sqlite.rs` (one file, WAL, `synchronous=FULL`) and `pg.rs` (one PostgreSQL
//!   database shared by several routers, each one's vector index catching up on what the others
//!   commit).
//! - [`VectorIndex`] (`index.rs`): cosine search per (pipeline, key, dim), exact while small and
//!   through our flat-array HNSW graph (`hnsw.rs`) past [`ANN_MIN_VECTORS`], kept up to date by
//!   a background indexer; retention hides vectors at once and compacts in the background.
//! - [`RecentAnswers`] (`answers.rs`): the bounded in-process set of recent whole answers behind
//!   `degradation.onMissingRequired: cached` when the router has no memory store.
//! - [`Memory::nearest_answer`] (`answers_store.rs`): the same lookup over the request log, the
//!   answer cache when memory is on (durable; shared by the routers of one PostgreSQL database).

mod answers;
mod answers_store;
mod hnsw;
mod index;
mod log;
mod pg;
mod sqlite;
mod store;
mod vector;

pub use answers::{similarity, RecentAnswers};
pub use hnsw::Precision;
pub use index::{Hit, VectorIndex, ANN_MIN_VECTORS, FUSED};
pub use log::{Correction, MemoryError, Record};
pub use store::{logged_inputs, Memory, RevisionFeedback, StoredRecord};
pub use vector::kernel_name as vector_kernel;
