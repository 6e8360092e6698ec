//! `powernode-stub`: the reference control plane. Admin API and CLI, node API with
//! enrollment and mTLS, CA, bootstrap tokens, sensors and providers. It never links
//! the agent: the two meet only on the wire types of `powernode-proto`.
