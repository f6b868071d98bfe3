//! Kubernetes Events, as `kubectl describe` shows them. One helper for every writer (the
//! controllers and the autoscaler), so an Event that cannot be written never fails a decision.

use kube::runtime::events::{Event, EventType, Recorder};
use tracing::warn;

/// Records an Event; one that cannot be written is logged, never an error of the decision it
/// describes. Shared by the controllers and the autoscaler.
pub async fn publish(
    recorder: &Recorder,
    obj_ref: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let ev = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
    if let Err(e) = recorder.publish(&ev, obj_ref).await {
        warn!(error = %e, reason, "publishing event failed");
    }
}
