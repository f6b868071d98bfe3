//! Why a node's pods are not serving, in the words `kubectl describe pod` would use: the kubelet's
//! waiting reasons (ImagePullBackOff, CrashLoopBackOff, ...), OOMKilled from the last
//! termination, and the last line the container logged before it died. The node controller puts
//! the first problem into the ModalityNode's Ready and Degraded conditions, so `kubectl get mn`
//! names the cause instead of a bare `Ready=False`.
//!
//! Containers are rendered with `terminationMessagePolicy: FallbackToLogsOnError`, so the kubelet
//! copies the tail of a failed container's log into `lastState.terminated.message`.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::ResourceExt;

/// The init container that fetches hf:// and oci:// models (node.rs).
pub const FETCH_CONTAINER: &str = "fetch-model";

/// One pod's reason for not serving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodProblem {
    pub pod: String,
    pub container: String,
    /// A condition reason (CamelCase): the kubelet's own where it has one.
    pub reason: String,
    pub message: String,
}

impl PodProblem {
    /// `pod P container C: message`, for condition messages and events.
    pub fn describe(&self) -> String {
        format!("pod {} container {}: {}", self.pod, self.container, self.message)
    }
}

/// Waiting reasons that mean the container cannot start until someone changes something.
const STUCK: [&str; 7] = [
    "ImagePullBackOff",
    "ErrImagePull",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// Longest log line quoted in a condition (conditions are read in a terminal).
const MAX_LINE: usize = 300;

/// What to quote from a termination message (the log tail): its last line that reports an
/// error (a backtrace may follow it), else its last non-empty line, shortened.
fn last_line(message: Option<&str>) -> Option<String> {
    let lines: Vec<&str> = message?.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let line = lines.iter().rev().find(|l| l.to_ascii_lowercase().contains("error")).or(lines.last())?;
    Some(if line.chars().count() > MAX_LINE {
        format!("{}...", line.chars().take(MAX_LINE).collect::<String>())
    } else {
        line.to_string()
    })
}

/// What one container reports, or None while it is fine (or merely starting).
fn container_problem(cs: &ContainerStatus, init: bool) -> Option<(String, String)> {
    let c = &cs.name;
    let last = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref());
    let now_terminated = cs.state.as_ref().and_then(|s| s.terminated.as_ref());
    let oom = |t: &k8s_openapi::api::core::v1::ContainerStateTerminated| t.reason.as_deref() == Some("OOMKilled");
    let log = |t: &k8s_openapi::api::core::v1::ContainerStateTerminated| {
        last_line(t.message.as_deref()).map(|l| format!("; log: {l}")).unwrap_or_default()
    };
    // OOM first: it is the cause users act on (raise spec.resources.memory), whatever the
    // container is doing now.
    if let Some(t) = now_terminated.filter(|t| oom(t)).or(last.filter(|t| oom(t) && !cs.ready)) {
        return Some((
            "OOMKilled".into(),
            format!(
                "container {c} was killed for exceeding its memory limit (exit code {}, {} restarts); \
                 raise spec.resources.memory",
                t.exit_code, cs.restart_count
            ),
        ));
    }
    if let Some(w) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) {
        let reason = w.reason.as_deref().unwrap_or_default();
        let msg = w.message.clone().unwrap_or_default();
        if STUCK.contains(&reason) {
            return Some((reason.to_string(), format!("{reason}: {msg}").trim_end_matches(": ").to_string()));
        }
        if reason == "CrashLoopBackOff" {
            let exit = last.map(|t| format!(" (last exit code {})", t.exit_code)).unwrap_or_default();
            let tail = last.map(log).unwrap_or_default();
            if init && c == FETCH_CONTAINER {
                return Some((
                    "ModelFetchFailed".into(),
                    format!("fetching spec.model.uri failed {} times{exit}{tail}", cs.restart_count),
                ));
            }
            return Some((
                "CrashLoopBackOff".into(),
                format!("container {c} keeps exiting ({} restarts){exit}{tail}", cs.restart_count),
            ));
        }
    }
    // A failed init container is restarted under the pod's policy; between tries it is
    // terminated, not waiting.
    if let Some(t) = now_terminated.filter(|t| init && t.exit_code != 0) {
        let reason = if c == FETCH_CONTAINER { "ModelFetchFailed" } else { "InitContainerFailed" };
        return Some((reason.into(), format!("init container {c} exited with code {}{}", t.exit_code, log(t))));
    }
    None
}

/// The first problem of a pod: init containers first (they block the server), then the rest.
pub fn pod_problem(pod: &Pod) -> Option<PodProblem> {
    let st = pod.status.as_ref()?;
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let init = st.init_container_statuses.iter().flatten().map(|c| (c, true));
    let main = st.container_statuses.iter().flatten().map(|c| (c, false));
    for (cs, is_init) in init.chain(main) {
        if let Some((reason, message)) = container_problem(cs, is_init) {
            return Some(PodProblem { pod: pod.name_any(), container: cs.name.clone(), reason, message });
        }
    }
    // Not placed at all: the scheduler says why (no GPU of that kind, taints, ...).
    let unschedulable =
        st.conditions.iter().flatten().find(|c| {
            c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable")
        })?;
    Some(PodProblem {
        pod: pod.name_any(),
        container: "-".into(),
        reason: "Unschedulable".into(),
        message: unschedulable.message.clone().unwrap_or_else(|| "no node fits the pod".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStateWaiting, PodCondition, PodStatus,
    };
    use kube::api::ObjectMeta;

    fn waiting(name: &str, reason: &str, message: &str) -> ContainerStatus {
        ContainerStatus {
            name: name.into(),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting { reason: Some(reason.into()), message: Some(message.into()) }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn terminated(reason: &str, code: i32, message: &str) -> ContainerState {
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                reason: Some(reason.into()),
                exit_code: code,
                message: Some(message.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pod(init: Vec<ContainerStatus>, main: Vec<ContainerStatus>) -> Pod {
        Pod {
            metadata: ObjectMeta { name: Some("text-abc".into()), ..Default::default() },
            status: Some(PodStatus {
                init_container_statuses: (!init.is_empty()).then_some(init),
                container_statuses: Some(main),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn image_pull_back_off_is_named_with_the_kubelets_message() {
        let p = pod(vec![], vec![waiting("node", "ImagePullBackOff", "Back-off pulling image \"nope:1\"")]);
        let got = pod_problem(&p).expect("a problem");
        assert_eq!(got.reason, "ImagePullBackOff");
        assert_eq!(got.container, "node");
        assert!(
            got.describe().contains("pod text-abc container node: ImagePullBackOff: Back-off pulling image"),
            "{got:?}"
        );
    }

    #[test]
    fn crash_loop_quotes_the_last_log_line_and_exit_code() {
        let mut cs = waiting("node", "CrashLoopBackOff", "back-off 40s restarting failed container");
        cs.restart_count = 3;
        cs.last_state =
            Some(terminated("Error", 1, "loading\nError: model folder /models/x: config.json not found\n\n"));
        let got = pod_problem(&pod(vec![], vec![cs])).expect("a problem");
        assert_eq!(got.reason, "CrashLoopBackOff");
        assert!(got.message.contains("3 restarts"), "{}", got.message);
        assert!(got.message.contains("last exit code 1"), "{}", got.message);
        assert!(got.message.ends_with("log: Error: model folder /models/x: config.json not found"), "{}", got.message);
        // A backtrace after the error does not hide it.
        let tail =
            "Error: loading model: model folder /models/y does not exist\nStack backtrace:\n   0: main\n   1: _start\n";
        assert_eq!(
            last_line(Some(tail)).as_deref(),
            Some("Error: loading model: model folder /models/y does not exist")
        );
    }

    #[test]
    fn oom_killed_wins_over_crash_loop_and_says_what_to_raise() {
        let mut cs = waiting("node", "CrashLoopBackOff", "back-off");
        cs.last_state = Some(terminated("OOMKilled", 137, ""));
        let got = pod_problem(&pod(vec![], vec![cs])).expect("a problem");
        assert_eq!(got.reason, "OOMKilled");
        assert!(got.message.contains("spec.resources.memory"), "{}", got.message);
        // Ready again after an old OOM: no problem.
        let mut ok = ContainerStatus { name: "node".into(), ready: true, ..Default::default() };
        ok.last_state = Some(terminated("OOMKilled", 137, ""));
        assert_eq!(pod_problem(&pod(vec![], vec![ok])), None);
    }

    #[test]
    fn a_failing_model_fetch_is_model_fetch_failed_with_its_error() {
        let mut fetch = waiting(FETCH_CONTAINER, "CrashLoopBackOff", "back-off");
        fetch.restart_count = 2;
        fetch.last_state =
            Some(terminated("Error", 1, "prism-node fetch: error: oci://reg/m:v1: manifest unknown (404)"));
        let main = waiting("node", "PodInitializing", "");
        let got = pod_problem(&pod(vec![fetch], vec![main])).expect("a problem");
        assert_eq!((got.reason.as_str(), got.container.as_str()), ("ModelFetchFailed", FETCH_CONTAINER));
        assert!(got.message.contains("manifest unknown (404)"), "{}", got.message);

        let mut once = ContainerStatus { name: FETCH_CONTAINER.into(), ..Default::default() };
        once.state = Some(terminated("Error", 1, "prism-node fetch: error: hf://x/y: 401"));
        let got = pod_problem(&pod(vec![once], vec![])).expect("a problem");
        assert_eq!(got.reason, "ModelFetchFailed");
        assert!(got.message.ends_with("log: prism-node fetch: error: hf://x/y: 401"), "{}", got.message);
    }

    #[test]
    fn starting_and_serving_pods_have_no_problem() {
        assert_eq!(pod_problem(&pod(vec![], vec![waiting("node", "ContainerCreating", "")])), None);
        let ok = ContainerStatus { name: "node".into(), ready: true, ..Default::default() };
        assert_eq!(pod_problem(&pod(vec![], vec![ok])), None);
        let long = "x".repeat(1000);
        assert_eq!(last_line(Some(&long)).map(|l| l.chars().count()), Some(MAX_LINE + 3));
    }

    #[test]
    fn unschedulable_pods_carry_the_schedulers_message() {
        let mut p = pod(vec![], vec![]);
        if let Some(st) = p.status.as_mut() {
            st.container_statuses = None;
            st.conditions = Some(vec![PodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                reason: Some("Unschedulable".into()),
                message: Some("0/3 nodes are available: 3 Insufficient nvidia.com/gpu.".into()),
                ..Default::default()
            }]);
        }
        let got = pod_problem(&p).expect("a problem");
        assert_eq!(got.reason, "Unschedulable");
        assert!(got.message.contains("Insufficient nvidia.com/gpu"));
    }
}
