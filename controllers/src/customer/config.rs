//! `<prefix>/customers/<id>`: what the gateway knows of a customer (contract), derived
//! from the customer's row and the plan of its subscription in force.

use m3o_crds::Customer;
use serde::Serialize;
use uuid::Uuid;

use crate::platform::entry::{DesiredEntry, owner_ref};
use crate::store::customers::CustomerRow;

/// The gateway's view of a customer (contract).
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct CustomerConfig {
    pub id: String,
    pub email: String,
    pub name: String,
    pub status: String,
    /// The plan of the customer's live subscription; empty while it has none.
    pub plan: String,
}

/// The key of a customer, relative to the prefix.
pub fn customer_key(id: Uuid) -> String {
    format!("customers/{id}")
}

/// The value of a live customer row whose subscription in force has `plan` ("" if none).
pub fn customer_value(row: &CustomerRow, plan: String) -> serde_json::Value {
    let config = CustomerConfig {
        id: row.id.to_string(),
        email: row.email.clone(),
        name: row.name.clone(),
        status: row.status.clone(),
        plan,
    };
    serde_json::to_value(config).unwrap_or_default()
}

/// The customer key's entry, owned by the Customer (for drift Events).
pub fn customer_entry(row: &CustomerRow, plan: String) -> DesiredEntry {
    DesiredEntry {
        value: customer_value(row, plan),
        owner: owner_ref::<Customer>(&row.k8s_namespace, &row.k8s_name, &row.k8s_uid),
    }
}
