//! Integration tests against a real kube-apiserver, PostgreSQL, Redis and etcd.
//! Run with `make test` (which starts them); see `support.rs`.

mod admin;
mod apikey;
mod chart;
mod convergence;
mod customer;
mod customer_faults;
mod examples;
mod fencing;
mod gateway;
mod hardening;
mod image;
mod manifests;
mod outbox;
mod production;
mod recovery;
mod restart;
mod scale;
mod sharding;
mod subscription;
mod subscription_catalog;
mod subscription_order;
mod support;
mod tls;
