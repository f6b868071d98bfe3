//! The operator's Kubernetes client: kube's default stack plus a layer that counts every
//! request (`prism_operator_kube_requests_total{verb, resource}`), so the cost of a reconcile
//! in API calls is visible on /metrics, not guessed (bench/operator_scale prints it per reconcile).

use http::{Method, Request, Uri};
use kube::client::{Body, ClientBuilder};
use kube::{Client, Config};
use prometheus::IntCounterVec;
use tower::util::MapRequestLayer;

/// A client for `config` whose requests are counted in `requests`.
pub fn counting(config: Config, requests: IntCounterVec) -> Result<Client, kube::Error> {
    let count = MapRequestLayer::new(move |req: Request<Body>| {
        let (verb, resource) = request_labels(req.method(), req.uri());
        requests.with_label_values(&[verb, resource.as_str()]).inc();
        req
    });
    Ok(ClientBuilder::try_from(config)?.with_layer(&count).build())
}

/// The verb as the API server's audit log names it (`get`/`list`/`watch`/`patch`/...) and the
/// resource with its subresource (`modalitynodes/status`), from a request's method and path.
pub fn request_labels(method: &Method, uri: &Uri) -> (&'static str, String) {
    // /api/v1/namespaces/NS/RES[/NAME[/SUB]] or /apis/GROUP/VERSION/namespaces/NS/RES[/NAME[/SUB]]
    let parts: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let rest = match parts.first() {
        Some(&"api") => parts.get(2..),
        Some(&"apis") => parts.get(3..),
        _ => None,
    }
    .unwrap_or_default();
    let rest = match rest {
        ["namespaces", _, tail @ ..] if !tail.is_empty() => tail,
        other => other,
    };
    let named = rest.len() >= 2;
    let resource = match rest {
        [res, _, sub, ..] => format!("{res}/{sub}"),
        [res, ..] => res.to_string(),
        [] => "other".to_string(),
    };
    let watch = uri.query().is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let verb = match *method {
        Method::GET if watch => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "other",
    };
    (verb, resource)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(method: Method, uri: &str) -> (&'static str, String) {
        request_labels(&method, &uri.parse().unwrap())
    }

    #[test]
    fn requests_are_named_by_verb_and_resource() {
        let mn = "/apis/prism.dev/v1alpha1/namespaces/ml/modalitynodes";
        assert_eq!(
            labels(Method::GET, &format!("{mn}?watch=true&resourceVersion=5")),
            ("watch", "modalitynodes".into())
        );
        assert_eq!(labels(Method::GET, mn), ("list", "modalitynodes".into()));
        assert_eq!(labels(Method::GET, &format!("{mn}/text")), ("get", "modalitynodes".into()));
        assert_eq!(
            labels(Method::PATCH, &format!("{mn}/text/status?fieldManager=prism-operator")),
            ("patch", "modalitynodes/status".into())
        );
        assert_eq!(
            labels(Method::GET, "/apis/prism.dev/v1alpha1/modalitynodes?limit=1"),
            ("list", "modalitynodes".into())
        );
        assert_eq!(labels(Method::POST, "/api/v1/namespaces/ml/events"), ("create", "events".into()));
        assert_eq!(
            labels(Method::DELETE, "/apis/apps/v1/namespaces/ml/deployments/x"),
            ("delete", "deployments".into())
        );
        assert_eq!(labels(Method::GET, "/version"), ("list", "other".into()));
    }
}
