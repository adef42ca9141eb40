//! Custom resources of m3o-operator, group `m3o.com`, version `v1alpha1`.
//!
//! Validation lives in the schema (types, enums, formats, lengths, CEL rules) so the
//! API server rejects bad manifests with a field-level message before they reach a
//! controller. `crds()` is the single source of the CRD YAML committed under
//! `charts/m3o-operator/crds/`.

// kube's `printcolumn(name = .., type_ = ..)` repeats keys across columns by design;
// clippy reads the repeated `type_ = "string"` as a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

mod apikey;
mod common;
mod customer;
mod subscription;

pub use apikey::{ApiKey, ApiKeySpec, ApiKeyState, ApiKeyStatus};
pub use common::{Condition, CustomerRef, DeletionPolicy, Quota};
pub use customer::{Customer, CustomerSpec, CustomerState, CustomerStatus, CustomerStatusState};
pub use subscription::{
    QuotaOverride, Subscription, SubscriptionSpec, SubscriptionState, SubscriptionStatus,
    UsageStatus,
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// API group of every m3o resource.
pub const GROUP: &str = "m3o.com";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";
/// `kubectl get m3o` lists all three kinds.
pub const CATEGORY: &str = "m3o";

/// The kinds' names, as constants (for metric labels and log fields).
pub mod kinds {
    pub const CUSTOMER: &str = "Customer";
    pub const SUBSCRIPTION: &str = "Subscription";
    pub const API_KEY: &str = "ApiKey";
}

/// Every CRD the operator serves, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![Customer::crd(), Subscription::crd(), ApiKey::crd()]
}

/// All CRDs as one multi-document YAML stream (what `m3o-operator crds` prints).
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
