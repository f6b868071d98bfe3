//! One watch per kind, shared: a reflector store for reads plus a fan-out of every change to
//! each consumer (a controller's `for`/`owns`/`watches` trigger).
//!
//! kube's own shared streams (`store_shared` + `ReflectHandle`) hand out references that are
//! looked up in the store when polled; an object deleted in between makes the handle return
//! Pending without a wake-up, so that consumer stalls for good, and once its buffer is full the
//! watch itself stops (seen in the e2e suite: pipelines stopped seeing their nodes). Here each
//! consumer gets the object itself.

use futures::channel::mpsc;
use futures::{SinkExt, Stream, StreamExt};
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{self, reflector, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tracing::warn;

/// Changes a consumer may fall behind by before the watch waits for it.
const BUFFER: usize = 1024;

/// A consumer's view of a shared watch, in the shape kube's `*_stream` triggers take.
pub type Changes<K> = futures::stream::Map<mpsc::Receiver<K>, fn(K) -> Result<K, watcher::Error>>;

/// Starts nothing: returns the store, one change stream per consumer, and the future that runs
/// the watch (spawn it; it ends when every consumer is gone).
pub fn shared<K, const CONSUMERS: usize>(
    api: Api<K>,
    config: watcher::Config,
) -> (Store<K>, [Changes<K>; CONSUMERS], impl std::future::Future<Output = ()> + Send)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let mut senders = Vec::with_capacity(CONSUMERS);
    let changes = std::array::from_fn(|_| {
        let (tx, rx) = mpsc::channel::<K>(BUFFER);
        senders.push(tx);
        rx.map(Ok as fn(K) -> Result<K, watcher::Error>)
    });
    let events = watcher(api, config)
        .default_backoff()
        // Nothing reads managedFields from the stores; at 1000 objects they are most of the memory.
        .modify(|o: &mut K| o.meta_mut().managed_fields = None);
    (reader, changes, fan_out(events, writer, senders))
}

/// Applies each watch event to the store, then hands every changed object to every consumer.
async fn fan_out<K>(
    events: impl Stream<Item = watcher::Result<watcher::Event<K>>>,
    writer: Writer<K>,
    mut senders: Vec<mpsc::Sender<K>>,
) where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    let reader = writer.as_reader();
    let mut events = std::pin::pin!(reflector(writer, events));
    while let Some(ev) = events.next().await {
        let changed: Vec<K> = match ev {
            // A deleted child still names its owner: the owner is reconciled (and recreates it).
            Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => vec![o],
            // The first list (and every relist) reaches the store at InitDone, all at once.
            Ok(watcher::Event::InitDone) => reader.state().iter().map(|o| (**o).clone()).collect(),
            Ok(_) => continue,
            Err(e) => {
                warn!(error = %e, "watch failed; retrying with backoff");
                continue;
            }
        };
        for o in changed {
            senders.retain(|tx| !tx.is_closed());
            if senders.is_empty() {
                return;
            }
            for tx in &mut senders {
                let _ = tx.send(o.clone()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;

    use super::*;

    fn cm(name: &str, v: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta { name: Some(name.into()), namespace: Some("ns".into()), ..Default::default() },
            data: Some([("v".to_string(), v.to_string())].into()),
            ..Default::default()
        }
    }

    fn seen(c: &ConfigMap) -> String {
        format!("{}={}", c.metadata.name.as_deref().unwrap_or(""), c.data.as_ref().map_or("", |d| &d["v"]))
    }

    #[tokio::test]
    async fn every_consumer_sees_the_first_list_then_each_change_and_the_store_follows() {
        use watcher::Event::*;
        let events = vec![
            Init,
            InitApply(cm("a", "1")),
            InitApply(cm("b", "1")),
            InitDone,
            Apply(cm("a", "2")),
            // Deleted before anyone looked: kube's ReflectHandle stalls here; ours hands it over.
            Apply(cm("c", "1")),
            Delete(cm("c", "1")),
            Delete(cm("b", "1")),
        ];
        let (reader, writer) = reflector::store::<ConfigMap>();
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..2).map(|_| mpsc::channel::<ConfigMap>(16)).unzip();
        let (first, second) = {
            let mut rxs = rxs.into_iter();
            (rxs.next().unwrap(), rxs.next().unwrap())
        };
        // A consumer that goes away must not hold the others up.
        drop(second);
        fan_out(futures::stream::iter(events.into_iter().map(Ok)), writer, txs).await;
        let mut got: Vec<String> = first.map(|c| seen(&c)).collect().await;
        got[..2].sort();
        assert_eq!(got, ["a=1", "b=1", "a=2", "c=1", "c=1", "b=1"]);
        let mut left: Vec<String> = reader.state().iter().map(|c| seen(c)).collect();
        left.sort();
        assert_eq!(left, ["a=2"]);
    }
}
