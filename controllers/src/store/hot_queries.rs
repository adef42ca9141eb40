//! The queries a reconcile, a cleanup or the etcd convergence runs per object, with
//! example arguments: the integration suite EXPLAINs each against 10k rows and fails on
//! a sequential scan, so per-reconcile cost cannot grow with the fleet unnoticed.

use super::{api_keys, customers, subscriptions};

/// One hot query: a name, the SQL (with `$n` parameters) and the argument kinds.
pub struct HotQuery {
    pub name: &'static str,
    pub sql: String,
    /// One per `$n`, in order.
    pub args: &'static [Arg],
}

/// What an argument is, so a test can supply a realistic value.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Namespace,
    Name,
    Id,
    Hash,
    Email,
    /// A point in time (the queries of the clock take two).
    Time,
    /// A page of namespaces and one of names (the bulk resync's).
    Namespaces,
    Names,
}

fn query(name: &'static str, table: &str, filter: &str, args: &'static [Arg]) -> HotQuery {
    HotQuery {
        name,
        sql: format!("SELECT * FROM {table} {filter}"),
        args,
    }
}

/// Every per-object query of the store.
pub fn all() -> Vec<HotQuery> {
    use Arg::*;
    const REF: &[Arg] = &[Namespace, Name];
    vec![
        query(
            "api_keys::lock_live_for_resource",
            "api_keys",
            api_keys::LIVE_FOR_RESOURCE,
            REF,
        ),
        query(
            "api_keys::all_for_resource",
            "api_keys",
            api_keys::ALL_FOR_RESOURCE,
            REF,
        ),
        query(
            "api_keys::live_by_hash",
            "api_keys",
            api_keys::LIVE_BY_HASH,
            &[Hash],
        ),
        query(
            "api_keys::all_for_customer",
            "api_keys",
            api_keys::ALL_FOR_CUSTOMER,
            &[Id],
        ),
        query(
            "api_keys::config_live_for_customer",
            "api_keys",
            api_keys::CONFIG_LIVE_FOR_CUSTOMER,
            &[Id],
        ),
        HotQuery {
            name: "api_keys::next_clock_change",
            sql: api_keys::NEXT_CLOCK_CHANGE.to_owned(),
            args: &[Time],
        },
        HotQuery {
            name: "api_keys::customers_crossing",
            sql: api_keys::CUSTOMERS_CROSSING.to_owned(),
            args: &[Time, Time],
        },
        HotQuery {
            name: "resync::live_records(customers)",
            sql: super::resync::live_records_sql(super::resync::CUSTOMERS),
            args: &[Namespaces, Names],
        },
        HotQuery {
            name: "resync::live_records(subscriptions)",
            sql: super::resync::live_records_sql(super::resync::SUBSCRIPTIONS),
            args: &[Namespaces, Names],
        },
        HotQuery {
            name: "resync::live_records(api_keys)",
            sql: super::resync::live_records_sql(super::resync::API_KEYS),
            args: &[Namespaces, Names],
        },
        HotQuery {
            name: "resync::row_versions(customers)",
            sql: super::resync::row_versions_sql(super::resync::CUSTOMERS),
            args: &[Namespaces, Names],
        },
        HotQuery {
            name: "resync::row_versions(subscriptions)",
            sql: super::resync::row_versions_sql(super::resync::SUBSCRIPTIONS),
            args: &[Namespaces, Names],
        },
        HotQuery {
            name: "resync::row_versions(api_keys)",
            sql: super::resync::row_versions_sql(super::resync::API_KEYS),
            args: &[Namespaces, Names],
        },
        query(
            "customers::live_by_k8s_ref",
            "customers",
            customers::LIVE_BY_K8S_REF,
            REF,
        ),
        query("customers::by_id", "customers", customers::BY_ID, &[Id]),
        query(
            "customers::live_by_id",
            "customers",
            customers::LIVE_BY_ID,
            &[Id],
        ),
        query(
            "customers::live_email_holder",
            "customers",
            customers::LIVE_BY_EMAIL,
            &[Email],
        ),
        query(
            "customers::latest_by_k8s_ref",
            "customers",
            customers::LATEST_BY_K8S_REF,
            REF,
        ),
        query(
            "subscriptions::live_by_k8s_ref",
            "subscriptions",
            subscriptions::LIVE_BY_K8S_REF,
            REF,
        ),
        query(
            "subscriptions::live_by_customer",
            "subscriptions",
            subscriptions::LIVE_BY_CUSTOMER,
            &[Id],
        ),
    ]
}
