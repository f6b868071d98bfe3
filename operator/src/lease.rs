//! Leader election on a coordination.k8s.io/v1 Lease, so two operator replicas are safe:
//! only the holder runs the controllers (and so is the only writer). A replica that cannot
//! renew within the lease duration reports the loss; `main` then exits rather than keep
//! writing without knowing who leads (the Deployment restarts it as a standby).

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
    pub renew_every: Duration,
}

/// Outcome of one acquire-or-renew attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    Held,
    HeldByOther(String),
}

/// Pure decision: may `me` take or keep the lease as observed at `now`?
pub fn may_acquire(spec: &LeaseSpec, me: &str, now: Timestamp, default_duration: Duration) -> bool {
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == me {
        return true;
    }
    let dur = spec.lease_duration_seconds.map(|s| Duration::from_secs(s.max(0) as u64)).unwrap_or(default_duration);
    match spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) {
        Some(MicroTime(t)) => match SignedDuration::try_from(dur) {
            Ok(d) => t.checked_add(d).map(|exp| exp < now).unwrap_or(false),
            Err(_) => false,
        },
        None => true,
    }
}

pub async fn try_acquire(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<Attempt, kube::Error> {
    let now = Timestamp::now();
    let fresh = |transitions: i32, acquire: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.duration.as_secs() as i32),
        acquire_time: acquire.or(Some(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(fresh(0, None)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Held),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::HeldByOther("(racing)".into())),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.clone().unwrap_or_default();
            let holder = spec.holder_identity.clone().unwrap_or_default();
            if !may_acquire(&spec, &cfg.identity, now, cfg.duration) {
                return Ok(Attempt::HeldByOther(holder));
            }
            let ours = holder == cfg.identity;
            let transitions = spec.lease_transitions.unwrap_or(0) + if ours { 0 } else { 1 };
            lease.spec = Some(fresh(transitions, if ours { spec.acquire_time } else { None }));
            // replace carries the resourceVersion we read: a concurrent taker gets 409, so at
            // most one replica wins each round.
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Held),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::HeldByOther(holder)),
                Err(e) => Err(e),
            }
        }
    }
}

/// Runs forever: publishes `true` once the lease is ours and `false` when it was lost.
pub async fn run(client: Client, cfg: LeaseConfig, tx: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut last_renewed: Option<Instant> = None;
    loop {
        match try_acquire(&api, &cfg).await {
            Ok(Attempt::Held) => {
                if !*tx.borrow() {
                    tracing::info!(lease = %cfg.name, identity = %cfg.identity, "acquired leadership");
                }
                last_renewed = Some(Instant::now());
                tx.send_replace(true);
            }
            Ok(Attempt::HeldByOther(holder)) => {
                if *tx.borrow() {
                    tracing::warn!(lease = %cfg.name, %holder, "leadership taken by another replica");
                    tx.send_replace(false);
                }
                tracing::debug!(lease = %cfg.name, %holder, "standby: lease held by another replica");
            }
            Err(e) => {
                tracing::warn!(lease = %cfg.name, error = %e, "lease renewal failed");
                if *tx.borrow() && last_renewed.is_none_or(|t| t.elapsed() > cfg.duration) {
                    tracing::error!(lease = %cfg.name, "could not renew the lease within its duration");
                    tx.send_replace(false);
                }
            }
        }
        tokio::time::sleep(cfg.renew_every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed_secs_ago: i64, dur: i32) -> LeaseSpec {
        let now = Timestamp::now();
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(dur),
            renew_time: Some(MicroTime(now.checked_sub(SignedDuration::from_secs(renewed_secs_ago)).unwrap())),
            ..Default::default()
        }
    }

    #[test]
    fn a_live_lease_of_another_replica_is_respected() {
        let now = Timestamp::now();
        assert!(!may_acquire(&spec("b", 1, 15), "a", now, Duration::from_secs(15)));
        assert!(may_acquire(&spec("a", 1, 15), "a", now, Duration::from_secs(15)), "own lease is renewed");
    }

    #[test]
    fn an_expired_or_empty_lease_is_taken() {
        let now = Timestamp::now();
        assert!(may_acquire(&spec("b", 30, 15), "a", now, Duration::from_secs(15)));
        assert!(may_acquire(&LeaseSpec::default(), "a", now, Duration::from_secs(15)));
    }
}
