//! The whole control-plane state at one revision. It changes only by applying committed changes.
use std::collections::BTreeMap;

use super::types::{
    Account, Change, Endpoint, Network, Object, SecurityGroup, Service, Subnet, Token,
};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// Bumped by every committed mutation.
    pub revision: u64,
    pub accounts: BTreeMap<String, Account>,
    /// By SHA-256 of the token.
    pub tokens: BTreeMap<String, Token>,
    pub networks: BTreeMap<String, Network>,
    pub subnets: BTreeMap<String, Subnet>,
    pub services: BTreeMap<String, Service>,
    pub endpoints: BTreeMap<String, Endpoint>,
    pub security_groups: BTreeMap<String, SecurityGroup>,
}

impl State {
    /// A service by id or by service name.
    pub fn service_by_ref(&self, r: &str) -> Option<&Service> {
        self.services
            .get(r)
            .or_else(|| self.services.values().find(|v| v.service_name == r))
    }

    /// An endpoint in `network_id`, other than those `skip` names, whose private DNS is on for
    /// `name`.
    pub fn private_dns_holder(
        &self,
        network_id: &str,
        name: &str,
        skip: impl Fn(&Endpoint) -> bool,
    ) -> Option<&Endpoint> {
        self.endpoints.values().find(|e| {
            e.network_id == network_id
                && e.private_dns_enabled
                && !skip(e)
                && self
                    .services
                    .get(&e.service_id)
                    .and_then(|v| v.private_dns_name.as_deref())
                    == Some(name)
        })
    }

    /// Whether the state already holds exactly this change (a put of an equal object, a delete of
    /// an absent one): committing it would change nothing.
    pub fn holds(&self, c: &Change) -> bool {
        match c {
            Change::Put(o) => match o {
                Object::Account(v) => self.accounts.get(&v.id) == Some(v),
                Object::Token(v) => self.tokens.get(&v.sha256) == Some(v),
                Object::Network(v) => self.networks.get(&v.id) == Some(v),
                Object::Subnet(v) => self.subnets.get(&v.id) == Some(v),
                Object::Service(v) => self.services.get(&v.id) == Some(v),
                Object::Endpoint(v) => self.endpoints.get(&v.id) == Some(v),
                Object::SecurityGroup(v) => self.security_groups.get(&v.id) == Some(v),
            },
            Change::Delete { kind, id } => match *kind {
                "account" => !self.accounts.contains_key(id),
                "token" => !self.tokens.contains_key(id),
                "network" => !self.networks.contains_key(id),
                "subnet" => !self.subnets.contains_key(id),
                "service" => !self.services.contains_key(id),
                "endpoint" => !self.endpoints.contains_key(id),
                "security_group" => !self.security_groups.contains_key(id),
                _ => false,
            },
        }
    }

    /// Applies one object write.
    pub fn put(&mut self, o: Object) {
        match o {
            Object::Account(v) => drop(self.accounts.insert(v.id.clone(), v)),
            Object::Token(v) => drop(self.tokens.insert(v.sha256.clone(), v)),
            Object::Network(v) => drop(self.networks.insert(v.id.clone(), v)),
            Object::Subnet(v) => drop(self.subnets.insert(v.id.clone(), v)),
            Object::Service(v) => drop(self.services.insert(v.id.clone(), v)),
            Object::Endpoint(v) => drop(self.endpoints.insert(v.id.clone(), v)),
            Object::SecurityGroup(v) => drop(self.security_groups.insert(v.id.clone(), v)),
        }
    }

    pub fn delete(&mut self, kind: &str, id: &str) {
        match kind {
            "account" => drop(self.accounts.remove(id)),
            "token" => drop(self.tokens.remove(id)),
            "network" => drop(self.networks.remove(id)),
            "subnet" => drop(self.subnets.remove(id)),
            "service" => drop(self.services.remove(id)),
            "endpoint" => drop(self.endpoints.remove(id)),
            "security_group" => drop(self.security_groups.remove(id)),
            _ => {}
        }
    }

    /// Applies a committed mutation and moves to its revision.
    pub fn apply(&mut self, revision: u64, changes: &[Change]) {
        for c in changes {
            match c {
                Change::Put(o) => self.put(o.clone()),
                Change::Delete { kind, id } => self.delete(kind, id),
            }
        }
        self.revision = revision;
    }

    /// Every stored object (for a store writing a full snapshot, and for tests).
    pub fn objects(&self) -> impl Iterator<Item = Object> + '_ {
        self.accounts
            .values()
            .cloned()
            .map(Object::Account)
            .chain(self.tokens.values().cloned().map(Object::Token))
            .chain(self.networks.values().cloned().map(Object::Network))
            .chain(self.subnets.values().cloned().map(Object::Subnet))
            .chain(self.services.values().cloned().map(Object::Service))
            .chain(self.endpoints.values().cloned().map(Object::Endpoint))
            .chain(
                self.security_groups
                    .values()
                    .cloned()
                    .map(Object::SecurityGroup),
            )
    }
}
