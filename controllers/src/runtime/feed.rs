//! One watch of Customers shared by the three controllers, and an index of the
//! objects that reference each Customer, so a Customer change costs one decode and
//! reaches exactly its dependents, however large the fleet.
//!
//! The watch feeds the Customer controller's cache and fans out to two streams:
//! the Customer controller gets every event its predicates keep (spec, finalizers,
//! labels: not its own status writes), the dependents get the changes that matter to
//! them ([`runner::customer_changes`]) and every deletion.

use std::sync::Arc;

use futures::channel::mpsc;
use futures::{SinkExt, Stream, StreamExt};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use m3o_crds::Customer;

use crate::runtime::context::Context;
pub use crate::runtime::referents::{ByCustomer, CustomerReferent};
use crate::runtime::relist::Relist;
use crate::runtime::runner;

/// Events buffered per consumer before the shared watch waits for it.
const BUFFER: usize = 1024;

/// The shared Customer watch: run [`CustomerFeed::run`] as a task, hand the parts to
/// the controllers.
pub struct CustomerFeed {
    /// Every Customer in the watched scope (the Customer controller's cache).
    pub store: Store<Customer>,
    /// What reconciles Customers: every event of the watch.
    pub for_customers: mpsc::Receiver<watcher::Event<Customer>>,
    /// Customer changes for the Subscription controller.
    pub for_subscriptions: mpsc::Receiver<watcher::Event<Customer>>,
    /// Customer changes for the ApiKey controller.
    pub for_apikeys: mpsc::Receiver<watcher::Event<Customer>>,
    task: Option<Pump>,
}

struct Pump {
    writer: reflector::store::Writer<Customer>,
    store: Store<Customer>,
    customers: mpsc::Sender<watcher::Event<Customer>>,
    dependents: [mpsc::Sender<watcher::Event<Customer>>; 2],
}

impl CustomerFeed {
    pub fn new() -> Self {
        let (store, writer) = reflector::store();
        let (customers, for_customers) = mpsc::channel(BUFFER);
        let (subscriptions, for_subscriptions) = mpsc::channel(BUFFER);
        let (apikeys, for_apikeys) = mpsc::channel(BUFFER);
        Self {
            store: store.clone(),
            for_customers,
            for_subscriptions,
            for_apikeys,
            task: Some(Pump {
                writer,
                store,
                customers,
                dependents: [subscriptions, apikeys],
            }),
        }
    }

    /// The task that drives the watch (once; later calls return a task that ends at
    /// once). It ends when every consumer is gone. Dependents read Customers from its
    /// cache ([`Context::customer`]) from now on.
    pub fn run(&mut self, ctx: Arc<Context>) -> impl Future<Output = ()> + Send + 'static {
        ctx.use_customer_cache(self.store.clone());
        let pump = self.task.take();
        async move {
            if let Some(pump) = pump {
                pump.run(ctx).await;
            }
        }
    }
}

impl Default for CustomerFeed {
    fn default() -> Self {
        Self::new()
    }
}

impl Pump {
    async fn run(mut self, ctx: Arc<Context>) {
        let events =
            runner::scoped_watch::<Customer>(&ctx, runner::watch_config(&ctx).any_semantic())
                .modify(runner::strip_unread_metadata);
        let mut events = std::pin::pin!(reflector::reflector(self.writer, events));
        // The Customers cached when a relist began: one it does not list again was
        // deleted while the watch was interrupted, and no Delete event comes for it.
        let mut before_relist: Vec<Arc<Customer>> = Vec::new();
        let mut relist = Relist::default();
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(err) => {
                    tracing::warn!(%err, kind = m3o_crds::kinds::CUSTOMER, "watch error; retrying");
                    continue;
                }
            };
            relist.follow(&event, |c| c.metadata.uid.clone());
            match &event {
                watcher::Event::InitDone => {
                    tracing::info!(kind = m3o_crds::kinds::CUSTOMER, "listed; watching");
                    ctx.watching.mark(m3o_crds::kinds::CUSTOMER);
                    let known = std::mem::take(&mut before_relist);
                    for customer in relist.lost(known, |c| c.metadata.uid.clone()) {
                        let deleted = watcher::Event::Delete(Customer::clone(&customer));
                        for dependents in &mut self.dependents {
                            let _ = dependents.send(deleted.clone()).await;
                        }
                    }
                }
                watcher::Event::Init => before_relist = self.store.state(),
                _ => {}
            }
            // Every consumer sees every event, the list's bounds too: the Customer
            // controller compares in bulk at a list's end, and the dependents' change
            // filters seed at the first. A consumer that is gone (its controller
            // stopped) is not waited for.
            let _ = self.customers.send(event.clone()).await;
            for dependents in &mut self.dependents {
                let _ = dependents.send(event.clone()).await;
            }
        }
    }
}

/// The Customer changes that matter to dependents, from the shared feed; not those of
/// a Customer for which `provisioning` holds (the dependents' gate says they would
/// only wait: the pipeline's `dependent::being_provisioned`).
pub fn dependent_changes(
    events: mpsc::Receiver<watcher::Event<Customer>>,
    provisioning: fn(&Customer) -> bool,
) -> impl Stream<Item = Result<Customer, watcher::Error>> + Send + 'static {
    runner::customer_changes(events.map(Ok), provisioning)
}
