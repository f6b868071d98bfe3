//! `prism adapt start|status NODE`: the cluster side of `spec.adaptation` (distributed LoRA
//! fine-tuning). `start` stamps the node's `prism.dev/adapt-request` annotation, which the
//! operator turns into one run, the way `kubectl rollout restart` stamps a Deployment.

use anyhow::{bail, Context};
use clap::Subcommand;
use kube::api::{Patch, PatchParams};
use prism_api::node::ADAPT_REQUEST_ANNOTATION;

use crate::rollout::{node_api, Target};

#[derive(Subcommand)]
pub enum AdaptCmd {
    /// Ask the operator for one adaptation run now (the node needs spec.adaptation).
    Start(Target),
    /// Print the last run: phase, workers, progress from its Job, and what it produced.
    Status(Target),
}

pub async fn run(cmd: AdaptCmd) -> anyhow::Result<()> {
    match cmd {
        AdaptCmd::Start(t) => {
            let api = node_api(&t).await?;
            let mn = api.get(&t.node).await.with_context(|| format!("reading modalitynode {}", t.node))?;
            if mn.spec.adaptation.is_none() {
                bail!(
                    "modalitynode/{} has no spec.adaptation: add one (docs/distributed-training.md) before asking for a run",
                    t.node
                );
            }
            let stamp = prism_operator::now_rfc3339();
            let patch = serde_json::json!({"metadata": {"annotations": {ADAPT_REQUEST_ANNOTATION: stamp}}});
            api.patch(&t.node, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .with_context(|| format!("annotating modalitynode {}", t.node))?;
            let ns = t.namespace.as_deref().map(|n| format!(" -n {n}")).unwrap_or_default();
            println!(
                "modalitynode/{} asked for an adaptation run ({ADAPT_REQUEST_ANNOTATION}={stamp}).\nWatch it: prism adapt status {}{ns}   (or kubectl get jobs{ns} -l prism.dev/adapts={} -w)",
                t.node, t.node, t.node
            );
            Ok(())
        }
        AdaptCmd::Status(t) => {
            let mn =
                node_api(&t).await?.get(&t.node).await.with_context(|| format!("reading modalitynode {}", t.node))?;
            let Some(spec) = &mn.spec.adaptation else {
                bail!("modalitynode/{} has no spec.adaptation", t.node);
            };
            println!(
                "modalitynode/{}: {} workers x {} GPUs, LoRA rank {} alpha {}, trigger: {}",
                t.node,
                spec.workers,
                spec.gpus_per_worker,
                spec.lora.rank,
                spec.lora.alpha,
                spec.trigger.every_corrections.map_or("on request".to_string(), |n| format!("every {n} corrections"))
            );
            let st = mn.status.unwrap_or_default();
            let Some(a) = &st.adaptation else {
                println!("no run yet: `prism adapt start {}` asks for one", t.node);
                return Ok(());
            };
            println!("run {}: {} ({})", a.run, a.phase, a.trigger);
            if let Some(job) = &a.job {
                println!(
                    "job/{job}: {} active ({} ready), {} succeeded, {} failed of {} workers",
                    a.active, a.ready, a.succeeded, a.failed, a.workers
                );
            }
            println!("{}", a.message);
            if let Some(s) = &a.start_time {
                println!(
                    "started {s}{}",
                    a.completion_time.as_deref().map(|c| format!(", ended {c}")).unwrap_or_default()
                );
            }
            if let Some(r) = &a.output_revision {
                println!("last result: revision {r} (see `prism rollout history {}`)", t.node);
            }
            Ok(())
        }
    }
}
