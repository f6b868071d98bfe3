//! prism-memory: the memory loop's store.
//!
//! - [`Memory`] (`store.rs`): the durable request log in one SQLite file (WAL,
//!   `synchronous=FULL`, group commit: a write is acknowledged only once it is on disk), exact
//!   cosine search over every logged vector, corrections aggregated per model revision, the
//!   corrections exported as a training set, retention by age.
//!   The same [`Memory`] on PostgreSQL ([`Memory::open_postgres`], `pg.rs`): one database shared
//!   by several routers, each one's vector index catching up on what the others commit.
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
mod pg;
mod store;
mod vector;

pub use answers::{similarity, RecentAnswers};
pub use hnsw::Precision;
pub use index::{VectorIndex, ANN_MIN_VECTORS};
pub use store::{logged_inputs, Correction, Hit, Memory, MemoryError, Record, RevisionFeedback, StoredRecord, FUSED};
pub use vector::kernel_name as vector_kernel;
