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

/// The bulk comparison's two reads of a page, of each kind's records.
fn resync_queries() -> impl Iterator<Item = HotQuery> {
    use super::resync::{self, API_KEYS, CUSTOMERS, SUBSCRIPTIONS};
    const PAGE: &[Arg] = &[Arg::Namespaces, Arg::Names];
    [
        (
            CUSTOMERS,
            "resync::live_records(customers)",
            "resync::row_versions(customers)",
        ),
        (
            SUBSCRIPTIONS,
            "resync::live_records(subscriptions)",
            "resync::row_versions(subscriptions)",
        ),
        (
            API_KEYS,
            "resync::live_records(api_keys)",
            "resync::row_versions(api_keys)",
        ),
    ]
    .into_iter()
    .flat_map(|(table, live, versions)| {
        [
            HotQuery {
                name: live,
                sql: resync::live_records_sql(table),
                args: PAGE,
            },
            HotQuery {
                name: versions,
                sql: resync::row_versions_sql(table),
                args: PAGE,
            },
        ]
    })
}

/// Every per-object query of the store.
pub fn all() -> Vec<HotQuery> {
    use Arg::*;
    const REF: &[Arg] = &[Namespace, Name];
    let mut all = vec![
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
    ];
    all.extend(resync_queries());
    all
}
