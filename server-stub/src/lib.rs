//! `powernode-stub`: the reference control plane. Admin API and CLI, node API with
//! enrollment and mTLS, CA, bootstrap tokens, sensors and providers, with its state
//! in SQLite under one data directory.
//!
//! It never links the agent: the two meet only on the wire types of
//! `powernode-proto`. It must never hand out a certificate without a valid,
//! unused bootstrap token (the one exception: a reboot task it handed out re-opens
//! the instance's token for one more enrollment, for a short window), never store a bootstrap token in clear in its own
//! tables, and never answer a node call without checking the certificate against
//! revocation and the instance it names.
//!
//! Layout, imports pointing one way: [`cli`] (the binary, its admin client and the
//! module publisher) > [`server`] (TLS accept loop, background sensors) > [`api`]
//! (routes; handlers decode, call one method, encode) > [`service`] (behaviour, one
//! file per area) > [`store`] (SQLite) > [`model`] (the records). [`error`] sits
//! between service and store; [`ca`] issues and checks certificates; URL paths are
//! in `powernode_proto::paths`.

pub mod api;
pub mod ca;
pub mod catalog;
pub mod cli;
pub mod clock;
pub mod config;
pub mod drift;
pub mod error;
pub mod images;
pub mod model;
pub mod provider;
pub mod registry;
pub mod server;
pub mod service;
pub mod signing;
pub mod store;

pub use api::app;
pub use clock::Clock;
pub use config::{Config, ProviderMode, StuckThresholds};
pub use server::{start, RunningServer};
pub use service::AppState;
