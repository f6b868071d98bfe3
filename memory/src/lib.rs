//! prism-memory: the memory loop's store.
//!
//! Built so far: [`RecentAnswers`], the bounded in-process set of recent whole answers behind
//! `degradation.onMissingRequired: cached`. The durable request log, ANN search and
//! corrections (DESIGN.md, memory loop) build on the same similarity rule.

mod answers;

pub use answers::{similarity, RecentAnswers};
