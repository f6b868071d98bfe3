//! `prism rollout history|undo`: the cluster side of model rollouts, like `kubectl rollout` for
//! Deployments. History is `status.history` of the ModalityNode; undo writes a recorded
//! revision's model back into `spec.model`, which the operator then serves at once (a revision
//! that was served before needs no canary).

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use kube::api::{Patch, PatchParams};
use kube::Api;
use prism_api::ModalityNode;

#[derive(Subcommand)]
pub enum RolloutCmd {
    /// Print a node's revisions: when each was deployed, promoted, rolled back or superseded, and why.
    History(Target),
    /// Put a recorded revision back into spec.model (default: the previous served revision).
    Undo {
        #[command(flatten)]
        target: Target,
        /// Revision to return to (any Deployed/Promoted revision in status.history).
        #[arg(long)]
        to_revision: Option<String>,
    },
}

#[derive(Args)]
pub struct Target {
    /// ModalityNode name.
    pub node: String,
    /// Namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
}

pub(crate) async fn node_api(t: &Target) -> anyhow::Result<Api<ModalityNode>> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (KUBECONFIG or in-cluster config)")?;
    Ok(match &t.namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::default_namespaced(client),
    })
}

pub async fn run(cmd: RolloutCmd) -> anyhow::Result<()> {
    match cmd {
        RolloutCmd::History(t) => {
            let mn =
                node_api(&t).await?.get(&t.node).await.with_context(|| format!("reading modalitynode {}", t.node))?;
            let st = mn.status.unwrap_or_default();
            println!("modalitynode/{}: current revision {}", t.node, st.current_revision.as_deref().unwrap_or("-"));
            if let Some(c) = &st.canary {
                println!(
                    "canary: revision {} at {}% (step {}, since {})",
                    c.revision,
                    c.weight,
                    c.step + 1,
                    c.step_started
                );
            }
            println!("{:<12} {:<11} {:<21} {:<40} REASON", "REVISION", "OUTCOME", "TIME", "MODEL");
            for r in &st.history {
                let uri = r.model.as_ref().map_or("-", |m| m.uri.as_str());
                println!("{:<12} {:<11} {:<21} {:<40} {}", r.revision, r.outcome, r.time, uri, r.reason);
            }
            Ok(())
        }
        RolloutCmd::Undo { target, to_revision } => {
            let api = node_api(&target).await?;
            let mn = api.get(&target.node).await.with_context(|| format!("reading modalitynode {}", target.node))?;
            let st = mn.status.clone().unwrap_or_default();
            let record = prism_operator::rollout::rollback_target(&mn.spec, &st, to_revision.as_deref())
                .map_err(|e| anyhow::anyhow!("modalitynode/{}: {e}", target.node))?;
            let Some(model) = &record.model else { bail!("revision {} has no recorded model", record.revision) };
            if &mn.spec.model == model {
                println!("modalitynode/{} already names revision {}", target.node, record.revision);
                return Ok(());
            }
            // A merge patch of spec.model only, guarded by resourceVersion: a concurrent edit
            // fails with a conflict instead of being overwritten.
            let patch = serde_json::json!({
                "metadata": {"resourceVersion": mn.metadata.resource_version},
                "spec": {"model": model},
            });
            api.patch(&target.node, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .with_context(|| format!("patching modalitynode {}", target.node))?;
            println!(
                "modalitynode/{} rolled back to revision {} ({}); the operator serves it without a canary.\nIf the node is synced from git (Argo CD, Flux), change the manifest there too, or the next sync reverts this.",
                target.node, record.revision, model.uri
            );
            Ok(())
        }
    }
}
