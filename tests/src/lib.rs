//! Test harness shared by the host-integration and VM end-to-end tiers: process
//! guards, port-0 servers, helpers that walk the runbook.
