//! What every provider shares past the HTTP client ([`super::http`]): where its
//! metadata service is ([`BaseUrl`]) and the walk that collects the instance's
//! addresses from the metadata ([`Addresses`], [`list`], [`optional_list`]), each
//! error naming where in the metadata it was, into the facts reported at
//! enrollment ([`Addresses::facts`]).

use super::http::{self, Fetcher};
use super::{ProviderFacts, SourceError};

/// A metadata service's base URL, without a trailing slash: the real address by
/// default, a mock's on 127.0.0.1 in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl(String);

impl BaseUrl {
    pub fn new(base: impl Into<String>) -> Self {
        Self(base.into().trim_end_matches('/').to_string())
    }

    /// `base/path`; `path` has no leading slash.
    pub fn join(&self, path: &str) -> String {
        format!("{}/{path}", self.0)
    }
}

/// The addresses a provider reports: each checked and kept once, in the order
/// found.
#[derive(Debug)]
pub struct Addresses<'a> {
    http: &'a Fetcher,
    found: Vec<String>,
}

impl<'a> Addresses<'a> {
    pub fn new(http: &'a Fetcher) -> Self {
        Self {
            http,
            found: Vec::new(),
        }
    }

    /// Checks an address read at `field` (none or empty: nothing) and adds it once.
    pub fn push(&mut self, field: &str, value: Option<String>) -> Result<(), SourceError> {
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            let ip = http::ip_value(&v).map_err(|reason| self.http.field_error(field, reason))?;
            if !self.found.contains(&ip) {
                self.found.push(ip);
            }
        }
        Ok(())
    }

    /// The string member `key` of the object `value` found at `at`, as an address.
    pub fn member(
        &mut self,
        at: &str,
        value: &serde_json::Value,
        key: &str,
    ) -> Result<(), SourceError> {
        let v = super::json_str(self.http, at, value, key)?;
        self.push(&format!("{at}.{key}"), v)
    }

    /// The `key` member of each of `nic.ipv4` and `nic.ipv6` that is there.
    pub fn per_family(
        &mut self,
        at: &str,
        nic: &serde_json::Value,
        key: &str,
    ) -> Result<(), SourceError> {
        for family in ["ipv4", "ipv6"] {
            if let Some(f) = nic.get(family).filter(|f| !f.is_null()) {
                self.member(&format!("{at}.{family}"), f, key)?;
            }
        }
        Ok(())
    }

    /// The facts a provider reports at enrollment, with these addresses.
    pub fn facts(
        self,
        provider: &str,
        instance_id: String,
        region: Option<String>,
    ) -> ProviderFacts {
        ProviderFacts {
            provider: provider.to_string(),
            instance_id: Some(instance_id),
            region,
            addresses: self.found,
        }
    }
}

/// The items of the list `items` found at `at`, each with its own path (`at[i]`).
pub fn indexed<'v>(
    at: &str,
    items: &'v [serde_json::Value],
) -> impl Iterator<Item = (String, &'v serde_json::Value)> + 'v {
    let at = at.to_string();
    items
        .iter()
        .enumerate()
        .map(move |(i, item)| (format!("{at}[{i}]"), item))
}

/// A document that must be a list (a provider's list of interfaces), item by item.
pub fn list<'v>(
    http: &Fetcher,
    at: &str,
    value: &'v serde_json::Value,
) -> Result<impl Iterator<Item = (String, &'v serde_json::Value)> + 'v, SourceError> {
    let items = value
        .as_array()
        .ok_or_else(|| http.field_error(at, "must be a JSON list"))?;
    Ok(indexed(at, items))
}

/// A member that may be absent or null (no items) or else must be a list, item
/// by item.
pub fn optional_list<'v>(
    http: &Fetcher,
    at: &str,
    value: Option<&'v serde_json::Value>,
) -> Result<impl Iterator<Item = (String, &'v serde_json::Value)> + 'v, SourceError> {
    let items: &[serde_json::Value] = match value {
        None | Some(serde_json::Value::Null) => &[],
        Some(serde_json::Value::Array(items)) => items,
        Some(_) => return Err(http.field_error(at, "must be a list")),
    };
    Ok(indexed(at, items))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_url_joins_paths_with_one_slash() {
        let base = BaseUrl::new("http://127.0.0.1:8080/");
        assert_eq!(
            base.join("latest/user-data"),
            "http://127.0.0.1:8080/latest/user-data"
        );
    }

    #[test]
    fn the_address_walk_names_where_each_address_was() {
        let http = Fetcher::new(
            "test",
            http::RetryPolicy::default(),
            tokio::time::Instant::now(),
            true,
            None,
            false,
        )
        .unwrap();
        let nics = serde_json::json!([
            {"ipv4": {"address": "10.0.0.2"}, "ipv6": null},
            {"ipv4": {"address": "10.0.0.2"}, "ipv6": {"address": "2001:db8::1"}},
        ]);
        let mut addresses = Addresses::new(&http);
        for (at, nic) in optional_list(&http, "interfaces", Some(&nics)).unwrap() {
            addresses.per_family(&at, nic, "address").unwrap();
        }
        let facts = addresses.facts("test", "i-1".into(), None);
        assert_eq!(facts.addresses, vec!["10.0.0.2", "2001:db8::1"]);
        assert_eq!(optional_list(&http, "x", None).unwrap().count(), 0);
        let err = optional_list(&http, "interfaces", Some(&serde_json::json!({})))
            .err()
            .unwrap();
        assert!(crate::error_chain(&err).contains("interfaces"), "{err}");
        let bad = serde_json::json!([{"ipv4": {"address": "not an ip"}}]);
        let mut addresses = Addresses::new(&http);
        let err = list(&http, "interfaces", &bad)
            .unwrap()
            .try_for_each(|(at, nic)| addresses.per_family(&at, nic, "address"))
            .unwrap_err();
        assert!(
            crate::error_chain(&err).contains("interfaces[0].ipv4.address"),
            "{err}"
        );
    }
}
