//! The Kubernetes object a Postgres row belongs to: every table records one, and a
//! live row is found again by its namespace/name.

use kube::api::ObjectMeta;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct K8sRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl K8sRef {
    /// The reference of an object, from its metadata.
    pub fn of(meta: &ObjectMeta) -> Self {
        Self {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone().unwrap_or_default(),
        }
    }

    /// The reference as a row's `k8s_namespace`, `k8s_name`, `k8s_uid` columns hold it.
    pub fn from_columns(namespace: &str, name: &str, uid: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: uid.to_owned(),
        }
    }
}
