//! prism-memory: the memory loop's store.
//!
//! - [`Memory`] (`store.rs`): the durable request log in one SQLite file (WAL,
//!   `synchronous=FULL`, group commit: a write is acknowledged only once it is on disk), exact
//!   cosine search over every logged vector, corrections aggregated per model revision, the
//!   corrections exported as a training set, retention by age.
//!   The same [`Memory`] on PostgreSQL ([`Memory::open_postgres`], `pg.rs`): one database shared
//!   by several routers, each one's vector index catching up on what the others commit.
//! - [`RecentAnswers`] (`answers.rs`): the bounded in-process set of recent whole answers behind
//!   `degradation.onMissingRequired: cached`.

mod answers;
mod pg;
mod store;
mod vector;

pub use answers::{similarity, RecentAnswers};
pub use store::{
    logged_inputs, Correction, Hit, Memory, MemoryError, Record, RevisionFeedback, StoredRecord, VectorIndex,
    ANN_MIN_VECTORS, FUSED,
};
